"""The fused kernels for each instruction set from one source (issue #25): ``kernels/isa.py``
picks a variant for the CPU, ``kernels/build.py`` builds ``fused.cc`` on ``simd.h`` for it, and
every variant this machine can run (and AArch64 NEON, cross-built and run under qemu-user)
passes the kernel checks (native.check's inputs and tolerance, check_half's and check_host's
bit-for-bit pairs). The AVX2 build gives the kernels' results of before simd.h bit for bit
(tests/fixtures/kernels_avx2_reference.npz); the wider ones stay within 1e-6 of it.

No MindSpore: the kernels are called through ctypes (tests/fixtures/kernel_checks.py)."""

from __future__ import annotations

import ctypes
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fixtures import kernel_checks as kc
from whisper_accel.kernels import build, isa

CPU = isa.cpu()
RUNNABLE = isa.runnable(CPU)
NAMES = [v.name for v in RUNNABLE]


def _which(name):
    return shutil.which(name) if name else None


CXX = _which(os.environ.get("CXX")) or _which("c++") or _which("g++")
CROSS = _which("aarch64-linux-gnu-g++")
QEMU = _which("qemu-aarch64") or _which("qemu-aarch64-static")
NEON = next(v for v in isa.VARIANTS if v.name == "neon")
NEON_NATIVE = CPU.arch == "aarch64"  # on AArch64 the neon build runs here, through ctypes

X86 = isa.Cpu("Test CPU", "x86_64", frozenset("fpu sse2 avx fma f16c avx2".split()))
X86_512 = replace(X86, flags=X86.flags | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})
ARM = isa.Cpu("ARM (implementer 0x41 part 0xd0c)", "aarch64", frozenset("fp asimd evtstrm aes crc32".split()))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every build this file needs, started at once (the compilers run in parallel): name ->
    future of a library path (or, for "neon-driver", of the cross-built driver's path)."""
    if CXX is None:
        pytest.skip("no C++ compiler ($CXX, c++, g++)")
    directory = tmp_path_factory.mktemp("kernels")
    pool = ThreadPoolExecutor(3)
    jobs = {v.name: pool.submit(build.build, directory, CXX, v, CPU) for v in RUNNABLE}
    if CROSS and QEMU and not NEON_NATIVE:
        jobs["neon-driver"] = pool.submit(_cross_build_driver, directory)
    yield jobs
    pool.shutdown(wait=True)


def _cross_build_driver(directory: Path) -> Path:
    """fused.cc + tests/fixtures/kernel_driver.cc, static, for AArch64 with the neon flags."""
    import subprocess

    exe = directory / "kernel_driver-aarch64"
    common = [f for f in build.COMMON_FLAGS if f not in ("-shared", "-fPIC")]
    proc = subprocess.run([CROSS, *common, *NEON.flags, "-static", str(build.SOURCES[0]), str(kc.DRIVER), "-o",
                           str(exe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:]
    return exe


@pytest.fixture(scope="module")
def suite():
    return kc.suite()


@pytest.fixture(scope="module")
def results(builds, suite):
    """variant name -> its outputs on the suite (computed once per variant)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = kc.run_ctypes(str(builds[name].result()), suite)
        return cache[name]

    return get


# --- isa: reading the CPU and choosing ---

def test_this_cpu():
    assert CPU.arch == isa._arch(__import__("platform").machine())
    assert CPU.model and CPU.flags, CPU
    assert isa.choose(CPU) == isa.choose(CPU, "auto") == (RUNNABLE[0] if RUNNABLE else None)
    for v in RUNNABLE:
        assert isa.choose(CPU, v.name) is v


def test_parse_cpuinfo():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n" \
          "flags\t\t: fpu avx2 fma f16c avx512f\n\n" \
          "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    c = isa.parse_cpuinfo(x86, "x86_64")
    assert c == isa.Cpu("AMD EPYC 9B14", "x86_64", frozenset({"fpu", "avx2", "fma", "f16c", "avx512f"}))
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull\nCPU implementer\t: 0x41\n" \
          "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n"
    c = isa.parse_cpuinfo(arm, "arm64")
    assert c.arch == "aarch64" and c.flags == {"fp", "asimd", "evtstrm", "aes", "pmull"}
    assert "0xd0c" in c.model and "0x41" in c.model
    assert isa.cpu("/nonexistent/cpuinfo", "x86_64") == isa.Cpu("unknown", "x86_64", frozenset())


def test_runnable_and_choose():
    assert [v.name for v in isa.VARIANTS] == ["avx512", "avx2", "neon"]  # widest first
    assert [v.name for v in isa.runnable(X86)] == ["avx2"]
    assert [v.name for v in isa.runnable(X86_512)] == ["avx512", "avx2"]
    assert [v.name for v in isa.runnable(ARM)] == ["neon"]
    assert isa.choose(X86_512).name == "avx512" and isa.choose(X86_512, "avx2").name == "avx2"
    assert isa.choose(X86_512, " AVX2 ").name == "avx2" and isa.choose(X86_512, "").name == "avx512"
    assert isa.choose(ARM).name == "neon"
    bare = isa.Cpu("old", "x86_64", frozenset({"sse2", "avx"}))
    assert isa.runnable(bare) == [] and isa.choose(bare) is None and isa.choose(bare, "auto") is None
    assert isa.choose(isa.Cpu("?", "riscv64", frozenset())) is None


@pytest.mark.parametrize("cpu, forced, words", [
    (X86, "avx512", ["avx512", "lacks", "avx512bw", "avx512dq", "avx512f", "avx512vl", "runnable here: avx2"]),
    (X86, "neon", ["neon", "aarch64", "x86_64"]),
    (ARM, "avx2", ["avx2", "x86_64", "aarch64", "runnable here: neon"]),
    (isa.Cpu("old", "x86_64", frozenset({"avx"})), "avx2", ["avx2", "lacks", "avx2, f16c, fma", "none"]),
    (X86_512, "sse9", ["unknown", "sse9", "auto", "avx512", "avx2", "neon"]),
])
def test_forced_variant_the_cpu_cannot_run(cpu, forced, words):
    with pytest.raises(ValueError) as e:
        isa.choose(cpu, forced)
    for w in words:
        assert w in str(e.value), str(e.value)


# --- build: the cache key, failures ---

def test_cache_key():
    avx2, avx512 = (next(v for v in isa.VARIANTS if v.name == n) for n in ("avx2", "avx512"))
    key = lambda *a, **k: build.digest(*a, **k)  # noqa: E731
    base = key(avx2, X86_512, "g++ 12.2")
    assert base == key(avx2, isa.Cpu(X86_512.model, X86_512.arch, frozenset(sorted(X86_512.flags))), "g++ 12.2")
    assert len(base) == 16 and int(base, 16) >= 0
    others = [key(avx512, X86_512, "g++ 12.2"),  # another variant
              key(avx2, X86, "g++ 12.2"),  # another CPU: flags
              key(avx2, replace(X86_512, model="Intel Xeon"), "g++ 12.2"),  # model
              key(avx2, replace(X86_512, arch="aarch64"), "g++ 12.2"),
              key(avx2, X86_512, "g++ 13.1"),  # compiler
              key(avx2, X86_512, "g++ 12.2", ("-g",))]  # flags
    assert len({base, *others}) == 1 + len(others)
    assert build.flags(avx2) == ("-O3", "-shared", "-fPIC", "-std=c++14", "-pthread", "-mavx2", "-mfma", "-mf16c")
    assert [p.name for p in build.SOURCES] == ["fused.cc", "simd.h"] and all(p.is_file() for p in build.SOURCES)


def test_the_bf16_gemm_is_built_into_every_x86_variant_where_the_cpu_has_it():
    """``isa.optional_flags``: on an x86 CPU with AVX512_BF16 every x86 variant (the measured
    choice may keep avx2) gets ``-DWHISPER_ACCEL_BF16``; without it, or on AArch64, none do."""
    avx2, avx512, neon = (next(v for v in isa.VARIANTS if v.name == n) for n in ("avx2", "avx512", "neon"))
    bf16 = replace(X86_512, flags=X86_512.flags | {"avx512_bf16"})
    assert isa.optional_flags(avx2, bf16) == isa.optional_flags(avx512, bf16) == ("-DWHISPER_ACCEL_BF16",)
    assert build.flags(avx2, (), bf16)[-1] == "-DWHISPER_ACCEL_BF16"
    assert isa.optional_flags(avx512, X86_512) == isa.optional_flags(avx2, X86) == ()
    assert isa.optional_flags(neon, isa.Cpu("arm", "aarch64", frozenset({"asimd", "avx512_bf16"}))) == ()


@pytest.mark.skipif(CXX is None or not RUNNABLE, reason="no C++ compiler, or no variant for this CPU")
def test_build_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError) as e:
        build.build(tmp_path, CXX, RUNNABLE[-1], CPU, extra_flags=("-fno-such-option-whisper",))
    assert "no-such-option-whisper" in str(e.value) and len(str(e.value)) < 700
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        build.build(tmp_path, str(tmp_path / "no-compiler"), RUNNABLE[-1], CPU)


# --- the variants this machine runs ---

@pytest.mark.parametrize("name", NAMES)
def test_variant_builds_and_passes_checks(builds, results, suite, name):
    path = builds[name].result()
    assert path.parent.is_dir() and path.name.startswith(f"fused-{name}-") and path.suffix == ".so"
    assert build.build(path.parent, CXX, isa.choose(CPU, name), CPU) == path  # the cache: no rebuild
    lib = ctypes.CDLL(str(path))
    lib.KernelISA.restype = ctypes.c_char_p
    assert lib.KernelISA().decode() == name  # the flags reached simd.h's branch
    assert lib.KernelLanes() == {"avx512": 16, "avx2": 8, "neon": 4}[name]
    assert kc.problems(suite, results(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_the_worker_pool_serves_threads_at_once_and_a_forked_child(builds, name):
    """The kernels' parts run on worker threads kept for the process (fused.cc's Pool): calls
    from several threads at once (one takes the pool, the others start threads of their own),
    and calls from a child forked after the pool was made (its own pool), give the results of
    one call alone."""
    lib = ctypes.CDLL(str(builds[name].result()))
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((1, 200)).astype(np.float32), rng.standard_normal((3000, 200)).astype(np.float32)

    def once():
        y = np.zeros((1, 3000), np.float32)
        kc.call_ctypes(lib, "RowsMatMul", [x, w, y])
        return y

    want = once()
    assert kc.rel_err(want, x.astype(np.float64) @ w.T.astype(np.float64)) < 1e-5
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: [once() for _ in range(20)], range(4)))
    assert all(np.array_equal(y, want) for ys in got for y in ys)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when its calls agree (no pytest machinery here)
        ok = all(np.array_equal(once(), want) for _ in range(5))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert np.array_equal(once(), want)


@pytest.mark.skipif("avx2" not in NAMES, reason="this CPU cannot run the avx2 variant")
def test_avx2_bit_for_bit_the_kernels_of_before(results, suite):
    labels, want = kc.load_reference()
    assert labels == [c.label for c in suite.calls], "the suite changed: regenerate the reference (kernel_checks.py)"
    got = results("avx2")
    differ = [c.label for c, g, w in zip(suite.calls, got, want)
              if len(g) != len(w) or not all(np.array_equal(a, b) for a, b in zip(g, w))]
    assert differ == []


def _close_to_avx2(suite, got, avx2):
    """The largest difference from the AVX2 results, relative to each output's largest value."""
    return max(kc.rel_err(a, b.astype(np.float64)) for g, w in zip(got, avx2) for a, b in zip(g, w))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "avx2"])
def test_wider_variant_within_1e6_of_avx2(results, suite, name):
    if "avx2" not in NAMES:
        pytest.skip("no avx2 build here to compare with")
    # only the order of a row's horizontal sums differs (LayerNorm, softmax's sum, RowsMatMul)
    assert _close_to_avx2(suite, results(name), results("avx2")) < 1e-6


@pytest.mark.skipif(NEON_NATIVE, reason="on AArch64 the neon variant is checked natively above")
@pytest.mark.skipif(CROSS is None or QEMU is None,
                    reason="AArch64 NEON not checked: needs aarch64-linux-gnu-g++ and qemu-aarch64 "
                           "(apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_neon_under_qemu(builds, results, suite, tmp_path):
    exe = builds["neon-driver"].result()
    env = dict(os.environ, WHISPER_ACCEL_KERNEL_THREADS="3")  # several threads, whatever this machine has
    got = kc.run_driver([QEMU, str(exe)], suite, tmp_path, env=env)
    assert kc.problems(suite, got) == []  # 1e-5 of float64, and the bit-for-bit pairs
    if "avx2" in NAMES:
        assert _close_to_avx2(suite, got, results("avx2")) < 1e-6
