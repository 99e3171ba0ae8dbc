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

Which variant (:mod:`whisper_accel.kernels.isa`), when the CPU runs several (an AVX-512 CPU
runs ``avx512`` and ``avx2``): with ``isa="auto"``, ``measure`` and ``probe_cache`` on, every
runnable variant is built and checked, then :mod:`.kernel_timing` times each on a decode step's
and an encoder layer's work, interleaved; the widest is kept unless a narrower one is at least
:data:`MARGIN` faster. The verdict is kept in the probe cache (kind ``isa``, keyed by the CPU and
the libraries' file names, which hash the sources, flags and compiler): measured once per
machine and build. Otherwise (a variant named by ``isa``, measuring or the disk cache off) the
widest variant that builds and passes its checks is used, without timing.

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
from typing import Dict, List, Optional, Tuple

from .. import _probe_cache
from .. import config as _config
from ..kernels import build as kbuild
from ..kernels import isa
from . import kernel_checks, kernel_timing

logger = logging.getLogger("whisper_accel")

ENV_SWITCH = _config.ENV["native"]
#: A narrower variant replaces the widest only when its timed workload is at least this
#: fraction faster (below it, the difference is within the timing's noise).
MARGIN = 0.05
#: The probe cache's kind for the measured variant, and its format (bump when the workload or
#: the rule changes).
KIND = "isa"
FORMAT = 2


@dataclass(frozen=True)
class Library:
    """A built and checked kernel library."""

    path: str
    variant: str  # "avx512", "avx2", "neon"
    cpu: str  # the CPU's model name
    bf16_gemm: bool = False  # built with GemmBF16 (Config.matmul_precision="bfloat16")


@dataclass(frozen=True)
class Decision:
    library: Optional[Library]
    reason: Optional[str]  # why there is none
    chosen_by: Optional[str] = None  # how the variant was picked
    seconds: Optional[Dict[str, float]] = None  # each variant's timed workload, when measured


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
    return (config.native, config.isa, config.measure, config.probe_cache, _config.cache_directory(config),
            os.environ.get("CXX"))


def _build_and_check(config: _config.Config, cxx: str, variant: isa.Variant,
                     cpu: isa.Cpu) -> Tuple[Optional[str], Optional[str]]:
    """(the library's path, None), or (None, why it cannot be used)."""
    try:
        path = str(kbuild.build(_directory(config), cxx, variant, cpu))
        why = kernel_checks.check(path)
    except Exception as exc:  # noqa: BLE001  (any failure: the plain graphs run)
        return None, f"build or load of the {variant.name} kernels failed: {exc!r}"
    if why is not None:
        return None, f"the {variant.name} kernels failed their check: {why}"
    return path, None


def _build_all(config: _config.Config, cxx: str, variants: List[isa.Variant], cpu: isa.Cpu) -> None:
    """Build ``variants`` at once (the compilers run in parallel); a failure is left for
    :func:`_build_and_check` to meet and report."""
    from concurrent.futures import ThreadPoolExecutor

    def one(v: isa.Variant) -> None:
        try:
            kbuild.build(_directory(config), cxx, v, cpu)
        except Exception:  # noqa: BLE001  reported by _build_and_check
            pass

    with ThreadPoolExecutor(len(variants)) as pool:
        list(pool.map(one, variants))


def pick(seconds: Dict[str, float], widest: str) -> str:
    """The variant kept: ``widest`` unless another's time is at least :data:`MARGIN` below it."""
    best = min(seconds, key=seconds.get)
    return best if seconds[best] < seconds[widest] * (1.0 - MARGIN) else widest


def _timing_key(cpu: isa.Cpu, built: Dict[str, str]) -> Dict:
    from .. import __version__

    return {"format": FORMAT, "cpu": cpu.model, "arch": cpu.arch, "flags": sorted(cpu.flags),
            "libraries": sorted(os.path.basename(p) for p in built.values()), "whisper_accel": __version__}


def _measured(config: _config.Config, cpu: isa.Cpu, built: Dict[str, str]) -> Tuple[str, str, Optional[Dict]]:
    """(variant, how it was chosen, the timings) among ``built`` (``{name: path}``, widest first)."""
    widest = next(iter(built))
    where = Path(_config.cache_directory(config))
    key = _timing_key(cpu, built)
    entry = _probe_cache.load_entries(key, KIND, where).get("variant")
    if isinstance(entry, dict) and entry.get("variant") in built:
        seconds = entry.get("seconds") if isinstance(entry.get("seconds"), dict) else None
        return entry["variant"], "measured on this machine (from the cache)", seconds
    try:
        seconds = kernel_timing.time_libraries(built)
    except Exception as exc:  # noqa: BLE001  timing is an optimisation: keep the widest
        return widest, f"the widest (timing the variants failed: {exc!r})", None
    name = pick(seconds, widest)
    stored = _probe_cache.store_entries(key, {"variant": {"variant": name, "seconds": seconds}}, KIND, where)
    logger.info("whisper_accel: kernel variants timed on this CPU: %s; using %s", seconds, name)
    return name, "measured on this machine" + ("; cached" if stored else ""), seconds


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
    runnable = isa.runnable(cpu)
    forced = config.isa != isa.AUTO  # Config validates it: one of config.ISA_CHOICES
    candidates = [variant] if forced else runnable
    # timed: several to choose from, and the disk cache to keep the verdict (without it every
    # process would build and time them all)
    timed = not forced and len(runnable) > 1 and config.measure and config.probe_cache
    if timed:
        _build_all(config, cxx, candidates, cpu)
    built: Dict[str, str] = {}
    failures: List[str] = []
    for v in candidates:  # widest first; without timing, the first that passes is used
        path, why = _build_and_check(config, cxx, v, cpu)
        if why is not None:
            failures.append(why)
            continue
        built[v.name] = path
        if not timed:
            break
    if not built:
        return Decision(None, "; ".join(failures))
    seconds = None
    if forced:
        name, how = variant.name, f"named by Config.isa ({_config.ENV['isa']})"
    elif len(built) > 1:
        name, how, seconds = _measured(config, cpu, built)
    else:
        name = next(iter(built))
        how = ("the only variant this CPU runs" if len(runnable) == 1
               else "the only variant that passed its checks" if timed
               else "the widest that passes its checks (not timed: measure or probe_cache off)")
    if failures:
        how += f"; not used: {'; '.join(failures)}"
    path = built[name]
    return Decision(Library(path, name, cpu.model, kernel_checks.has_bf16_gemm(path)), None, how, seconds)


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
    model or None, "chosen_by": how the variant was picked, "seconds": {variant: seconds of the
    timed workload} or None, "bf16_gemm": whether the library has the bfloat16 products
    (``Config.matmul_precision="bfloat16"``)}`` for ``config`` (decides on first use)."""
    d = decision(config)
    lib = d.library
    return {"library": lib.path if lib else None, "reason": d.reason, "isa": lib.variant if lib else None,
            "cpu": lib.cpu if lib else None, "chosen_by": d.chosen_by, "seconds": d.seconds,
            "bf16_gemm": bool(lib) and lib.bf16_gemm}


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
