"""Half precision on CPU, patched.

Findings (MindSpore 2.7.0 CPU, MindNLP 0.5.1), stock:
* float16: the first encoder forward after ``model.to(torch.float16)`` fails in mindtorch's
  Conv2D-emulated conv1d (BiasAdd dtype clash); the decoder fails in a Dense (f32 x f16).
* bfloat16: MindSpore CPU has no bf16 Conv2D/Mul kernels, so a bf16 Whisper cannot run at all.

Patched (the ``encoder`` and ``decoder`` groups: runtime/encoder_engine.py, runtime/decoder_engine.py),
half-precision models run in float32 on upcast copies of their weights (the host decoder steps
read the weight matrices as stored), and outputs come back in the model's dtype. The contract tested here:
from the first call, encoder outputs equal (within the output dtype's rounding) and greedy tokens
are identical to a float32 model holding the same (rounded) weights, and within 1e-2 of the
original float32 model.
"""

from __future__ import annotations

import mindnlp  # noqa: F401  (first: torch -> mindtorch before transformers)
import numpy as np
import pytest

import whisper_accel
from conftest import build_model, features, greedy, rel_diff

SMALL = dict(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
             max_source_positions=50)
FEATS = dict(frames=100)
#: relative error of the output cast alone (float16: 11-bit mantissa, bfloat16: 8-bit)
ROUNDING = {"float16": 1e-3, "bfloat16": 8e-3}


@pytest.fixture(scope="module")
def fp32_reference():
    import torch

    with torch.no_grad():
        return build_model(seed=6, **SMALL).model.encoder(features(**FEATS)).last_hidden_state.asnumpy()


def _models(dtype):
    """(half model, float32 model with the half model's weights upcast)."""
    half = build_model(seed=6, **SMALL).to(dtype)
    same = build_model(seed=6, **SMALL)
    # state_dict + float(): mindtorch's Module.to(float32) skips bf16 tensors (is_floating_point
    # is False for bf16 there)
    same.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    return half, same


def _encode(model, feats):
    import torch

    with torch.no_grad():
        return model.model.encoder(feats).last_hidden_state


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_stock_half_fails_on_cpu(name):
    """The stack defect the patch fixes: stock cannot run a half-precision Whisper's first call."""
    import torch

    from conftest import stack

    if stack()["backend"] != "CPU":
        pytest.skip("a MindSpore CPU defect")

    dtype = getattr(torch, name)
    half, _ = _models(dtype)
    with pytest.raises(TypeError) as info:
        _encode(half, features(**FEATS).to(dtype))
    assert "BiasAdd" in str(info.value) or "Unsupported data type" in str(info.value) \
        or "BFloat16" in str(info.value)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_patched_half_encoder_works_from_first_call(name, fp32_reference):
    import torch

    dtype = getattr(torch, name)
    half, same = _models(dtype)
    expected = _encode(same, features(**FEATS))
    whisper_accel.patch()
    out = _encode(half, features(**FEATS).to(dtype))  # first call on this model
    assert out.dtype == dtype
    from whisper_accel.runtime.binding import ATTR

    eng = half.model.encoder.__dict__[ATTR]  # the encoder engine ran it, not stock code
    assert eng.model_dtype == dtype and eng.executor in ("host", "fused", "plain")
    assert rel_diff(out.float(), expected) < ROUNDING[name]
    assert rel_diff(out.float(), fp32_reference) < 1e-2


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_patched_half_generate_tokens_equal_upcast_model(name):
    import torch

    dtype = getattr(torch, name)
    half, same = _models(dtype)
    want = greedy(same, features(**FEATS), tokens=12)
    whisper_accel.patch()
    got = greedy(half, features(**FEATS).to(dtype), tokens=12)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_patched_half_decoder_forward_logits(name):
    """The decoder engine's step (not only the greedy loop) returns logits in the model dtype."""
    import torch

    dtype = getattr(torch, name)
    half, same = _models(dtype)
    ids = torch.tensor([[50258, 50259, 50359]])
    with torch.no_grad():
        enc = _encode(same, features(**FEATS))
        want = same(encoder_outputs=(enc,), decoder_input_ids=ids).logits
    whisper_accel.patch()
    with torch.no_grad():
        got = half(encoder_outputs=(enc.to(dtype),), decoder_input_ids=ids).logits
    assert got.dtype == dtype
    assert rel_diff(got.float(), want) < 1e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_adapter_half_precision_in_whisper_shapes(dtype):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from whisper_accel.groups.attention import flash_attention_forward

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 6, n, 64)).astype(np.float32) for n in (1500, 1500, 1500))

    class M:
        is_causal = False
        training = False

    ref, _ = sdpa_attention_forward(M(), torch.tensor(q), torch.tensor(k), torch.tensor(v), None,
                                    scaling=1.0, is_causal=False)
    t = getattr(torch, dtype)
    out, _ = flash_attention_forward(M(), torch.tensor(q).to(t), torch.tensor(k).to(t),
                                     torch.tensor(v).to(t), None, stock=sdpa_attention_forward,
                                     scaling=1.0, is_causal=False)
    assert out.dtype == t
    assert rel_diff(out.float(), ref) < 1e-2
