"""What stack is installed, on which backend, and which kernels it really has.

Versions come from ``importlib.metadata`` (MindNLP 0.5.1's ``__version__`` says ``0.5.0rc2``).
Kernels are found by probing -- running a tiny input through them -- not by version numbers:
MindSpore 2.7 ships ``Conv1DExt`` and ``FlashAttentionScore`` for Ascend only.
Nothing here imports MindSpore until a function that needs it is called. A definite verdict
of a probe in :data:`CACHED_PROBES` is kept on disk per machine and stack
(:mod:`whisper_accel._probe_cache`), so later processes skip the probe (:func:`probe`).

Each patch group declares its :class:`Gates` as data (backends, version specifiers, probes);
:func:`check_gates` is the one place they are checked.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from . import _probe_cache

#: The stack whisper_accel is tested on (see constraints.txt). Outside it: warn, stay stock.
SUPPORTED: Dict[str, SpecifierSet] = {
    "mindspore": SpecifierSet(">=2.5,<2.8"),
    "mindnlp": SpecifierSet(">=0.5,<0.6"),
    "transformers": SpecifierSet(">=4.56,<4.58"),
}

#: A version inside each range (stands in for a package whose metadata could not be read, so
#: that package is reported once, as unreadable, not also as missing).
SUPPORTED_EXAMPLE = {"mindspore": "2.7.0", "mindnlp": "0.5.1", "transformers": "4.57.0"}

#: Package name on PyPI -> distribution names to try (first found wins).
_DISTRIBUTIONS = {"mindspore": ("mindspore",), "mindnlp": ("mindnlp",), "transformers": ("transformers",)}

_MINDNLP_04 = (
    "MindNLP {version} (0.4.x) is installed: it cannot import on any MindSpore that PyPI offers "
    "(2.7+ removed mindspore.common._stub_tensor) and whisper_accel does not patch it. Install "
    "the tested stack: pip install -c constraints.txt 'mindspore==2.7.0' 'mindnlp==0.5.1'."
)
_FIX = "Install the tested stack: pip install -c constraints.txt whisper_accel (see README)."


def installed_version(package: str) -> Optional[str]:
    """The installed version of ``package`` from its distribution metadata, or ``None``."""
    for dist in _DISTRIBUTIONS.get(package, (package,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class Environment:
    """A snapshot of the stack. ``problems`` lists why it cannot be patched (empty: supported)."""

    versions: Dict[str, Optional[str]]
    backend: Optional[str] = None
    problems: List[str] = field(default_factory=list)

    @property
    def supported(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"versions": dict(self.versions), "backend": self.backend,
                "supported": self.supported, "problems": list(self.problems)}


def check_versions(versions: Dict[str, Optional[str]]) -> List[str]:
    """Reasons the given versions are outside :data:`SUPPORTED` (empty when all fit)."""
    problems = []
    for package, spec in SUPPORTED.items():
        found = versions.get(package)
        if found is None:
            problems.append(f"{package} is not installed. {_FIX}")
            continue
        try:
            version = Version(found)
        except InvalidVersion:
            problems.append(f"{package} has an unreadable version {found!r}. {_FIX}")
            continue
        if package == "mindnlp" and version.release[:2] == (0, 4):
            problems.append(_MINDNLP_04.format(version=found))
        elif not spec.contains(version, prereleases=True):
            problems.append(f"{package} {found} is outside the tested range {spec}. {_FIX}")
    return problems


def detect(versions: Optional[Dict[str, Optional[str]]] = None) -> Environment:
    """Read versions, check them, and (only when supported) ask MindSpore for the backend."""
    unreadable = []
    if versions is None:
        versions = {}
        for package in SUPPORTED:
            try:
                versions[package] = installed_version(package)
            except Exception as exc:  # corrupt metadata must not break the caller's import
                versions[package] = None
                unreadable.append((package, f"could not read the installed version of "
                                            f"{package}: {exc!r}. {_FIX}"))
    bad = {package for package, _ in unreadable}
    problems = [why for _, why in unreadable] + check_versions(
        {p: (v if p not in bad else SUPPORTED_EXAMPLE[p]) for p, v in versions.items()})
    env = Environment(versions=dict(versions), problems=problems)
    if env.supported:
        try:
            env.backend = device_target()
        except Exception as exc:  # a broken MindSpore install must not break the caller
            env.problems.append(f"MindSpore could not report its backend: {exc!r}")
    return env


#: Why the graph executors are off while MindSpore's compile cache is on (PROFILE_NOTES section 35).
COMPILE_CACHE = ("MindSpore's compile cache is on (MS_COMPILER_CACHE_ENABLE / enable_compile_cache): it loads "
                 "a process's compiled graphs by their compile order, and whisper_accel's graphs are compiled per "
                 "shape and mode, so a later process can load the wrong graph; the graph executors are not used "
                 "(the host executors are)")


def compile_cache_on() -> bool:
    """MindSpore's compile cache is on, read as MindSpore reads it: the context's
    ``enable_compile_cache``, else ``MS_COMPILER_CACHE_ENABLE=1``."""
    import mindspore

    try:
        value = mindspore.get_context("enable_compile_cache")
    except Exception:  # noqa: BLE001  another MindSpore: only the variable
        value = None
    if value is None:
        value = os.environ.get("MS_COMPILER_CACHE_ENABLE")
    return value is True or value == "1"


def device_target() -> str:
    """``CPU``, ``GPU`` or ``Ascend``: where MindSpore runs operators in this process."""
    import mindspore

    return str(mindspore.get_context("device_target"))


#: The child's exit codes: 0 the kernel ran and was right; 3 MindSpore runs an operator on
#: this device but not this one (a definite "no"); anything else (an import failure, a crash, a
#: device that runs nothing) says nothing about the kernel, so the verdict is not cached.
_CONV1D_PROBE = """
import sys, numpy as np, mindspore
from mindspore import Tensor, mint
mindspore.set_context(device_target=sys.argv[1])
x = Tensor(np.ones((1, 1, 4), np.float32))
if float(mint.add(x, x).asnumpy()[0, 0, 0]) != 2.0:
    sys.exit(4)
try:
    out = mint.nn.functional.conv1d(x, Tensor(np.ones((1, 1, 2), np.float32)))
    ok = tuple(out.shape) == (1, 1, 3) and float(out.asnumpy()[0, 0, 0]) == 2.0
except Exception:
    ok = False
sys.exit(0 if ok else 3)
"""


@functools.lru_cache(maxsize=None)
def probe_native_conv1d() -> Optional[bool]:
    """Does this backend run MindSpore's native conv1d (``mint.nn.functional.conv1d``, the
    ``Conv1DExt`` kernel)? ``None``: the probe could not tell. Memoised per process.

    The probe launches the kernel in a short-lived child process: in PyNative a failed launch
    is reported asynchronously, and in this process it could surface in whatever thread runs
    the next operator (seen: a user's inference thread failing with "Not found op Conv1DExt").
    """
    import subprocess
    import sys

    env = dict(os.environ, GLOG_v="3")
    env.pop("WHISPER_ACCEL", None)
    try:
        proc = subprocess.run([sys.executable, "-c", _CONV1D_PROBE, device_target()], env=env,
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: True, 3: False}.get(proc.returncode)


def probe_fused_attention() -> Optional[bool]:
    """Does this backend run the fused ``FlashAttentionScore`` kernel? ``None``: it is Ascend
    and the kernel raised (not known to be for want of the kernel). Memoised per process."""
    if device_target() != "Ascend":
        return False
    from .kernels.attention import fused_available

    return True if fused_available() else None


#: Probe name -> (function, what a failed probe means). Groups name probes in their gates.
#: A function returns ``True``/``False``, or ``None`` when it could not tell (counts as failed).
PROBES: Dict[str, Tuple[Callable[[], Optional[bool]], str]] = {
    "native_conv1d": (probe_native_conv1d, "no native conv1d kernel (MindSpore's Conv1DExt, an "
                      "Ascend kernel in MindSpore 2.7)"),
    "fused_flash_attention": (probe_fused_attention, "no fused FlashAttentionScore kernel (Ascend)"),
}

#: Probes whose verdict depends only on the stack (the cache key): kept on disk between runs.
CACHED_PROBES = frozenset({"native_conv1d", "fused_flash_attention"})

#: Bump when a cached probe's code changes what it finds: every cached verdict is then stale.
PROBE_CODE_VERSION = 2

_sources: Dict[str, str] = {}  # probe name -> where its last verdict came from (for doctor)


@functools.lru_cache(maxsize=None)
def _machine_and_stack() -> Tuple[Tuple[str, object], ...]:
    """The part of the probe-cache key that cannot change while this process runs (the stack's
    versions come from :func:`detect`, which has read them already)."""
    import platform
    import sys

    from . import __version__

    # The Ascend/CUDA toolkit decides which kernels exist: its resolved path names its version.
    toolkit = next((os.environ[v] for v in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME",
                                            "CUDA_HOME") if os.environ.get(v)), "")
    return (("probe_code", PROBE_CODE_VERSION), ("whisper_accel", __version__),
            ("python", f"{sys.implementation.name} {platform.python_version()}"),
            ("machine", platform.machine()), ("node", platform.node()),
            ("toolkit", os.path.realpath(toolkit) if toolkit else ""))


def probe_cache_key(versions: Optional[Dict[str, Optional[str]]] = None) -> Dict:
    """What a cached verdict is valid for: MindSpore/MindNLP/transformers versions (``versions``
    as :func:`detect` read them, else read now), whisper_accel's version, Python, probe-code
    version, machine (host name, architecture, toolkit), and the backend and device this
    process runs on now."""
    import mindspore

    key = dict(_machine_and_stack())
    key["versions"] = {p: versions[p] if versions and p in versions else installed_version(p)
                       for p in SUPPORTED}
    key["backend"] = device_target()
    try:
        key["device_id"] = int(mindspore.get_context("device_id"))
    except Exception:  # noqa: BLE001  not every build reports one
        key["device_id"] = None
    return key


def probe(name: str, versions: Optional[Dict[str, Optional[str]]] = None) -> bool:
    """The verdict of probe ``name``: from the disk cache when it holds one for this machine
    and stack (:mod:`whisper_accel._probe_cache`), else by running the probe (and storing a
    definite verdict). ``versions``: the stack's, as :func:`detect` read them (else read
    here). Never raises for a cache problem."""
    function, _ = PROBES[name]
    key = None
    if name in CACHED_PROBES and _probe_cache.enabled():
        try:
            key = probe_cache_key(versions)
        except Exception:  # noqa: BLE001  no key, no cache: probe as before
            key = None
        cached = _probe_cache.load(key).get(name) if key is not None else None
        if cached is not None:
            _sources[name] = "from the cache"
            return cached
    verdict = function()
    if verdict is None:
        _sources[name] = "probed; inconclusive, not cached"
    elif key is not None and _probe_cache.store(key, {name: verdict}):
        _sources[name] = "probed; cached"
    else:
        _sources[name] = "probed"
    return bool(verdict)


def probe_cache_info(versions: Optional[Dict[str, Optional[str]]] = None) -> Dict:
    """Where the probe cache is and where each verdict given in this process came from."""
    info = {"enabled": _probe_cache.enabled(), "directory": None, "file": None,
            "sources": dict(_sources)}
    try:
        info["directory"] = str(_probe_cache.directory())
        if info["enabled"]:
            info["file"] = str(_probe_cache.path_for(probe_cache_key(versions)))
    except Exception:  # noqa: BLE001  (no home directory, ...) doctor reports; it does not crash
        pass
    return info


def has_native_conv1d() -> bool:
    """Probe ``native_conv1d`` (disk cache first; see :func:`probe`)."""
    return probe("native_conv1d")


def has_fused_attention() -> bool:
    """Probe ``fused_flash_attention`` (disk cache first; see :func:`probe`)."""
    return probe("fused_flash_attention")


def capabilities(versions: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, bool]:
    """Every probe's verdict (``versions``: as for :func:`probe`)."""
    return {name: probe(name, versions) for name in PROBES}


@dataclass(frozen=True)
class Gates:
    """Where a patch group may apply, as data.

    :param backends: MindSpore device targets it is validated on (empty: every backend).
    :param versions: ``(package, specifier)`` pairs narrowing :data:`SUPPORTED` for this group.
    :param probes: names in :data:`PROBES` that must succeed.
    """

    backends: Tuple[str, ...] = ()
    versions: Tuple[Tuple[str, str], ...] = ()
    probes: Tuple[str, ...] = ()


def check_gates(gates: Gates, env: Environment) -> Optional[str]:
    """Why a group with ``gates`` cannot apply in ``env`` (``None``: it can). Probes run last,
    and only when the cheaper gates pass."""
    if gates.backends and env.backend not in gates.backends:
        return f"validated on {', '.join(gates.backends)} only, not {env.backend}"
    for package, spec in gates.versions:
        found = env.versions.get(package)
        try:
            ok = found is not None and SpecifierSet(spec).contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            return f"needs {package} {spec}, found {found or 'none'}"
    for name in gates.probes:
        if not probe(name, env.versions):
            missing = PROBES[name][1]
            return f"probe {name!r} failed on {env.backend or 'this backend'}: {missing}"
    return None
