"""Whether the fused kernels are usable here, and which build: decided once per kernel
configuration (``native`` on/off, the ``isa`` asked for, the cache directory) and process.

:func:`library` returns a :class:`Library` (path, instruction-set variant, CPU) or None, in which
case only the plain MindSpore graphs run (same results within ~4e-7, slower). None when:
``Config.native`` is off (``WHISPER_ACCEL_NATIVE=0``); no kernel variant runs on this CPU
(:mod:`whisper_accel.kernels.isa`: AVX-512 or AVX2/FMA/F16C on x86-64, NEON on aarch64); no
C++ compiler (``$CXX``, else ``c++``/``g++``); the build fails; or a kernel's check against
numpy fails (:mod:`.kernel_checks`). :func:`state` says which, for ``doctor``, reports and tests.

The library is built by :func:`whisper_accel.kernels.build.build` into ``<cache dir>/native``
(keyed by the sources, flags, compiler, variant and this CPU's model and flags). With
``Config.probe_cache`` off nothing is written to the cache directory: the build goes to one
temporary directory for the process, removed at exit.

This module keeps no switch that turns the kernels off for everyone: a failing launch is a
fault of the engine that ran it (:mod:`.engine`), which falls back for its own model only.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .. import config as _config
from ..kernels import build as kbuild
from ..kernels import isa
from . import kernel_checks

logger = logging.getLogger("whisper_accel")

ENV_SWITCH = _config.ENV["native"]


@dataclass(frozen=True)
class Library:
    """A built and checked kernel library."""

    path: str
    variant: str  # "avx512", "avx2", "neon"
    cpu: str  # the CPU's model name


@dataclass(frozen=True)
class Decision:
    library: Optional[Library]
    reason: Optional[str]  # why there is none


_lock = threading.Lock()
_decisions: Dict[Tuple, Decision] = {}
_tmpdir: Optional[str] = None


def compiler() -> Optional[str]:
    """The C++ compiler: ``$CXX``, else ``c++`` or ``g++`` on the PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("c++") or shutil.which("g++")


def _directory(config: _config.Config) -> Path:
    global _tmpdir
    if config.probe_cache:
        return Path(_config.cache_directory(config)) / "native"
    if _tmpdir is None:
        _tmpdir = tempfile.mkdtemp(prefix="whisper_accel_native_")
        atexit.register(shutil.rmtree, _tmpdir, True)
    return Path(_tmpdir)


def _key(config: _config.Config) -> Tuple:
    return (config.native, config.isa, config.probe_cache, _config.cache_directory(config), os.environ.get("CXX"))


def _decide(config: _config.Config) -> Decision:
    if not config.native:
        return Decision(None, f"{ENV_SWITCH}=0 (Config.native off)")
    cpu = isa.cpu()
    try:
        variant = isa.choose(cpu, config.isa)
    except ValueError as exc:
        return Decision(None, str(exc))
    if variant is None:
        return Decision(None, f"no kernel variant runs on this CPU ({cpu.model}, {cpu.arch}): x86-64 needs AVX2, FMA "
                              "and F16C; aarch64 needs NEON")
    cxx = compiler()
    if cxx is None:
        return Decision(None, "no C++ compiler ($CXX, c++ or g++)")
    try:
        path = str(kbuild.build(_directory(config), cxx, variant, cpu))
        why = kernel_checks.check(path)
    except Exception as exc:  # noqa: BLE001  (any failure: the plain graphs run)
        return Decision(None, f"build or load of the {variant.name} kernels failed: {exc!r}")
    if why is not None:
        return Decision(None, f"the {variant.name} kernels failed their check: {why}")
    return Decision(Library(path, variant.name, cpu.model), None)


def decision(config: Optional[_config.Config] = None) -> Decision:
    """The kernel decision for ``config`` (default: the one in force), made on first use."""
    config = _config.current() if config is None else config
    key = _key(config)
    with _lock:
        hit = _decisions.get(key)
        if hit is None:
            hit = _decisions[key] = _decide(config)
            if hit.reason:
                logger.info("whisper_accel: fused kernels not used (%s); the encoder and decoder steps run "
                            "MindSpore's own operators", hit.reason)
        return hit


def library(config: Optional[_config.Config] = None) -> Optional[Library]:
    """The usable kernel library for ``config``, or None (see :func:`state` for why)."""
    return decision(config).library


def state(config: Optional[_config.Config] = None) -> Dict[str, Optional[str]]:
    """``{"library": path or None, "reason": why not or None, "isa": variant or None, "cpu":
    model or None}`` for ``config`` (decides on first use)."""
    d = decision(config)
    lib = d.library
    return {"library": lib.path if lib else None, "reason": d.reason, "isa": lib.variant if lib else None,
            "cpu": lib.cpu if lib else None}


def fused_graphs(config: Optional[_config.Config] = None):
    """:mod:`whisper_accel.kernels.fused` bound to ``config``'s library (the encoder graphs
    ``ENCODER`` and the step graphs ``DECODER``), or None when there is none. The graphs bind
    one library per process: the first one used."""
    lib = library(config)
    if lib is None:
        return None
    from ..kernels import fused

    fused.configure(lib.path)
    return fused


def reset() -> None:
    """Forget every decision (tests): the next call decides again."""
    with _lock:
        _decisions.clear()
