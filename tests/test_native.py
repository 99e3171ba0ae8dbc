"""The fused encoder kernels (``kernels/fused.cc`` via ``runtime/native.py``): built, checked,
used by the compiled encoder with stock's results, and every way they can be unavailable or
fail leaves the encoder on MindSpore's plain graphs with the same results."""

import ctypes
import os
import threading
from pathlib import Path

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import mindspore as ms  # noqa: E402
import torch  # noqa: E402  (mindtorch, via mindnlp)

import whisper_accel  # noqa: E402
from conftest import build_model, features, rel_diff  # noqa: E402
from whisper_accel.kernels import fused, graphs  # noqa: E402
from whisper_accel.runtime import calls, host_step, native  # noqa: E402
from whisper_accel.runtime import model as model_module  # noqa: E402
from whisper_accel.runtime.binding import ATTR  # noqa: E402

HERE = native.state()
needs_fused = pytest.mark.skipif(HERE["library"] is None, reason=f"fused kernels unavailable here: {HERE['reason']}")


@pytest.fixture
def fresh_decision(monkeypatch, tmp_path):
    """A new per-process decision in an empty cache directory; the original one afterwards."""
    monkeypatch.setenv("WHISPER_ACCEL_CACHE_DIR", str(tmp_path))
    native.reset()
    yield tmp_path
    monkeypatch.undo()
    native.reset()
    native.state()


@pytest.fixture(scope="module")
def model():
    return build_model(seed=2)


def _encode(model, feats):
    model.model.encoder.__dict__.pop(ATTR, None)
    with torch.no_grad():
        out = model.model.encoder(feats).last_hidden_state.asnumpy()
    return out, model.model.encoder.__dict__[ATTR]


def test_every_kernel_passes_its_check_or_the_reason_is_known():
    if HERE["library"] is None:
        assert HERE["reason"]
    else:
        assert Path(HERE["library"]).is_file()
        assert native.check(HERE["library"]) is None


@pytest.fixture
def graphs_only(monkeypatch):
    """The encoder graphs, not the host encoder (runtime/host_encoder.py: tests/test_host_encoder.py)."""
    monkeypatch.setattr(model_module, "HOST_ENCODER", False)


@needs_fused
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_encoder_equals_stock_and_the_plain_graphs(model, batch, graphs_only):
    feats = features(batch, seed=4)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    with whisper_accel.patched():
        ours, cw = _encode(model, feats)
        plain = cw._encode(graphs, ms.Tensor(feats.asnumpy())).asnumpy()
    assert cw.encoder_kernels == "fused"
    assert rel_diff(ours, stock) < 1e-4
    assert rel_diff(ours, plain) < 1e-6


@needs_fused
def test_layers_per_launch_change_the_launches_not_the_result(model, monkeypatch, graphs_only):
    from whisper_accel.runtime import model as runtime_model

    feats = features(1, seed=5)
    per_layer = 4 * 1500 * (6 * 384 + 2 * 1536)  # the estimate for one tiny layer, batch 1
    got = {}
    with whisper_accel.patched():
        for budget in (0, per_layer, 3 * per_layer):  # 1, 2 and all 4 layers a launch
            monkeypatch.setattr(runtime_model, "GROUP_BYTES", budget)
            out, cw = _encode(model, feats)
            assert cw.encoder_kernels == "fused"
            got[cw.encoder_layers_per_launch] = out
        monkeypatch.setattr(runtime_model, "WHOLE_ENCODER_GRAPH", True)
        monkeypatch.setattr(runtime_model, "GROUP_BYTES", 0)
        whole, cw = _encode(model, feats)
    assert sorted(got) == [1, 2, 4] and cw.encoder_layers_per_launch == 4
    for out in list(got.values()) + [whole]:
        assert rel_diff(out, got[1]) < 1e-6


def test_layers_per_launch_fit_the_budget():
    from whisper_accel.runtime.model import GROUP_BYTES, encoder_layer_bytes, layers_per_launch

    dims = {"tiny": (4, 384, 1536), "base": (6, 512, 2048), "small": (12, 768, 3072),
            "medium": (24, 1024, 4096), "large-v3": (32, 1280, 5120)}
    got = {name: layers_per_launch(n, encoder_layer_bytes(1, 1500, d, f)) for name, (n, d, f) in dims.items()}
    assert got == {"tiny": 4, "base": 6, "small": 4, "medium": 4, "large-v3": 2}
    for name, (n, d, f) in dims.items():
        for batch in (1, 2, 5):
            each = encoder_layer_bytes(batch, 1500, d, f)
            g = layers_per_launch(n, each)
            assert n % g == 0
            assert g == 1 or (g - 1) * each <= GROUP_BYTES
        assert layers_per_launch(n, encoder_layer_bytes(1, 1500, d, f), budget=0) == 1
    assert layers_per_launch(4, 1, budget=1 << 40) == 4


@needs_fused
@pytest.mark.parametrize("rows", [1, 5, 16, 20], ids=["greedy", "5-beams", "largest-for-the-kernel", "matmul"])
def test_the_step_projection_matches_x_w_transposed(rows):
    @ms.jit
    def project(x, w):
        return fused._logits(x, w)

    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((rows, 384)).astype(np.float32), rng.standard_normal((4001, 384)).astype(np.float32)
    got = project(ms.Tensor(x), ms.Tensor(w)).asnumpy()
    assert got.shape == (rows, 4001)
    assert rel_diff(got, x.astype(np.float64) @ w.T.astype(np.float64)) < 1e-6


@needs_fused
@pytest.mark.parametrize("host", [True, False], ids=["host-steps", "step-graphs"])
def test_the_decoder_steps_use_the_projection_kernel_with_stock_tokens(model, monkeypatch, host):
    """Greedy and beam steps with the fused kernels: on the host (the kernels through ctypes)
    or as the fused step graphs (``HOST_STEP`` off), stock's tokens either way."""
    monkeypatch.setattr(model_module, "HOST_STEP", host)
    feats = features(2, seed=9)
    with torch.no_grad():
        stock = model.generate(feats, max_new_tokens=12, min_new_tokens=12, do_sample=False).asnumpy()
        beams = model.generate(feats, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False).asnumpy()
    with whisper_accel.patched(), torch.no_grad():
        got = model.generate(feats, max_new_tokens=12, min_new_tokens=12, do_sample=False).asnumpy()
        cw = model.__dict__[ATTR]
        assert cw.decoder_kernels == ("host" if host else "fused")
        got_beams = model.generate(feats, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False).asnumpy()
        assert cw.decoder_kernels == ("host" if host else "fused")
    assert np.array_equal(got, stock) and np.array_equal(got_beams, beams)


@needs_fused
@pytest.mark.parametrize("rows, audios, pos0", [(1, 1, 10), (5, 1, 20), (4, 2, 63)],
                         ids=["greedy", "5-beams-masked-slots", "2-audios-x-2-beams-last-slot"])
def test_the_decoder_layer_kernel_matches_the_layer(rows, audios, pos0):
    """tiny's widths (D 384, 6 heads, FFN 1536, 1500 encoder frames, a 64-slot cache) against
    native's float64 reference of graphs._decoder's layer body."""
    rng = np.random.default_rng(11)
    args = list(native._layer_inputs(rng, rows, audios, pos0, heads=6, dh=64, slots=64, frames=1500, ffn=1536))
    if rows > 1:
        args[13][:, 3:7] = 0  # padding-masked slots, per row
        args[13][1, :] = 0  # no attendable slot (Whisper never makes one): the graph's finite mask averages all
    got = fused.kernel(HERE["library"], "DecoderLayer")(
        *(ms.Tensor(a if a.dtype == np.int32 else a.astype(np.float32)) for a in args))
    want = native._decoder_layer(args)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_diff(g.asnumpy(), w) < 1e-5


@needs_fused
def test_one_token_steps_run_the_layer_kernel_and_match_the_operator_layers(model):
    """fused.DECODER routes a one-token step's layers to ``DecoderLayer`` (and a prompt of several
    tokens to the operator layers), with the operator graphs' logits and caches."""
    calls_so_far = ctypes.CDLL(HERE["library"]).DecoderLayerCalls
    calls_so_far.restype = ctypes.c_longlong
    kernel, ops_only = fused.DECODER, graphs.decoder_graphs(fused._logits)
    feats = features(1, seed=12)
    with whisper_accel.patched(), torch.no_grad():
        model.generate(feats, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        cw = model.__dict__[ATTR]
        hidden = model.model.encoder(feats).last_hidden_state
        kx, vx = cw.cross_kv(ms.Tensor(hidden.asnumpy()))
        suppress = ms.Tensor(np.zeros(int(cw.proj.shape[0]), np.bool_))
        results, launched = [], []
        for g in (kernel, ops_only):
            k, v = cw.new_cache(1, 64)
            got, before = [], calls_so_far()
            for pos0, ids in ((0, [[50257, 50362, 440]]), (3, [[440]]), (4, [[11]])):
                pos, cols, pos_ids, key_ok = cw._positions(pos0, len(ids[0]), 64)
                _, _, logits, k, v = g.decode_next(ms.Tensor(np.array(ids, np.int64)), pos, cols, ms.mutable(tuple(k)),
                                                   ms.mutable(tuple(v)), kx, vx, cw.embed, cw.proj, cw.dec_pos,
                                                   cw.dec_layers, cw.dec_ln, cw.n_heads_dec, cw.scaling_dec,
                                                   suppress, pos_ids, key_ok)
                got.append(logits.asnumpy())
            results.append((got, [c.asnumpy() for c in k]))
            launched.append(calls_so_far() - before)
    assert launched == [2 * 4, 0]  # the two one-token steps, each of the 4 layers; the prompt and ops_only none
    (a, ka), (b, kb) = results
    for x, y in zip(a + ka, b + kb):
        assert rel_diff(x, y) < 1e-5


@needs_fused
@pytest.mark.parametrize("audios, frames, heads, dh, layers", [(1, 1500, 6, 64, 4), (3, 13, 2, 132, 2)],
                         ids=["tiny", "3-audios-odd-frames-two-inner-blocks"])
def test_the_cross_kv_kernel_matches_its_reference(audios, frames, heads, dh, layers):
    """Every layer's K^T and V in the step graphs' layouts, against native's float64 reference:
    tiny's widths, and row panels straddling audios, a partial column block, D over one inner block."""
    rng = np.random.default_rng(5)
    d = heads * dh
    args = (rng.standard_normal((audios, frames, d)),) + tuple(
        rng.standard_normal(shape) / np.sqrt(d) for _ in range(layers) for shape in ((d, d), (d, d), (d,)))
    got = fused.kernel(HERE["library"], "CrossKV", heads)(*(ms.Tensor(a.astype(np.float32)) for a in args))
    want = native._cross_kv(*args, heads=heads)
    assert len(got) == 2 * layers
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_diff(g.asnumpy(), w) < 1e-5


@needs_fused
def test_cross_kv_runs_the_kernel_with_the_per_layer_graphs_values(model):
    feats = features(2, seed=13)
    with whisper_accel.patched(), torch.no_grad():
        model.generate(feats, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        cw = model.__dict__[ATTR]
        assert cw.cross_kernels == "fused"
        hidden = ms.Tensor(model.model.encoder(feats).last_hidden_state.asnumpy())
        kx, vx = cw.cross_kv(hidden)
        ks, vs = cw._cross_kv(hidden)  # MindSpore's graphs, a layer a launch
    assert len(kx) == len(ks) == len(model.model.decoder.layers)
    for got, want in zip(kx + vx, ks + vs):
        assert got.shape == want.shape
        assert rel_diff(got.asnumpy(), want.asnumpy()) < 1e-5


@needs_fused
@pytest.mark.parametrize("owner, name, ran, host", [(fused, "cross_kv", "cross_kernels", True),
                                                    (fused.DECODER, "decode_next", "decoder_kernels", False),
                                                    (host_step.HostStep, "next", "decoder_kernels", True)],
                         ids=["cross-kv-kernel", "fused-step-graph", "host-step"])
def test_a_failing_fused_launch_in_generate_falls_back_to_the_plain_graphs(model, monkeypatch, owner, name, ran,
                                                                           host):
    monkeypatch.setattr(model_module, "HOST_STEP", host)  # the step graphs only run without host steps
    feats = features(1, seed=10)
    with torch.no_grad():
        stock = model.generate(feats, max_new_tokens=8, min_new_tokens=8, do_sample=False).asnumpy()

    def broken(*a, **k):
        raise RuntimeError(f"injected {name} failure")

    monkeypatch.setattr(owner, name, broken)
    try:
        with whisper_accel.patched(), torch.no_grad():
            got = model.generate(feats, max_new_tokens=8, min_new_tokens=8, do_sample=False).asnumpy()
            cw = model.__dict__[ATTR]
        assert getattr(cw, ran) == "mindspore"
        assert f"injected {name} failure" in native.state()["reason"]
        assert np.array_equal(got, stock)
    finally:
        native.reset()
        native.state()


@needs_fused
@pytest.mark.parametrize("shape", [(1, 1500, 6, 64), (2, 50, 3, 40), (1, 5, 2, 16)],
                         ids=["tiny-encoder", "odd-head-dim", "fewer-than-a-tile"])
def test_the_attention_kernel_matches_softmax_attention(shape):
    """1500 queries: 31 blocks of 48 and one of 12; 50: a block and 2 rows, 3 whole key tiles
    and 2 keys; 5: one partial row tile against 5 keys (no whole key tile)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    q *= 0.6  # scores of a few units, as a scaled query gives
    got = fused.kernel(HERE["library"], "Attention")(*(ms.Tensor(a) for a in (q, k, v))).asnumpy()
    want = native._attention(*(a.astype(np.float64) for a in (q, k, v)))
    assert got.shape == shape
    assert rel_diff(got, want) < 1e-5


@pytest.mark.parametrize("env, reason", [({"WHISPER_ACCEL_NATIVE": "0"}, "WHISPER_ACCEL_NATIVE=0"),
                                         ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
                                         ({"CXX": "false"}, "build or load failed")],
                         ids=["switched-off", "no-compiler", "compiler-fails"])
def test_unavailable_kernels_leave_the_plain_graphs(model, fresh_decision, monkeypatch, env, reason):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    feats = features(1, seed=6)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    with whisper_accel.patched():
        ours, cw = _encode(model, feats)
    state = native.state()
    assert state["library"] is None and reason in state["reason"]
    assert cw.encoder_kernels == "mindspore"
    assert rel_diff(ours, stock) < 1e-4
    assert not list(fresh_decision.glob("native/*.so"))


def test_a_kernel_that_disagrees_with_its_reference_is_not_used(fresh_decision, monkeypatch):
    if HERE["library"] is None:
        pytest.skip(HERE["reason"])
    monkeypatch.setattr(native, "_gelu", lambda x: 1.01 * x)  # a wrong reference: GELU "differs"
    state = native.state()
    assert state["library"] is None and "BiasGelu" in state["reason"]
    assert native.fused_graphs() is None


@needs_fused
def test_a_failing_fused_graph_falls_back_to_the_plain_graphs(model, monkeypatch, graphs_only):
    feats = features(1, seed=7)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()

    def broken(*a, **k):
        raise RuntimeError("injected fused launch failure")

    for name in ("enc_stem", "enc_layers", "encode_whole"):
        monkeypatch.setattr(fused, name, broken)
    calls.reset()
    try:
        with whisper_accel.patched():
            ours, cw = _encode(model, feats)
            again, _ = _encode(model, feats)
        assert cw.encoder_kernels == "mindspore"
        assert "injected fused launch failure" in native.state()["reason"]
        assert rel_diff(ours, stock) < 1e-4 and rel_diff(again, stock) < 1e-4
        assert whisper_accel.status()["calls"]["encoder"]["stock"] == 0  # still the compiled encoder
    finally:
        native.reset()
        native.state()


def test_concurrent_builds_into_one_directory_agree(tmp_path):
    cxx = native._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    got, errors = [], []

    def one():
        try:
            got.append(native.build(tmp_path, cxx))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1 and got[0].is_file()
    assert [p.name for p in tmp_path.iterdir()] == [got[0].name]  # no temporary files left
    assert native.check(str(got[0])) is None


def test_the_source_ships_with_the_package():
    assert native.SOURCE.is_file() and native.SOURCE.name == "fused.cc"
    assert os.path.dirname(native.SOURCE) == os.path.dirname(fused.__file__)
