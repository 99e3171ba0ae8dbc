"""The one configuration object: which executors run, the kernel build, grouping, caches.

Every tunable of the runtime lives in :class:`Config` (no module-global switches). Each field
comes from, in order of precedence: the value given (``patch(config=Config(encoder="host"))``),
its environment variable below, the default. The runtime reads :func:`current` when it
builds a model's engines, so a new ``patch(config=...)`` applies to models seen after it (a
model already bound keeps the engines it was built with until its weights change or it is
patched again).

=============================  =========================================  ================
field                          environment variable                       default
=============================  =========================================  ================
``encoder``                    ``WHISPER_ACCEL_ENCODER``                  ``auto``
``decoder``                    ``WHISPER_ACCEL_DECODER``                  ``auto``
``native``                     ``WHISPER_ACCEL_NATIVE``                   on
``isa``                        ``WHISPER_ACCEL_ISA``                      ``auto``
``measure``                    ``WHISPER_ACCEL_MEASURE``                  on
``group_bytes``                ``WHISPER_ACCEL_GROUP_BYTES``              268435456
``whole_encoder_graph``        ``WHISPER_ACCEL_WHOLE_ENCODER_GRAPH``      off
``probe_cache``                ``WHISPER_ACCEL_PROBE_CACHE``              on
``cache_dir``                  ``WHISPER_ACCEL_CACHE_DIR``                see below
``matmul_precision``           ``WHISPER_ACCEL_MATMUL_PRECISION``         ``float32``
=============================  =========================================  ================

* ``encoder`` / ``decoder``: the executor of the encoder / of the decoder's one-token steps:
  ``auto`` (the fastest eligible one, measured on this machine: :mod:`whisper_accel.runtime.choice`),
  or one forced by name: ``host`` (numpy and the fused kernels through ctypes, no graph),
  ``fused`` (``mindspore.jit`` graphs with the fused kernels), ``plain`` (``mindspore.jit``
  graphs of MindSpore's own operators). A forced executor that cannot run here falls back to
  the next one (host -> fused -> plain), as after a fault.
* ``native``: build and use the fused C++ kernels (off: only ``plain`` runs).
* ``isa``: the kernels' instruction set: ``auto``, or ``avx512``, ``avx2``, ``neon`` (to compare
  variants on one machine). ``auto`` with ``measure`` and ``probe_cache`` on times the variants
  the CPU runs and keeps the widest unless another is clearly faster
  (:mod:`whisper_accel.runtime.native`); otherwise the widest.
* ``measure``: with ``auto``, time the eligible executors on this machine (verdicts kept on disk
  when ``probe_cache`` is on), and the kernel variants (with ``probe_cache`` on); off: a fixed
  order (host, fused, plain) and the widest variant.
* ``group_bytes``: resident memory the fused encoder graphs may spend to run several layers
  per launch (0: one layer a launch).
* ``whole_encoder_graph``: the whole encoder in one graph launch whatever its memory.
* ``probe_cache`` / ``cache_dir``: keep probe results, executor verdicts and kernel builds on
  disk, in ``cache_dir`` (default ``$XDG_CACHE_HOME/whisper_accel``, else
  ``~/.cache/whisper_accel``). With ``probe_cache`` off nothing is written there; kernels are
  then built in a temporary directory removed at exit.
* ``matmul_precision``: ``float32`` (the default: every product in float32), or ``bfloat16``,
  named to trade precision for speed: the host encoder's matrix products (its linear layers and
  convolutions) round their inputs to bfloat16 and sum in float32, on CPUs with AVX512_BF16
  (``kernels/fused.cc``'s ``GemmBF16``; a bfloat16 copy of the encoder's weights is kept beside
  them), and a float32 model's host decoder steps read a bfloat16-rounded copy of their weight
  matrices (activations and sums stay float32; any CPU with the kernels). Where the CPU or the
  kernels lack ``GemmBF16``, or the encoder runs on another executor, its products stay float32
  and ``status()`` / ``doctor`` say so. Step graphs (``decoder="fused"``/``"plain"``) stay float32.

Imports nothing but the standard library (the ``WHISPER_ACCEL`` start-up hook may read it).
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, Mapping, Optional

#: Executors of an engine, in fallback order.
EXECUTORS = ("host", "fused", "plain")
#: Accepted values of ``encoder`` / ``decoder``.
EXECUTOR_CHOICES = ("auto",) + EXECUTORS
#: Accepted values of ``isa``.
ISA_CHOICES = ("auto", "avx512", "avx2", "neon")
#: Accepted values of ``matmul_precision``.
PRECISION_CHOICES = ("float32", "bfloat16")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: field name -> environment variable
ENV = {
    "encoder": "WHISPER_ACCEL_ENCODER",
    "decoder": "WHISPER_ACCEL_DECODER",
    "native": "WHISPER_ACCEL_NATIVE",
    "isa": "WHISPER_ACCEL_ISA",
    "measure": "WHISPER_ACCEL_MEASURE",
    "group_bytes": "WHISPER_ACCEL_GROUP_BYTES",
    "whole_encoder_graph": "WHISPER_ACCEL_WHOLE_ENCODER_GRAPH",
    "probe_cache": "WHISPER_ACCEL_PROBE_CACHE",
    "cache_dir": "WHISPER_ACCEL_CACHE_DIR",
    "matmul_precision": "WHISPER_ACCEL_MATMUL_PRECISION",
}


#: Each field's default when its environment variable is unset.
DEFAULTS: Dict[str, object] = {
    "encoder": "auto", "decoder": "auto", "native": True, "isa": "auto", "measure": True,
    "group_bytes": 256 << 20, "whole_encoder_graph": False, "probe_cache": True, "cache_dir": None,
    "matmul_precision": "float32",
}


def _env_default(name: str):
    """A field whose default is its environment variable's value, else :data:`DEFAULTS`."""

    def factory():
        raw = os.environ.get(ENV[name], "").strip()
        return _parse(name, raw) if raw else DEFAULTS[name]

    return field(default_factory=factory)


@dataclass(frozen=True)
class Config:
    """Runtime settings (see the module docstring for each field). A field not given takes
    its environment variable's value, else the default: ``Config(encoder="host")`` keeps
    ``WHISPER_ACCEL_CACHE_DIR`` and the rest of the environment. :meth:`defaults` ignores the
    environment. An invalid value raises ValueError naming the field and its variable."""

    encoder: str = _env_default("encoder")
    decoder: str = _env_default("decoder")
    native: bool = _env_default("native")
    isa: str = _env_default("isa")
    measure: bool = _env_default("measure")
    group_bytes: int = _env_default("group_bytes")
    whole_encoder_graph: bool = _env_default("whole_encoder_graph")
    probe_cache: bool = _env_default("probe_cache")
    cache_dir: Optional[str] = _env_default("cache_dir")
    matmul_precision: str = _env_default("matmul_precision")

    def __post_init__(self):
        def bad(name, want):
            return ValueError(f"whisper_accel Config.{name} ({ENV[name]}) must be {want}, not "
                              f"{getattr(self, name)!r}")

        for name in ("encoder", "decoder"):
            if getattr(self, name) not in EXECUTOR_CHOICES:
                raise bad(name, f"one of {', '.join(EXECUTOR_CHOICES)}")
        if self.isa not in ISA_CHOICES:
            raise bad("isa", f"one of {', '.join(ISA_CHOICES)}")
        if self.matmul_precision not in PRECISION_CHOICES:
            raise bad("matmul_precision", f"one of {', '.join(PRECISION_CHOICES)}")
        if not isinstance(self.group_bytes, int) or isinstance(self.group_bytes, bool) or self.group_bytes < 0:
            raise bad("group_bytes", "a non-negative number of bytes")
        for name in ("native", "measure", "whole_encoder_graph", "probe_cache"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise bad("cache_dir", "a path (str) or None")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Config":
        """The defaults overridden by the ``WHISPER_ACCEL_*`` variables of ``environ`` (default:
        the process environment) that are set; an invalid value raises ValueError naming the
        variable."""
        if environ is None:
            return cls()
        values = {f.name: _parse(f.name, environ[ENV[f.name]].strip()) for f in fields(cls)
                  if environ.get(ENV[f.name], "").strip()}
        return cls.defaults().with_(**values)

    @classmethod
    def defaults(cls) -> "Config":
        """Every field at its default, whatever the environment says."""
        return cls(**DEFAULTS)

    def with_(self, **changes) -> "Config":
        """A copy with ``changes`` (validated)."""
        return replace(self, **changes)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _parse(name: str, raw: str):
    var = ENV[name]
    default = DEFAULTS[name]
    if isinstance(default, bool):
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{var}={raw!r}: expected one of 1/0, true/false, on/off, yes/no")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: expected a number of bytes") from None
    if name == "cache_dir":
        return os.path.expanduser(raw)
    return raw.lower()


_lock = threading.Lock()
_active: Optional[Config] = None  # set by patch(config=...), cleared by unpatch()


def current() -> Config:
    """The config in force: the one passed to ``patch(config=...)``, else the environment's
    (an invalid variable there reads as the defaults; ``patch()`` reports it)."""
    with _lock:
        if _active is not None:
            return _active
    try:
        return Config()
    except ValueError:
        return Config.defaults()


def activate(config: Optional[Config]) -> None:
    """Make ``config`` the one in force (None: the environment's again). Called by
    ``patch()`` / ``unpatch()``."""
    global _active
    with _lock:
        _active = config


def cache_directory(config: Optional[Config] = None) -> str:
    """Where probe results, verdicts and kernel builds live for ``config`` (default
    :func:`current`)."""
    config = current() if config is None else config
    if config.cache_dir:
        return os.path.expanduser(config.cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "whisper_accel")
