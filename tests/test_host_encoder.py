"""The encoder on the host (runtime/host_encoder.py): numpy's GEMM and the fused kernels through
ctypes, against stock and the encoder graphs, and every way it can be unusable or fail leaves
the graphs with the same results."""

from __future__ import annotations

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)

import whisper_accel  # noqa: E402
from conftest import build_model, features, rel_diff  # noqa: E402
from whisper_accel import config  # noqa: E402
from whisper_accel.config import Config  # noqa: E402
from whisper_accel.runtime import host_calls, host_encoder, kernel_checks, native  # noqa: E402
from whisper_accel.runtime.binding import ATTR  # noqa: E402


def _config(**changes) -> Config:
    """This session's config from the environment (its cache directory: never the user's) with
    ``changes``. A bare ``Config(...)`` would build the kernels in ~/.cache/whisper_accel."""
    return Config.from_env().with_(**changes)


#: The host encoder wherever it can run (``auto`` measures it against the fused graphs).
HOST = _config(encoder="host")


@pytest.fixture(scope="module")
def model():
    return build_model(seed=8)


@pytest.fixture(autouse=True)
def _kernels(fused_library):
    """Every test here runs the fused kernels (skips only where they are switched off or their
    prerequisites are missing; fails where they should work)."""
    return fused_library


def _host(eng):
    """The engine's HostEncoder (None before its first call, or when it cannot be built)."""
    return eng.engine.executors["host"].impl


def _encode(model, feats, fresh=True):
    if fresh:
        model.model.encoder.__dict__.pop(ATTR, None)
    with torch.no_grad():
        out = model.model.encoder(feats).last_hidden_state.asnumpy()
    return out, model.model.encoder.__dict__[ATTR]


@pytest.mark.parametrize("batch", [1, 2])
def test_the_host_encoder_equals_stock_and_the_graphs(model, batch):
    feats = features(batch, seed=30)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    with whisper_accel.patched(config=HOST):
        host, eng = _encode(model, feats)
        assert eng.executor == "host" and _host(eng).calls == 1
        again, _ = _encode(model, feats, fresh=False)  # the kept buffers, a second call
        assert _host(eng).calls == 2
        config.activate(_config(encoder="fused"))
        graphs, eng = _encode(model, feats)
        assert eng.executor == "fused"
    assert host.shape == stock.shape == (batch, 1500, 384)
    assert rel_diff(host, stock) < 1e-4
    assert rel_diff(host, graphs) < 1e-5
    assert np.array_equal(host, again)


def test_batch_sizes_alternate_on_one_model(model):
    """The work arrays are per batch size: 1, 2, 1 give each batch's own result."""
    one, two = features(1, seed=31), features(2, seed=32)
    with whisper_accel.patched(config=HOST):
        a, eng = _encode(model, one)
        b, _ = _encode(model, two, fresh=False)
        c, _ = _encode(model, one, fresh=False)
        assert eng.executor == "host" and _host(eng).calls == 3
    assert np.array_equal(a, c)
    with torch.no_grad():
        stock = model.model.encoder(two).last_hidden_state.asnumpy()
    assert rel_diff(b, stock) < 1e-4


def test_a_half_precision_model_encodes_on_the_host_from_its_float32_copy():
    half = build_model(seed=9).to(torch.float16)
    feats = features(1, seed=33).to(torch.float16)
    with whisper_accel.patched(config=HOST):
        out, eng = _encode(half, feats)
    assert eng.executor == "host" and out.dtype == np.float16
    same = build_model(seed=9)
    same.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    with torch.no_grad():
        want = same.model.encoder(feats.float()).last_hidden_state.asnumpy()
    assert rel_diff(out.astype(np.float32), want) < 1e-3  # the output's float16 rounding


def test_weights_it_cannot_read_keep_the_graphs(model, monkeypatch):
    feats = features(1, seed=34)
    monkeypatch.setattr(host_calls, "same", lambda view, t: False)  # no view reads its tensor
    with whisper_accel.patched(config=HOST):
        out, eng = _encode(model, feats)
    assert _host(eng) is None and eng.executor == "fused"
    assert set(eng.engine.faults) == {"host"} and eng.engine.faults["host"].startswith("unavailable")
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    assert rel_diff(out, stock) < 1e-4


def test_it_takes_only_whisper_shaped_features(model):
    with whisper_accel.patched(config=HOST):
        _, eng = _encode(model, features(1, seed=35))
    enc = _host(eng)
    assert enc.fits((1, 80, 3000)) and enc.fits((3, 80, 3000))
    assert not enc.fits((1, 80, 2998)) and not enc.fits((1, 128, 3000)) and not enc.fits((80, 3000))


def test_the_fixed_rule_runs_it_where_the_graphs_would_take_several_launches(model):
    """``auto`` without measuring (the rule, also a measured case's first call): tiny's four
    layers are one fused graph launch, so they stay there; with a budget of one layer a launch
    they run on the host; with the whole encoder in one graph, fused again."""
    feats = features(1, seed=37)
    with whisper_accel.patched(config=_config(encoder="auto", measure=False)):
        one_graph, eng = _encode(model, feats)
        assert eng.executor == "fused" and eng.layers_per_launch == 4 and eng.choice is None
        config.activate(_config(encoder="auto", measure=False, group_bytes=0))
        host, eng = _encode(model, feats)
        assert eng.executor == "host" and eng.layers_per_launch is None
        config.activate(_config(encoder="auto", measure=False, group_bytes=0, whole_encoder_graph=True))
        whole, eng = _encode(model, feats)
        assert eng.executor == "fused" and eng.layers_per_launch == 4
    assert rel_diff(host, one_graph) < 1e-5 and rel_diff(whole, one_graph) < 1e-6


def test_a_failing_host_encoder_falls_back_to_the_next_executor(model, monkeypatch, fused_library):
    """The host encoder's fault is this engine's: the fused graphs run the call (and the next
    ones); the kernels stay on for the process."""
    feats = features(1, seed=36)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()

    def broken(self, feats):
        raise RuntimeError("injected host encoder failure")

    monkeypatch.setattr(host_encoder.HostEncoder, "__call__", broken)
    with whisper_accel.patched(config=HOST):
        out, eng = _encode(model, feats)
        again, _ = _encode(model, feats, fresh=False)
    assert eng.executor == "fused" and set(eng.engine.faults) == {"host"}
    assert eng.engine.faults["host"].startswith("fault in encode")
    assert "injected host encoder failure" in eng.engine.faults["host"]
    assert native.state()["library"] is not None  # the kernels stay on for the process
    assert rel_diff(out, stock) < 1e-4 and rel_diff(again, stock) < 1e-4


def test_attention_bias_passes_its_check_and_a_wrong_one_is_reported(fused_library, monkeypatch):
    """``kernel_checks.check_host`` (part of the check a library passes before use):
    AttentionBias equals Attention on q and v biased and scaled beforehand, bit for bit; a
    kernel that scales q 0.1% too much is reported."""
    import ctypes

    assert kernel_checks.check_host(fused_library) is None
    real = ctypes.CDLL(fused_library)

    def overscaled(n, params, *rest):
        ctypes.cast(params[5], ctypes.POINTER(ctypes.c_float))[0] *= 1.001
        return real.AttentionBias(n, params, *rest)

    class Library:
        Attention = real.Attention
        AttentionBias = staticmethod(overscaled)

    monkeypatch.setattr(kernel_checks.ctypes, "CDLL", lambda path: Library())
    assert kernel_checks.check_host(fused_library) == "kernel AttentionBias differs from Attention on the biased inputs"


def _bf16_or_skip(fused_library):
    """Skip, naming why, on a CPU without AVX512_BF16 (the kernels then have no bfloat16
    products: :func:`test_bfloat16_asked_where_it_cannot_run_stays_float32` covers that); FAIL
    where the CPU has it but the library was built without them."""
    from whisper_accel.kernels import isa

    if not isa.optional_flags(isa.choose(isa.cpu(), native.state()["isa"]), isa.cpu()):
        pytest.skip("this CPU has no AVX512_BF16: no bfloat16 products to test")
    assert native.state()["bf16_gemm"] and kernel_checks.has_bf16_gemm(fused_library), "an AVX512_BF16 CPU's kernels were built without GemmBF16"


def test_bf16_gemm_passes_its_check_and_a_wrong_one_is_reported(fused_library, monkeypatch):
    """``kernel_checks.check_bf16``: GemmBF16 on PackBF16's copy equals float64 products of the
    bfloat16-rounded inputs (within 1e-5) on shapes with every tail; a kernel that truncates x
    instead of rounding it is reported."""
    import ctypes

    _bf16_or_skip(fused_library)
    assert kernel_checks.check_bf16(fused_library) is None
    real = ctypes.CDLL(fused_library)

    def truncating(n, params, ndims, shapes, *rest):
        m, k = shapes[0][0], shapes[0][1]
        x = np.ctypeslib.as_array(ctypes.cast(params[0], ctypes.POINTER(ctypes.c_float)), (m, k))
        cut = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # truncated to bfloat16, a copy
        args = (ctypes.c_void_p * 3)(cut.ctypes.data, params[1], params[2])
        return real.GemmBF16(n, args, ndims, shapes, *rest)

    class Library:
        HasGemmBF16, PackBF16 = real.HasGemmBF16, real.PackBF16
        GemmBF16 = staticmethod(truncating)

    monkeypatch.setattr(kernel_checks.ctypes, "CDLL", lambda path: Library())
    assert kernel_checks.check_bf16(fused_library).startswith("kernel GemmBF16 differs from its reference")


def test_bfloat16_products_are_named_and_stay_close_to_float32(model, fused_library):
    """``matmul_precision="bfloat16"``: the host encoder runs every product in GemmBF16 (its
    weights packed once), reports it, and its output is within bfloat16's precision of the
    float32 encoder's without being equal to it (so the bfloat16 path ran); float32 stays the
    default."""
    _bf16_or_skip(fused_library)
    feats = features(2, seed=31)
    assert Config.defaults().matmul_precision == "float32"
    with whisper_accel.patched(config=HOST):
        f32, eng = _encode(model, feats)
        assert _host(eng).precision == "float32" and _host(eng).packed is None
    with whisper_accel.patched(config=HOST.with_(matmul_precision="bfloat16")):
        bf16, eng = _encode(model, feats)
        impl = _host(eng)
        assert eng.executor == "host" and impl.precision == "bfloat16" and impl.precision_note is None
        assert len(impl.packed) == len(model.model.encoder.layers) and impl.packed[0].fc1.dtype == np.uint16
        assert eng.report()["matmul_precision"] == {"asked": "bfloat16", "host": "bfloat16", "why": None}
        engines = whisper_accel.status()["engines"]
        assert any((e.get("matmul_precision") or {}).get("host") == "bfloat16" for e in engines), engines
    err = rel_diff(bf16, f32)
    assert 1e-5 < err < 3e-2, err


def test_bfloat16_asked_where_it_cannot_run_stays_float32(model, fused_library, monkeypatch):
    """Where the kernels have no bfloat16 products (a CPU without AVX512_BF16, or a failed
    check), asking for them runs float32 and says why; the output is the float32 encoder's."""
    feats = features(1, seed=32)
    with whisper_accel.patched(config=HOST):
        f32, _ = _encode(model, feats)
    monkeypatch.setattr(host_encoder, "bf16_check", lambda path: "not built (needs a CPU with AVX512_BF16)")
    with whisper_accel.patched(config=HOST.with_(matmul_precision="bfloat16")):
        out, eng = _encode(model, feats)
        impl = _host(eng)
        assert impl.precision == "float32" and impl.packed is None
        assert impl.precision_note == "bfloat16 products: not built (needs a CPU with AVX512_BF16)"
        assert eng.report()["matmul_precision"]["why"] == impl.precision_note
    assert np.array_equal(out, f32)

