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
from whisper_accel.runtime import host_calls, host_encoder, native  # noqa: E402
from whisper_accel.runtime import model as rm  # noqa: E402
from whisper_accel.runtime.binding import ATTR  # noqa: E402

HERE = native.state()
pytestmark = pytest.mark.skipif(HERE["library"] is None, reason=f"fused kernels unavailable here: {HERE['reason']}")


@pytest.fixture(scope="module")
def model():
    return build_model(seed=8)


@pytest.fixture(autouse=True)
def host_wherever_usable(monkeypatch):
    """The host encoder wherever it can run (by default, "auto", only where the fused graphs
    would take several launches: not tiny, which is one graph)."""
    monkeypatch.setattr(rm, "HOST_ENCODER", True)


def _encode(model, feats, fresh=True):
    if fresh:
        model.model.encoder.__dict__.pop(ATTR, None)
    with torch.no_grad():
        out = model.model.encoder(feats).last_hidden_state.asnumpy()
    return out, model.model.encoder.__dict__[ATTR]


@pytest.mark.parametrize("batch", [1, 2])
def test_the_host_encoder_equals_stock_and_the_graphs(model, monkeypatch, batch):
    feats = features(batch, seed=30)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    with whisper_accel.patched():
        host, cw = _encode(model, feats)
        assert cw.encoder_kernels == "host" and cw._host_enc.calls == 1
        again, _ = _encode(model, feats, fresh=False)  # the kept buffers, a second call
        assert cw._host_enc.calls == 2
        monkeypatch.setattr(rm, "HOST_ENCODER", False)
        graphs, cw = _encode(model, feats)
        assert cw.encoder_kernels == "fused"
    assert host.shape == stock.shape == (batch, 1500, 384)
    assert rel_diff(host, stock) < 1e-4
    assert rel_diff(host, graphs) < 1e-5
    assert np.array_equal(host, again)


def test_batch_sizes_alternate_on_one_model(model):
    """The work arrays are per batch size: 1, 2, 1 give each batch's own result."""
    one, two = features(1, seed=31), features(2, seed=32)
    with whisper_accel.patched():
        a, cw = _encode(model, one)
        b, _ = _encode(model, two, fresh=False)
        c, _ = _encode(model, one, fresh=False)
        assert cw.encoder_kernels == "host" and cw._host_enc.calls == 3
    assert np.array_equal(a, c)
    with torch.no_grad():
        stock = model.model.encoder(two).last_hidden_state.asnumpy()
    assert rel_diff(b, stock) < 1e-4


def test_a_half_precision_model_encodes_on_the_host_from_its_float32_copy():
    half = build_model(seed=9).to(torch.float16)
    feats = features(1, seed=33).to(torch.float16)
    with whisper_accel.patched():
        out, cw = _encode(half, feats)
    assert cw.encoder_kernels == "host" and out.dtype == np.float16
    same = build_model(seed=9)
    same.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    with torch.no_grad():
        want = same.model.encoder(feats.float()).last_hidden_state.asnumpy()
    assert rel_diff(out.astype(np.float32), want) < 1e-3  # the output's float16 rounding


def test_weights_it_cannot_read_keep_the_graphs(model, monkeypatch):
    feats = features(1, seed=34)
    monkeypatch.setattr(host_calls, "same", lambda view, t: False)  # no view reads its tensor
    with whisper_accel.patched():
        out, cw = _encode(model, feats)
    assert cw._host_enc is False and cw.encoder_kernels == "fused"
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    assert rel_diff(out, stock) < 1e-4


def test_it_takes_only_whisper_shaped_features(model):
    with whisper_accel.patched():
        _, cw = _encode(model, features(1, seed=35))
    enc = cw._host_enc
    assert enc.fits((1, 80, 3000)) and enc.fits((3, 80, 3000))
    assert not enc.fits((1, 80, 2998)) and not enc.fits((1, 128, 3000)) and not enc.fits((80, 3000))


def test_by_default_it_runs_where_the_graphs_would_take_several_launches(model, monkeypatch):
    """"auto": tiny's four layers are one fused graph launch (the graphs then measured faster),
    so they stay there; with a budget of one layer a launch they run on the host."""
    feats = features(1, seed=37)
    monkeypatch.setattr(rm, "HOST_ENCODER", "auto")
    with whisper_accel.patched():
        one_graph, cw = _encode(model, feats)
        assert cw.encoder_kernels == "fused" and cw.encoder_layers_per_launch == 4
        monkeypatch.setattr(rm, "GROUP_BYTES", 0)
        host, cw = _encode(model, feats)
        assert cw.encoder_kernels == "host"
        monkeypatch.setattr(rm, "WHOLE_ENCODER_GRAPH", True)
        whole, cw = _encode(model, feats)
        assert cw.encoder_kernels == "fused"
    assert rel_diff(host, one_graph) < 1e-5 and rel_diff(whole, one_graph) < 1e-6


def test_a_failing_host_encoder_falls_back_to_the_plain_graphs(model, monkeypatch):
    feats = features(1, seed=36)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()

    def broken(self, feats):
        raise RuntimeError("injected host encoder failure")

    monkeypatch.setattr(host_encoder.HostEncoder, "__call__", broken)
    try:
        with whisper_accel.patched():
            out, cw = _encode(model, feats)
        assert cw.encoder_kernels == "mindspore"
        assert "injected host encoder failure" in native.state()["reason"]
        assert rel_diff(out, stock) < 1e-4
    finally:
        native.reset()
        native.state()


def test_attention_bias_passes_its_check_and_a_wrong_one_is_reported(monkeypatch):
    """``native.check_host`` (part of the check a library passes before use): AttentionBias
    equals Attention on q and v biased and scaled beforehand, bit for bit; a kernel that scales
    q 0.1% too much is reported."""
    import ctypes

    assert native.check_host(HERE["library"]) is None
    real = ctypes.CDLL(HERE["library"])

    def overscaled(n, params, *rest):
        ctypes.cast(params[5], ctypes.POINTER(ctypes.c_float))[0] *= 1.001
        return real.AttentionBias(n, params, *rest)

    class Library:
        Attention = real.Attention
        AttentionBias = staticmethod(overscaled)

    monkeypatch.setattr(native.ctypes, "CDLL", lambda path: Library())
    assert native.check_host(HERE["library"]) == "kernel AttentionBias differs from Attention on the biased inputs"
