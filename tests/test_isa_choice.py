"""Which kernel variant a CPU that runs several uses (``runtime/native.py``, ``runtime/kernel_timing.py``;
issue #25): with ``isa="auto"``, ``measure`` and ``probe_cache`` on, every runnable variant is built,
checked and timed on the same workload, the widest kept unless a narrower one is at least
``native.MARGIN`` faster, and the verdict kept on disk. Otherwise the widest that passes its checks,
untimed.

The rule's tests fake the CPU, the builds and the timings (they run on any machine: an AVX2-only one
included); the real tests time the libraries this machine builds."""

import ctypes
import os
from dataclasses import replace

import pytest

pytest.importorskip("mindnlp")

from whisper_accel.config import Config  # noqa: E402
from whisper_accel.kernels import isa  # noqa: E402
from whisper_accel.runtime import kernel_timing, native  # noqa: E402

X86 = isa.Cpu("Test CPU", "x86_64", frozenset("fpu sse2 avx fma f16c avx2".split()))
X86_512 = replace(X86, flags=X86.flags | {"avx512f", "avx512bw", "avx512vl", "avx512dq"})


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake machine: ``fake.cpu`` (default AVX-512), builds that "pass" unless named in
    ``fake.failing``, timings ``fake.seconds`` (or ``fake.timing_error``); what was built and
    timed is recorded. ``fake.config(**changes)``: defaults with the cache in ``tmp_path``."""

    class Fake:
        cpu = X86_512
        failing = {}
        seconds = {"avx512": 1.0, "avx2": 1.0}
        timing_error = None

        def __init__(self):
            self.built, self.timed = [], []

        def config(self, **changes):
            return Config.defaults().with_(cache_dir=str(tmp_path), **changes)

        def decide(self, **changes):
            native.reset()
            return native.decision(self.config(**changes))

    f = Fake()

    def build_and_check(config, cxx, variant, cpu):
        f.built.append(variant.name)
        if variant.name in f.failing:
            return None, f"the {variant.name} kernels failed their check: {f.failing[variant.name]}"
        return f"/fake/fused-{variant.name}-{cpu.model.replace(' ', '')}.so", None

    def time_libraries(libraries):
        f.timed.append(dict(libraries))
        if f.timing_error:
            raise f.timing_error
        return {n: f.seconds[n] for n in libraries}

    monkeypatch.setattr(native.isa, "cpu", lambda: f.cpu)
    monkeypatch.setattr(native, "compiler", lambda: "c++")
    monkeypatch.setattr(native, "_build_and_check", build_and_check)
    monkeypatch.setattr(native, "_build_all", lambda config, cxx, variants, cpu: None)
    monkeypatch.setattr(native.kernel_timing, "time_libraries", time_libraries)
    native.reset()
    yield f
    native.reset()


@pytest.mark.parametrize("seconds, kept", [
    ({"avx512": 1.0, "avx2": 1.0}, "avx512"),
    ({"avx512": 1.0, "avx2": 0.97}, "avx512"),  # within the margin: the widest
    ({"avx512": 1.0, "avx2": 0.90}, "avx2"),
    ({"avx512": 0.80, "avx2": 1.0}, "avx512"),
], ids=["equal", "within-margin", "narrower-faster", "widest-faster"])
def test_the_widest_is_kept_unless_a_narrower_is_clearly_faster(fake, seconds, kept):
    assert native.pick(seconds, "avx512") == kept
    fake.seconds = seconds
    d = fake.decide()
    assert fake.built == ["avx512", "avx2"] and fake.timed == [{"avx512": "/fake/fused-avx512-TestCPU.so",
                                                                  "avx2": "/fake/fused-avx2-TestCPU.so"}]
    assert d.library.variant == kept and d.library.path == f"/fake/fused-{kept}-TestCPU.so"
    assert d.seconds == seconds and d.chosen_by == "measured on this machine; cached"


def test_the_verdict_is_kept_on_disk_for_this_cpu_and_these_builds(fake, tmp_path):
    fake.seconds = {"avx512": 1.0, "avx2": 0.5}
    assert fake.decide().library.variant == "avx2"
    files = list(tmp_path.glob(f"{native.KIND}-*.json"))
    assert len(files) == 1
    again = fake.decide()  # a new process, as far as the decision goes
    assert again.library.variant == "avx2" and len(fake.timed) == 1
    assert again.chosen_by == "measured on this machine (from the cache)" and again.seconds == fake.seconds
    native.reset()
    assert native.state(fake.config())["chosen_by"] == again.chosen_by
    fake.cpu = replace(X86_512, model="Another CPU")  # another CPU (and so other builds): timed anew
    assert fake.decide().chosen_by == "measured on this machine; cached" and len(fake.timed) == 2
    files[0].write_text("{")  # a corrupt file reads as none: timed anew, rewritten
    fake.cpu = X86_512
    assert fake.decide().library.variant == "avx2" and len(fake.timed) == 3
    assert fake.decide().chosen_by.endswith("(from the cache)") and len(fake.timed) == 3


@pytest.mark.parametrize("changes, how", [
    ({"isa": "avx2"}, "named by Config.isa (WHISPER_ACCEL_ISA)"),
    ({"isa": "avx512"}, "named by Config.isa (WHISPER_ACCEL_ISA)"),
    ({"measure": False}, "the widest that passes its checks (not timed: measure or probe_cache off)"),
    ({"probe_cache": False}, "the widest that passes its checks (not timed: measure or probe_cache off)"),
], ids=["forced-avx2", "forced-avx512", "measure-off", "probe-cache-off"])
def test_no_timing_where_the_variant_is_named_or_measuring_is_off(fake, changes, how):
    fake.seconds = {"avx512": 1.0, "avx2": 0.1}
    d = fake.decide(**changes)
    want = changes.get("isa", "avx512")
    assert d.library.variant == want and fake.built == [want] and fake.timed == []
    assert d.chosen_by == how and d.seconds is None


def test_a_cpu_with_one_variant_builds_and_times_nothing_else(fake):
    fake.cpu = X86  # AVX2 only
    d = fake.decide()
    assert d.library.variant == "avx2" and fake.built == ["avx2"] and fake.timed == []
    assert d.chosen_by == "the only variant this CPU runs"


@pytest.mark.parametrize("measure", [True, False], ids=["timed", "untimed"])
def test_a_variant_failing_its_check_is_never_used(fake, measure):
    fake.failing = {"avx512": "kernel BiasGelu differs from its reference by 1.0e-02"}
    d = fake.decide(measure=measure)
    assert d.library.variant == "avx2" and fake.built == ["avx512", "avx2"] and fake.timed == []
    assert "not used: the avx512 kernels failed their check: kernel BiasGelu" in d.chosen_by
    fake.failing = {"avx512": "x", "avx2": "y"}
    d = fake.decide(measure=measure)
    assert d.library is None
    assert d.reason == "the avx512 kernels failed their check: x; the avx2 kernels failed their check: y"


def test_a_timing_that_fails_keeps_the_widest(fake):
    fake.timing_error = RuntimeError("a fused kernel refused its arguments")
    d = fake.decide()
    assert d.library.variant == "avx512" and d.seconds is None
    assert "the widest (timing the variants failed" in d.chosen_by and "refused" in d.chosen_by


# --- the real kernels of this machine ---

def test_the_workload_runs_every_kernel_of_each_library(fused_library):
    cases = kernel_timing.workload(d_model=64, heads=2, ffn=128, layers=3, slots=16, frames=30, vocab=256,
                                   attention_frames=20)
    assert [[c.kernel for c in case.calls] for case in cases] == [["DecoderLayer"] * 3 + ["RowsMatMul"]] * 2 + [
        ["Attention"]]
    assert [case.calls[0].inputs[0].shape[0] for case in cases[:2]] == [1, 5]  # greedy, 5 beams
    calls = ctypes.CDLL(fused_library).DecoderLayerCalls
    calls.restype = ctypes.c_longlong
    before = calls()
    ticks = iter(range(10 ** 6))
    seconds = kernel_timing.time_libraries({"a": fused_library, "b": fused_library}, cases, rounds=2,
                                           clock=lambda: float(next(ticks)))
    # each case is timed as a whole: one tick on this clock, its fastest round 1, times its weight
    # (a 30 s window: 50 greedy steps, 10 of 5 rows, the attention once a layer)
    assert [c.weight for c in cases] == [50.0, 10.0, 3.0]
    assert seconds == {"a": 63.0, "b": 63.0}
    assert calls() - before == 2 * 2 * 3 * (1 + 2)  # 2 libraries, 2 cases of 3 layers, a warm-up + 2 rounds


def test_this_machine_times_the_variants_it_runs(fused_library, clean_env, tmp_path, monkeypatch):
    """On a CPU that runs several variants (AVX-512 x86: avx512 and avx2) each is built, checked and
    timed, and the verdict follows :func:`native.pick`; on one that runs one, nothing is timed."""
    clean_env.setenv("WHISPER_ACCEL_CACHE_DIR", str(tmp_path))
    config = Config.from_env(os.environ)
    runnable = [v.name for v in isa.runnable(isa.cpu())]
    native.reset()
    try:
        state = native.state(config)
        assert state["library"] and state["reason"] is None
        if len(runnable) == 1:
            assert state["chosen_by"] == "the only variant this CPU runs" and state["seconds"] is None
            assert not list(tmp_path.glob(f"{native.KIND}-*.json"))
            return
        assert set(state["seconds"]) == set(runnable) and all(s > 0 for s in state["seconds"].values())
        assert state["isa"] == native.pick(state["seconds"], runnable[0])
        assert state["chosen_by"] == "measured on this machine; cached"
        assert sorted(p.name.split("-")[1] for p in tmp_path.glob("native/fused-*.so")) == sorted(runnable)
        native.reset()

        def no_timing(*a, **k):
            raise AssertionError("timed again")

        monkeypatch.setattr(kernel_timing, "time_libraries", no_timing)
        again = native.state(config)
        assert again["isa"] == state["isa"] and again["chosen_by"].endswith("(from the cache)")
    finally:
        native.reset()
