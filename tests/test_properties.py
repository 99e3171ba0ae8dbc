"""Equivalence of the attention kernel and its adapter with stock / a numpy reference, over the
input space (hypothesis), plus model-level equivalence and the documented fallbacks.

Default run: 110 generated cases (30+30+30+20); ``-m slow`` adds 600 more (300+300).
"""

from __future__ import annotations

import mindnlp  # noqa: F401  (first: torch -> mindtorch before transformers)
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import whisper_accel
from conftest import build_model, features, greedy, rel_diff

FAST = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

#: Small but real Whisper: 100 mel frames (max_source_positions=50), few layers, d_model 64.
SMALL = dict(encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
             max_source_positions=50)
FRAMES = 100


# ----------------------------------------------------------------------------- helpers
def _t(a):
    import mindnlp  # noqa: F401
    import torch

    return torch.tensor(a)


def _ms(a):
    import mindspore

    return mindspore.Tensor(a)


def _np(x):
    import mindspore

    if x.dtype == mindspore.bfloat16:
        x = mindspore.ops.cast(x, mindspore.float32)
    return np.asarray(x.asnumpy(), dtype=np.float64)


def reference(q, k, v, add_mask=None, scale=None, causal=False, align="bottom"):
    """softmax(q k^T * scale + mask) v in float64; (B, H, Lq, D)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    lq, lk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if add_mask is not None:
        s = s + np.asarray(add_mask, np.float64)
    if causal:
        offset = lk - lq if align == "bottom" else 0
        allowed = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset
        s = np.where(allowed, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Module:
    """What the attention functions read off the module: is_causal and training."""

    def __init__(self, is_causal=False, training=False):
        self.is_causal = is_causal
        self.training = training


def _padding_lengths(draw, b, lk):
    return [draw(st.integers(1, lk)) for _ in range(b)]  # key 0 is always kept


@st.composite
def problems(draw, max_len=24, causal_ok=True):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 4))
    d = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 33, 64]))
    lq = draw(st.one_of(st.just(1), st.integers(1, max_len)))
    lk = draw(st.one_of(st.just(1), st.integers(1, max_len)))
    causal = causal_ok and draw(st.booleans())
    if causal and lq > lk:
        lq, lk = lk, lq  # causal needs every query row to see a key
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for n in (lq, lk, lk))
    return dict(b=b, h=h, d=d, lq=lq, lk=lk, causal=causal, q=q, k=k, v=v, rng=rng,
                lengths=_padding_lengths(draw, b, lk),
                mask_kind=draw(st.sampled_from(["none", "pad_b11k", "full_bhqk", "q1k", "bool"])),
                scale=draw(st.sampled_from([None, 1.0, 0.125, 0.7])))


def _masks(p):
    """(additive float32 mask or None, bool mask or None) for a drawn problem."""
    b, h, lq, lk, kind = p["b"], p["h"], p["lq"], p["lk"], p["mask_kind"]
    keep = np.arange(lk)[None, :] < np.asarray(p["lengths"])[:, None]  # (B, Lk)
    if kind == "none":
        return None, None
    if kind == "pad_b11k":
        return np.where(keep, 0.0, -1e9).astype(np.float32)[:, None, None, :], None
    if kind == "full_bhqk":
        add = p["rng"].standard_normal((b, h, lq, lk)).astype(np.float32)
        return np.where(keep[:, None, None, :], add, -np.inf).astype(np.float32), None
    if kind == "q1k":  # broadcasts along batch and heads; random finite bias
        return p["rng"].standard_normal((1, 1, lq, lk)).astype(np.float32), None
    boolean = np.broadcast_to(keep[:, None, None, :], (b, 1, lq, lk)).copy()
    return np.where(boolean, 0.0, -np.inf).astype(np.float32), boolean


# ----------------------------------------------------------------------------- kernel
def _check_kernel(p, q_block, kv_block):
    from whisper_accel.kernels import attention as kernel

    add, _ = _masks(p)
    out = kernel.flash_attention(_ms(p["q"]), _ms(p["k"]), _ms(p["v"]),
                                 None if add is None else _ms(add), p["scale"], p["causal"],
                                 q_block=q_block, kv_block=kv_block)
    want = reference(p["q"], p["k"], p["v"], add, p["scale"], p["causal"])
    got = _np(out)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    assert rel(got, want) < 1e-4, (p["b"], p["h"], p["lq"], p["lk"], p["d"], p["causal"],
                                   p["mask_kind"], q_block, kv_block)


@FAST
@given(p=problems(max_len=12), q_block=st.integers(2, 7), kv_block=st.integers(2, 7))
def test_kernel_matches_reference_with_small_tiles(p, q_block, kv_block):
    """Multi-tile online softmax, ragged last tiles, causal tile skipping, every mask kind."""
    _check_kernel(p, q_block, kv_block)


@pytest.mark.timeout(900)  # 300 hypothesis draws
@pytest.mark.slow
@SLOW
@given(p=problems(max_len=40), q_block=st.integers(1, 16), kv_block=st.integers(1, 16))
def test_kernel_matches_reference_slow(p, q_block, kv_block):
    _check_kernel(p, q_block, kv_block)


@pytest.mark.slow
def test_kernel_default_blocks_on_whisper_lengths():
    """Whisper's own shapes: encoder 1500 (one tile) and a multi-tile 1500 with 512 blocks."""
    from whisper_accel.kernels import attention as kernel

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 1500, 16)).astype(np.float32) for _ in range(3))
    want = reference(q, k, v)
    for blocks in ({}, dict(q_block=512, kv_block=512), dict(q_block=1499, kv_block=97)):
        got = _np(kernel.flash_attention(_ms(q), _ms(k), _ms(v), **blocks))
        assert rel(got, want) < 1e-4, blocks


# ----------------------------------------------------------------------------- adapter vs stock sdpa
def _check_adapter_vs_sdpa(p, is_causal_arg, extra_cols, module_causal):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from whisper_accel.groups.attention import flash_attention_forward

    add, boolean = _masks(p)
    if p["mask_kind"] == "bool":
        mask = _t(boolean)
    elif add is not None:
        if extra_cols:  # transformers may hand a mask longer than the keys; both slice it
            pad = np.zeros(add.shape[:-1] + (extra_cols,), np.float32)
            add = np.concatenate([add, pad], axis=-1)
        mask = _t(add)
    else:
        mask = None
    module = Module(is_causal=module_causal)
    q, k, v = _t(p["q"]), _t(p["k"]), _t(p["v"])
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=p["scale"],
                                     is_causal=is_causal_arg)
    got, weights = flash_attention_forward(module, q, k, v, mask, stock=sdpa_attention_forward,
                                           implementation="sdpa", scaling=p["scale"],
                                           is_causal=is_causal_arg)
    assert weights is None
    assert tuple(got.shape) == tuple(want.shape) == (p["b"], p["lq"], p["h"], p["d"])
    assert got.dtype == want.dtype
    assert rel(_np(got), _np(want)) < 1e-4, (p["b"], p["h"], p["lq"], p["lk"], p["d"],
                                             p["mask_kind"], is_causal_arg, module_causal)
    # and it is a usable mindtorch tensor (device tagged), not a bare MindSpore one
    assert rel(_np(got.reshape(p["b"], p["lq"], -1) * 1.0), _np(want.reshape(p["b"], p["lq"], -1))) < 1e-4


@FAST
@given(p=problems(max_len=16), is_causal=st.sampled_from([None, False, True]),
       extra_cols=st.sampled_from([0, 0, 3]), module_causal=st.booleans())
def test_adapter_matches_stock_sdpa(p, is_causal, extra_cols, module_causal):
    """Includes causal with Lk > Lq (KV cache), Lq == 1, cross-attention Lq != Lk, and
    ``is_causal=None`` resolved by sdpa's own rule."""
    if p["mask_kind"] != "none" and is_causal:
        is_causal = False  # sdpa refuses an explicit mask together with is_causal=True
    _check_adapter_vs_sdpa(p, is_causal, extra_cols, module_causal)


@pytest.mark.timeout(900)  # 300 hypothesis draws
@pytest.mark.slow
@SLOW
@given(p=problems(max_len=64), is_causal=st.sampled_from([None, False, True]),
       extra_cols=st.sampled_from([0, 5]), module_causal=st.booleans())
def test_adapter_matches_stock_sdpa_slow(p, is_causal, extra_cols, module_causal):
    if p["mask_kind"] != "none" and is_causal:
        is_causal = False
    _check_adapter_vs_sdpa(p, is_causal, extra_cols, module_causal)


def test_sdpa_causal_with_more_keys_keeps_stock_meaning():
    """Regression: torch's sdpa aligns ``is_causal`` top-left when Lq != Lk; the kernel aligns
    bottom-right. The adapter used to return the kernel's answer (off by ~100%)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from whisper_accel.groups.attention import flash_attention_forward

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, 7, 8)).astype(np.float32) for _ in range(2))
    args = (Module(True), _t(q), _t(k), _t(v), None)
    want, _ = sdpa_attention_forward(*args, scaling=0.3, is_causal=True)
    got, _ = flash_attention_forward(*args, stock=sdpa_attention_forward, scaling=0.3,
                                     is_causal=True)
    assert rel(_np(got), _np(want)) < 1e-6
    np.testing.assert_allclose(_np(want).transpose(0, 2, 1, 3),
                               reference(q, k, v, scale=0.3, causal=True, align="top"), atol=1e-5)


# ----------------------------------------------------------------------------- flash_attention_2 key
def _check_fa2(p):
    from whisper_accel.groups.attention import flash_attention_forward

    keep = (np.arange(p["lk"])[None, :] < np.asarray(p["lengths"])[:, None])
    use_mask = p["mask_kind"] != "none"
    mask = _t(keep.astype(np.int64)) if use_mask else None
    add = np.where(keep, 0.0, -np.inf)[:, None, None, :] if use_mask else None

    def no_stock(*a, **k):
        raise AssertionError("flash_attention_2 has no stock kernel on CPU; must not be called")

    got, _ = flash_attention_forward(Module(is_causal=p["causal"]), _t(p["q"]), _t(p["k"]),
                                     _t(p["v"]), mask, stock=no_stock,
                                     implementation="flash_attention_2", scaling=p["scale"])
    # FlashAttention's rule: causal from the module when Lq > 1, diagonal bottom-right
    want = reference(p["q"], p["k"], p["v"], add, p["scale"], p["causal"] and p["lq"] > 1)
    assert rel(_np(got).transpose(0, 2, 1, 3), want) < 1e-4


@FAST
@given(p=problems(max_len=16))
def test_adapter_flash_attention_2_with_2d_padding_masks(p):
    _check_fa2(p)


# ----------------------------------------------------------------------------- half precision
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(p=problems(max_len=12), dtype=st.sampled_from(["float16", "bfloat16"]),
       q_block=st.integers(1, 8), kv_block=st.integers(1, 8))
def test_half_precision_within_1e2_of_fp32(p, dtype, q_block, kv_block):
    import mindspore
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from whisper_accel.kernels import attention as kernel
    from whisper_accel.groups.attention import flash_attention_forward

    # Bounds from the measured spread (400 hypothesis draws, inputs rounded to the half type):
    # max rel error float16 9.2e-4, bfloat16 6.3e-3 (kernel and adapter alike).
    bound = {"float16": 2e-3, "bfloat16": 1e-2}[dtype]
    ms_dtype = getattr(mindspore, dtype)
    add, _ = _masks(p)
    if add is not None:
        add = np.maximum(add, -1e4).astype(np.float32)  # representable in fp16
    want = reference(p["q"], p["k"], p["v"], add, p["scale"], p["causal"])
    q, k, v = (_ms(p[n]).astype(ms_dtype) for n in "qkv")
    mask = None if add is None else _ms(add).astype(ms_dtype)
    out = kernel.flash_attention(q, k, v, mask, p["scale"], p["causal"], q_block=q_block,
                                 kv_block=kv_block)
    assert out.dtype == ms_dtype
    assert rel(_np(out), want) < bound
    tq, tk, tv = (_t(p[n]).to(getattr(__import__("torch"), dtype)) for n in "qkv")
    tmask = None if add is None else _t(add).to(tq.dtype)
    got, _ = flash_attention_forward(Module(), tq, tk, tv, tmask, stock=sdpa_attention_forward,
                                     scaling=p["scale"], is_causal=p["causal"] and p["lq"] == p["lk"])
    assert got.dtype == tq.dtype
    want2 = reference(p["q"], p["k"], p["v"], add, p["scale"], p["causal"] and p["lq"] == p["lk"])
    assert rel(_np(got).transpose(0, 2, 1, 3), want2) < bound


# ----------------------------------------------------------------------------- model level
@pytest.fixture(scope="module")
def small_model():
    return build_model(seed=5, **SMALL)


def test_greedy_tokens_identical_batch_2(small_model):
    feats = features(batch=2, frames=FRAMES, seed=7)
    stock = greedy(small_model, feats, tokens=5)
    with whisper_accel.patched():
        fast = greedy(small_model, feats, tokens=5)
    np.testing.assert_array_equal(fast, stock)


def test_decoder_padding_mask_and_kv_cache_chunk_match_stock(small_model):
    """Batch 2 with a decoder padding mask (4-D additive masks reach the kernel), then a second
    chunk of 3 tokens against the cache (causal, Lk > Lq, mask built by transformers)."""
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    feats = features(batch=2, frames=FRAMES, seed=8)
    ids = torch.tensor([[50258, 50259, 50359, 440, 50257], [50258, 50259, 50359, 50257, 50257]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    more = torch.tensor([[11, 12, 13], [21, 22, 23]])

    def run():
        with torch.no_grad():
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            first = small_model(feats, decoder_input_ids=ids, decoder_attention_mask=mask,
                                past_key_values=cache, use_cache=True)
            full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
            second = small_model(feats, decoder_input_ids=more, decoder_attention_mask=full_mask,
                                 past_key_values=first.past_key_values, use_cache=True,
                                 cache_position=torch.arange(5, 8))
        return first.logits.asnumpy(), second.logits.asnumpy()

    stock = run()
    with whisper_accel.patched():
        fast = run()
    for f, s in zip(fast, stock):
        assert rel_diff(f, s) < 1e-4


def test_encoder_batch_3_matches_stock(small_model):
    import torch

    feats = features(batch=3, frames=FRAMES, seed=9)
    with torch.no_grad():
        stock = small_model.model.encoder(feats).last_hidden_state.asnumpy()
        with whisper_accel.patched():
            fast = small_model.model.encoder(feats).last_hidden_state.asnumpy()
    assert rel_diff(fast, stock) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_greedy_tokens_identical_many_seeds(seed):
    model = build_model(seed=seed, **SMALL)
    feats = features(batch=2, frames=FRAMES, seed=seed + 100)
    stock = greedy(model, feats, tokens=16)
    with whisper_accel.patched():
        fast = greedy(model, feats, tokens=16)
    np.testing.assert_array_equal(fast, stock)


# ----------------------------------------------------------------------------- fallbacks
class Spy:
    """A stand-in for a stock attention function that records its calls and delegates."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __call__(self, module, q, k, v, mask, **kwargs):
        self.calls.append(kwargs)
        return self.real(module, q, k, v, mask, **kwargs)


@pytest.fixture
def spied_sdpa(monkeypatch):
    """The global registry's sdpa replaced by a spy *before* patch(), so the patched Whisper view
    falls back to the spy."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    spy = Spy(sdpa_attention_forward)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    return spy


def _qkv(lq=4, lk=6):
    rng = np.random.default_rng(3)
    return (_t(rng.standard_normal((1, 2, n, 8)).astype(np.float32)) for n in (lq, lk, lk))


@pytest.mark.parametrize("kwargs,training", [
    (dict(output_attentions=True), False),
    (dict(head_mask="x"), False),
    (dict(dropout=0.3), True),
    (dict(cu_seq_lens_q="x"), False),
    (dict(cu_seq_lens_k="x", max_length_q=4), False),
    (dict(position_ids="x"), False),
])
def test_adapter_fallbacks_call_stock_and_return_its_result(kwargs, training):
    from whisper_accel.groups.attention import flash_attention_forward

    sentinel = (object(), object())
    seen = []

    def stock(*a, **k):
        seen.append(k)
        return sentinel

    q, k, v = _qkv()
    out = flash_attention_forward(Module(training=training), q, k, v, None, stock=stock, **kwargs)
    assert out is sentinel and len(seen) == 1
    for name, value in kwargs.items():
        assert seen[0][name] == value


def test_dropout_in_eval_mode_uses_the_kernel():
    from whisper_accel.groups.attention import flash_attention_forward

    def stock(*a, **k):
        raise AssertionError("dropout outside training must not fall back")

    q, k, v = _qkv()
    out, _ = flash_attention_forward(Module(training=False), q, k, v, None, stock=stock,
                                     dropout=0.3, scaling=None, is_causal=False)
    assert tuple(out.shape) == (1, 4, 2, 8)
    # no dropout applied: exactly softmax(q k^T / sqrt(d)) v (the fp32 kernel bound of this file)
    want = reference(*(x.asnumpy() for x in _qkv()))
    assert rel(_np(out).transpose(0, 2, 1, 3), want) < 1e-4


def test_model_output_attentions_uses_stock(spied_sdpa):
    import torch

    model = build_model(seed=2, **SMALL)
    feats = features(frames=FRAMES)
    with torch.no_grad():
        stock = model.model.encoder(feats, output_attentions=True)
        with whisper_accel.patched():
            spied_sdpa.calls.clear()
            fast = model.model.encoder(feats, output_attentions=True)
    # sdpa refuses output_attentions; transformers may route to eager itself. Either way the
    # result is stock's and our kernel returned no weights of its own.
    assert rel_diff(fast.last_hidden_state, stock.last_hidden_state) == 0.0
    assert all(c.get("output_attentions") for c in spied_sdpa.calls)
    assert len(fast.attentions) == len(stock.attentions) == SMALL["encoder_layers"]
    for a, b in zip(fast.attentions, stock.attentions):  # None where stock's sdpa returns no weights
        assert (a is None) == (b is None)
        if b is not None:
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_model_head_mask_uses_stock(spied_sdpa):
    import torch

    model = build_model(seed=2, **SMALL)
    feats = features(frames=FRAMES)
    head_mask = torch.tensor(np.ones((SMALL["encoder_layers"], 4), np.float32))
    with torch.no_grad():
        stock = model.model.encoder(feats, head_mask=head_mask).last_hidden_state.asnumpy()
        whisper_accel.patch()
        spied_sdpa.calls.clear()
        fast = model.model.encoder(feats, head_mask=head_mask).last_hidden_state.asnumpy()
    assert len(spied_sdpa.calls) == SMALL["encoder_layers"]
    assert all(c.get("head_mask") is not None for c in spied_sdpa.calls)
    assert rel_diff(fast, stock) == 0.0


def test_model_training_dropout_uses_stock(spied_sdpa, monkeypatch):
    import torch
    from whisper_accel.kernels import attention as kernel

    model = build_model(seed=2, attention_dropout=0.5, **SMALL)
    feats = features(frames=FRAMES)
    whisper_accel.patch(compiled=False)  # the compiled encoder graph would bypass the kernel
    kernel_calls = []
    real = kernel.flash_attention
    monkeypatch.setattr(kernel, "flash_attention",
                        lambda *a, **k: kernel_calls.append(1) or real(*a, **k))
    model.train()
    try:
        with torch.no_grad():
            model.model.encoder(feats)
    finally:
        model.eval()
    assert kernel_calls == []
    assert len(spied_sdpa.calls) == SMALL["encoder_layers"]
    assert all(c["dropout"] == 0.5 for c in spied_sdpa.calls)
    spied_sdpa.calls.clear()
    with torch.no_grad():  # eval: dropout off, the kernel runs again
        model.model.encoder(feats)
    assert len(kernel_calls) == SMALL["encoder_layers"] and spied_sdpa.calls == []
