"""Which build of the fused kernels (``fused.cc`` on ``simd.h``) this CPU can run.

One source, three variants, widest first (:data:`VARIANTS`):

- ``avx512``: x86-64 with AVX-512 F/BW/VL/DQ (+ FMA, F16C), 16 float lanes;
- ``avx2``: x86-64 with AVX2, FMA and F16C, 8 lanes: the kernels' results of before, bit for bit;
- ``neon``: AArch64 Advanced SIMD, 4 lanes (float16 weights through FCVTL, base ARMv8.0).

:func:`cpu` reads the CPU (``/proc/cpuinfo``, :func:`platform.machine`); :func:`runnable` lists the
variants it can run; :func:`choose` picks the widest, or the one asked for by name (the caller
reads ``WHISPER_ACCEL_ISA``: this module reads no environment). Standard library only.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

AUTO = "auto"


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: ``flags`` select simd.h's branch, ``requires`` are the CPU
    features (``/proc/cpuinfo`` names) that the instructions those flags allow need."""

    name: str  # "avx512", "avx2", "neon"
    arch: str  # "x86_64" or "aarch64" (platform.machine's names)
    flags: Tuple[str, ...]
    requires: FrozenSet[str]


VARIANTS: Tuple[Variant, ...] = (
    Variant("avx512", "x86_64", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
            frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"})),
    Variant("avx2", "x86_64", ("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"})),
    # FCVTL (float16 -> float32) and FMLA are base ARMv8.0 AdvSIMD: no fphp / asimdhp needed
    Variant("neon", "aarch64", ("-march=armv8-a+simd",), frozenset({"fp", "asimd"})),
)

NAMES: Tuple[str, ...] = tuple(v.name for v in VARIANTS)

#: Kernels beyond a variant's own, built into every variant of ``arch`` where the CPU has the
#: ``features``: (arch, features, compiler flag). The flag only switches on ``fused.cc``'s block,
#: whose functions carry their own target attribute; the rest of the build keeps its variant's
#: instructions, so the choice of variant (:mod:`whisper_accel.runtime.native`) never takes them
#: away. The bfloat16 GEMM (``GemmBF16``) needs AVX512_BF16 (and AVX-512 F/BW).
OPTIONAL: Tuple[Tuple[str, FrozenSet[str], str], ...] = (
    ("x86_64", frozenset({"avx512f", "avx512bw", "avx512_bf16"}), "-DWHISPER_ACCEL_BF16"),)


def optional_flags(v: "Variant", c: "Cpu") -> Tuple[str, ...]:
    """The :data:`OPTIONAL` compiler flags a build of ``v`` gets on ``c``."""
    return tuple(flag for arch, features, flag in OPTIONAL if v.arch == arch == c.arch and features <= c.flags)

_MACHINES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


@dataclass(frozen=True)
class Cpu:
    """The CPU as the kernels see it: a model name, the architecture and its feature flags."""

    model: str
    arch: str
    flags: FrozenSet[str]


def _arch(machine: str) -> str:
    m = machine.strip().lower()
    return _MACHINES.get(m, m)


def parse_cpuinfo(text: str, machine: str) -> Cpu:
    """A :class:`Cpu` from ``/proc/cpuinfo``'s text (its first processor) on ``machine``. x86:
    "model name" and "flags"; AArch64: "Features", and "CPU implementer" / "CPU part" (or a
    "model name" / "Hardware" line where the kernel gives one) for the model."""
    arch = _arch(machine)
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    if arch == "aarch64":
        flags = frozenset(fields.get("Features", "").split())
        part = " ".join(f"{k.split()[-1]} {fields[k]}" for k in ("CPU implementer", "CPU part", "CPU variant")
                        if k in fields)
        model = fields.get("model name") or fields.get("Hardware") or (f"ARM ({part})" if part else "")
    else:
        flags = frozenset(fields.get("flags", "").split())
        model = fields.get("model name", "")
    return Cpu(model=model or "unknown", arch=arch, flags=flags)


def cpu(path: str = "/proc/cpuinfo", machine: Optional[str] = None) -> Cpu:
    """This machine's CPU (no flags when ``path`` cannot be read: then nothing is runnable)."""
    machine = machine if machine is not None else platform.machine()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, machine)


def runnable(c: Cpu) -> List[Variant]:
    """The variants ``c`` can run, widest first."""
    return [v for v in VARIANTS if v.arch == c.arch and v.requires <= c.flags]


def choose(c: Cpu, forced: Optional[str] = None) -> Optional[Variant]:
    """The variant to build for ``c``: the one named ``forced`` ("avx512", "avx2", "neon"), else
    (None, "" or "auto") the widest it can run, None when it can run none. ValueError for an
    unknown name, or a named variant that ``c`` cannot run."""
    ok = runnable(c)
    name = (forced or AUTO).strip().lower()
    if name == AUTO:
        return ok[0] if ok else None
    by_name = {v.name: v for v in VARIANTS}
    if name not in by_name:
        raise ValueError(f"unknown kernel instruction set {forced!r}: expected one of {', '.join((AUTO,) + NAMES)}")
    v = by_name[name]
    if v in ok:
        return v
    if v.arch != c.arch:
        why = f"it is for {v.arch}, this CPU is {c.arch}"
    else:
        why = f"the CPU lacks {', '.join(sorted(v.requires - c.flags))}"
    can = ", ".join(x.name for x in ok) or "none"
    raise ValueError(f"kernel instruction set {v.name!r} cannot run on this CPU ({c.model}): {why} "
                     f"(runnable here: {can})")
