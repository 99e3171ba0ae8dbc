"""Build the fused kernels (``fused.cc`` + ``simd.h``) for one :class:`~.isa.Variant` into a cache
directory. Standard library only.

The library is ``directory/fused-<variant>-<hash>.so``, the hash over the sources, every flag,
the compiler's ``--version``, the variant and the CPU (model, architecture, feature flags): a
library built on another CPU, with another compiler or from another source is never picked up.
It is compiled to a temporary file in the same directory and renamed into place (safe when
several processes build at once); a failed or timed-out build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .isa import Cpu, Variant, optional_flags

KERNELS = Path(__file__).resolve().parent
#: the files a build reads (fused.cc includes simd.h); the first is the one compiled
SOURCES: Tuple[Path, ...] = (KERNELS / "fused.cc", KERNELS / "simd.h")
COMMON_FLAGS: Tuple[str, ...] = ("-O3", "-shared", "-fPIC", "-std=c++14", "-pthread")
TIMEOUT_S = 180


def flags(variant: Variant, extra_flags: Sequence[str] = (), cpu: Optional[Cpu] = None) -> Tuple[str, ...]:
    """The compiler flags of a build: the common ones, the variant's, the optional extensions
    ``cpu`` has (:func:`~.isa.optional_flags`), then ``extra_flags``."""
    optional = optional_flags(variant, cpu) if cpu is not None else ()
    return COMMON_FLAGS + tuple(variant.flags) + optional + tuple(extra_flags)


def compiler_version(cxx: str) -> str:
    """``cxx --version``'s output (RuntimeError when it does not run)."""
    try:
        return subprocess.run([cxx, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run the C++ compiler {cxx!r}: {e}") from e


def digest(variant: Variant, cpu: Cpu, version: str, extra_flags: Sequence[str] = ()) -> str:
    """The cache key (16 hex digits) of a build."""
    h = hashlib.sha256()

    def part(b: bytes) -> None:  # length-prefixed: no two field lists hash alike
        h.update(len(b).to_bytes(8, "little") + b)

    for src in SOURCES:
        part(src.name.encode())
        part(src.read_bytes())
    part("\0".join(flags(variant, extra_flags, cpu)).encode())
    part(version.encode())
    part(variant.name.encode())
    part(cpu.model.encode())
    part(cpu.arch.encode())
    part(" ".join(sorted(cpu.flags)).encode())
    return h.hexdigest()[:16]


def library_path(directory: Path, cxx: str, variant: Variant, cpu: Cpu, extra_flags: Sequence[str] = ()) -> Path:
    """Where :func:`build` puts (or finds) this build's library; builds nothing."""
    key = digest(variant, cpu, compiler_version(cxx), extra_flags)
    return Path(directory) / f"fused-{variant.name}-{key}.so"


def build(directory: Path, cxx: str, variant: Variant, cpu: Cpu, extra_flags: Sequence[str] = ()) -> Path:
    """The kernels' shared library for ``variant`` on ``cpu``, compiled with ``cxx`` into
    ``directory`` when not there yet; its path. RuntimeError (with the end of the compiler's
    output) when the compiler fails, cannot run or takes over 180 s."""
    directory = Path(directory)
    target = library_path(directory, cxx, variant, cpu, extra_flags)
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=str(directory))
    os.close(fd)
    try:
        cmd = [cxx, *flags(variant, extra_flags, cpu), str(SOURCES[0]), "-o", tmp]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise RuntimeError(f"{cxx} took over {TIMEOUT_S} s building the {variant.name} kernels: "
                               f"{out.strip()[-500:]}") from None
        except OSError as e:
            raise RuntimeError(f"cannot run the C++ compiler {cxx!r}: {e}") from e
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed building the {variant.name} kernels: {proc.stdout.strip()[-500:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
