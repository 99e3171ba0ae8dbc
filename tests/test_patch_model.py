"""patch()/unpatch() on random-weight Whisper models with real tiny dimensions (seeded)."""

import numpy as np
import pytest

import whisper_accel
from whisper_accel import _api
from whisper_accel._errors import WhisperAccelWarning
from whisper_accel._patcher import MISSING, Patch, wrapper_depth

from conftest import (assert_same_snapshot, build_model, features, greedy, register_group, rel_diff,
                      stock_snapshot)


def encode(model, feats):
    import torch

    with torch.no_grad():
        return model.model.encoder(feats).last_hidden_state.asnumpy()


def whisper_module():
    from transformers.models.whisper import modeling_whisper

    return modeling_whisper


def test_encoder_matches_stock_fp32(tiny_model, feats):
    stock = encode(tiny_model, feats)
    whisper_accel.patch()
    fast = encode(tiny_model, feats)
    assert rel_diff(fast, stock) < 1e-4
    assert np.isfinite(fast).all()


def test_greedy_tokens_identical(tiny_model, feats):
    stock = greedy(tiny_model, feats, tokens=8)
    with whisper_accel.patched():
        fast = greedy(tiny_model, feats, tokens=8)
    np.testing.assert_array_equal(fast, stock)


def test_attention_kernel_is_really_used(tiny_model, feats, monkeypatch):
    """The equivalence tests above would pass with a no-op patch: prove the kernel runs."""
    from whisper_accel.kernels import attention

    calls = []
    real = attention.flash_attention
    monkeypatch.setattr(attention, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    whisper_accel.patch(encoder=False)  # the encoder group runs the whole encoder on its engine
    encode(tiny_model, feats)
    assert len(calls) == tiny_model.config.encoder_layers
    whisper_accel.unpatch()
    encode(tiny_model, feats)
    assert len(calls) == tiny_model.config.encoder_layers  # stock again: no more calls


def test_model_built_after_patch_uses_it_and_unpatch_returns_it_to_stock(feats):
    whisper_accel.patch()
    model = build_model(seed=3, encoder_layers=1, decoder_layers=1)
    fast = encode(model, feats)
    whisper_accel.unpatch()
    stock = encode(model, feats)
    assert rel_diff(fast, stock) < 1e-4


def test_unpatch_restores_exact_originals():
    mw = whisper_module()
    registry = mw.ALL_ATTENTION_FUNCTIONS
    before = stock_snapshot()
    whisper_accel.patch()
    touched = list(_api.originals())
    assert touched, "nothing was patched"
    assert mw.ALL_ATTENTION_FUNCTIONS is not registry
    whisper_accel.unpatch()
    for owner, attribute, original in touched:
        if original is MISSING:  # an attribute the patch added (mindtorch.hann_window)
            assert attribute not in vars(owner)
        else:
            assert vars(owner)[attribute] is original
    assert mw.ALL_ATTENTION_FUNCTIONS is registry
    assert_same_snapshot(before)


def test_repeated_patch_warns_and_wraps_nothing_twice():
    whisper_accel.patch()
    with pytest.warns(WhisperAccelWarning, match="already patched"):
        whisper_accel._errors.forget_warnings()
        whisper_accel.patch()
    for owner, attribute, _ in _api.originals():
        assert wrapper_depth(vars(owner)[attribute]) == 1


def test_strict_raises_for_a_group_asked_for_by_name_that_cannot_apply(monkeypatch):
    from whisper_accel._environment import Gates

    register_group(monkeypatch, "needs_npu", lambda env: [], gates=Gates(backends=("NPU",)))
    with pytest.raises(whisper_accel.WhisperAccelError, match="validated on NPU only"):
        whisper_accel.patch(strict=True, needs_npu=True)
    assert not whisper_accel.is_patched()
    report = whisper_accel.patch(strict=True)  # enabled only by default: reported, not raised
    assert "needs_npu" in [e.group for e in report.skipped]


def test_groups_can_be_disabled():
    report = whisper_accel.patch(attention=False)
    assert "attention" not in report.groups_applied
    assert any(e.group == "attention" and e.reason == "disabled by caller" for e in report.entries)
    whisper_accel.unpatch()
    with pytest.raises(ValueError, match="unknown patch group"):
        whisper_accel.patch(flash=True)


def test_half_way_failure_leaves_everything_stock(monkeypatch):
    mw = whisper_module()
    registry = mw.ALL_ATTENTION_FUNCTIONS
    before = stock_snapshot()

    def broken(env):
        def boom(original):
            raise RuntimeError("injected failure")
        return [Patch("broken", mw.WhisperAttention, "forward", boom)]

    register_group(monkeypatch, "broken", broken)  # its factory runs after every real group's
    whisper_accel._errors.forget_warnings()
    with pytest.warns(WhisperAccelWarning, match="injected failure"):
        report = whisper_accel.patch()
    assert report.applied == []
    assert not whisper_accel.is_patched()
    assert mw.ALL_ATTENTION_FUNCTIONS is registry
    with pytest.raises(whisper_accel.WhisperAccelError, match="injected failure"):
        whisper_accel.patch(strict=True, conv1d=False)
    assert mw.ALL_ATTENTION_FUNCTIONS is registry
    assert_same_snapshot(before)


def test_patched_context_restores_on_exception():
    mw = whisper_module()
    registry = mw.ALL_ATTENTION_FUNCTIONS
    with pytest.raises(KeyError):
        with whisper_accel.patched():
            assert whisper_accel.is_patched()
            raise KeyError("user error")
    assert not whisper_accel.is_patched()
    assert mw.ALL_ATTENTION_FUNCTIONS is registry


def test_encoder_and_decoder_groups_are_really_used(tiny_model, feats):
    from whisper_accel.runtime.binding import ATTR
    from whisper_accel.runtime.decoder_engine import DecoderEngine
    from whisper_accel.runtime.encoder_engine import EncoderEngine

    report = whisper_accel.patch()
    assert {"encoder", "decoder"} <= set(report.groups_applied)
    tiny_model.model.encoder.__dict__.pop(ATTR, None)
    encode(tiny_model, feats)
    eng = tiny_model.model.encoder.__dict__.get(ATTR)
    assert isinstance(eng, EncoderEngine) and eng.executor in ("host", "fused", "plain")  # built and used
    greedy(tiny_model, feats, tokens=2)
    dec = tiny_model.__dict__.get(ATTR)
    assert isinstance(dec, DecoderEngine) and dec.executor("decode_next") in ("host", "fused", "plain")


def test_output_attentions_falls_back_to_stock(tiny_model, feats):
    import torch

    with torch.no_grad():
        stock = tiny_model.model.encoder(feats, output_attentions=True)
        with whisper_accel.patched():
            fast = tiny_model.model.encoder(feats, output_attentions=True)
    assert rel_diff(fast.last_hidden_state, stock.last_hidden_state) == 0.0
    assert len(fast.attentions) == len(stock.attentions)


def test_registry_view_delegates_other_keys():
    mw = whisper_module()
    stock = mw.ALL_ATTENTION_FUNCTIONS
    whisper_accel.patch()
    view = mw.ALL_ATTENTION_FUNCTIONS
    assert view["sdpa"] is not stock["sdpa"] and view["sdpa"].__wrapped__ is stock["sdpa"]
    assert view["flex_attention"] is stock["flex_attention"]
    assert set(stock) <= set(view)
