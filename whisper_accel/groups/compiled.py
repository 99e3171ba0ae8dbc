"""The ``compiled`` group: Whisper's encoder and per-token decoder run as compiled graphs.

Two replacements (factories ``make_xxx_forward(original) -> new_forward``), each holding the
inference lock (:func:`whisper_accel.runtime.binding.serialised`):

* :func:`make_encoder_forward` replaces ``WhisperEncoder.forward``: conv stem, every layer and
  the final norm as graphs (:meth:`CompiledWhisper.encode`; one launch per layer).
* :func:`make_generation_forward` replaces ``WhisperForConditionalGeneration.forward`` (not
  ``WhisperDecoder.forward``: the 51865-wide vocab projection is the most expensive single op,
  so it belongs in the same graph). Decoder state lives in a static-shape KV cache
  (:mod:`whisper_accel.runtime.decode_state`) attached to the ``EncoderDecoderCache`` that
  ``generate`` threads through the steps; cross-attention K/V are computed once, on the first step.

A call with ``use_cache=False`` (Whisper's language detection: one step on the start token)
runs the same graph on a throwaway cache and returns no ``past_key_values``, as stock.
Anything else takes the original code: training, labels, head masks, inputs_embeds,
position ids, a decoder attention mask, output_attentions / output_hidden_states,
use_cache=False with a cache passed in, dtypes other than float32/float16/bfloat16 (half-precision models run the
graphs in float32 on one kept float32 copy of the weights; outputs come back in the model's
dtype), cache objects other than an (empty or ours) ``EncoderDecoderCache`` of
``DynamicCache``s. An exception inside the fast path (a graph that fails to compile or launch)
is a fault: one warning, and that model runs stock code from then on
(:func:`whisper_accel.runtime.binding.fault`).

The compiled model is built once per module and rebuilt only when its weights change
(:mod:`whisper_accel.runtime.binding`).
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional

from .._environment import Gates
from .._patcher import Patch
from ..runtime import calls
from ..runtime.binding import (OFF_AFTER_FAULT, beyond_positions, compiled_for, compiled_to_decode, fault,
                               graph_dtype, serialised, to_compute, to_model)
from ..runtime.decode_state import STATE, DecodeState, attach, is_empty
from ..runtime.interop import adopt, import_whisper
from ..runtime.model import CompiledWhisper

GATES = Gates(backends=("CPU",))
SUMMARY = "encoder and decoder step as mindspore.jit graphs on a static KV cache"


def patches(env) -> List[Patch]:
    mw = import_whisper()
    return [
        Patch("compiled", mw.WhisperEncoder, "forward", serialised(make_encoder_forward),
              "encoder as mindspore.jit graphs (one launch per layer)"),
        Patch("compiled", mw.WhisperForConditionalGeneration, "forward",
              serialised(make_generation_forward),
              "decoder step + vocab projection as one graph on a static KV cache"),
        Patch("compiled", mw.WhisperForConditionalGeneration, "generate", serialised(None),
              "one inference at a time across threads (MindSpore CPU is not thread-safe)"),
    ]


# ----------------------------------------------------------------------------------- encoder

def check_features(encoder, input_features, expected_frames: int) -> None:
    """Raise a clear error for features the encoder cannot take (stock raises MindSpore's
    operator errors, e.g. "For primitive[Conv2D], the x shape size must be equal to 4, but got
    3"). Same exception classes as stock for rank (ValueError) and dtype (TypeError); a wrong
    mel count, a RuntimeError in stock, is a ValueError here. The frame count is left to stock,
    whose message is already clear."""
    import mindspore

    if not isinstance(input_features, mindspore.Tensor):
        return
    mels, weight = int(encoder.conv1.in_channels), encoder.conv1.weight
    want = f"(batch, num_mel_bins={mels}, frames={expected_frames})"
    shape = tuple(input_features.shape)
    if len(shape) != 3:
        hint = " For one example, add the batch axis: features[None]." if len(shape) == 2 else ""
        raise ValueError(f"whisper_accel: Whisper input_features must be 3-D {want}; got shape {shape}.{hint}")
    if shape[1] != mels:
        raise ValueError(f"whisper_accel: Whisper input_features must be {want}; got {shape[1]} mel bins "
                         f"(shape {shape}). The feature extractor's feature_size must match the model's "
                         "num_mel_bins.")
    if input_features.dtype != weight.dtype:
        raise TypeError(f"whisper_accel: Whisper input_features must have the model's dtype {weight.dtype}; got "
                        f"{input_features.dtype}. Cast them: features.to(model.dtype).")


ENCODER = "encoder"
DECODER = "decoder step"


def _encoder_why_stock(self, input_features, head_mask, oa, oh, expected: int) -> Optional[str]:
    if self.training:
        return "the model is in training mode"
    if head_mask is not None:
        return "head_mask is set"
    if oa or oh:
        return "output_attentions / output_hidden_states"
    if getattr(input_features, "ndim", 0) != 3 or input_features.shape[-1] != expected:
        return f"input_features are not (batch, mels, {expected})"
    if not graph_dtype(input_features, self.conv1.weight):
        return "input_features / weights not float32/float16/bfloat16 of one dtype"
    return None


def make_encoder_forward(original):
    def new_forward(self, input_features, attention_mask=None, head_mask=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None):
        cfg = self.config
        oa = output_attentions if output_attentions is not None else cfg.output_attentions
        oh = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        expected = cfg.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        check_features(self, input_features, expected)

        def stock(why):
            calls.stock(ENCODER, why)
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)

        why = _encoder_why_stock(self, input_features, head_mask, oa, oh, expected)
        if why is not None:
            return stock(why)
        cw = compiled_for(self, CompiledWhisper.from_encoder)
        if cw is None:
            return stock(OFF_AFTER_FAULT)
        if cw.model_dtype != input_features.dtype:
            return stock("input_features not in the model's dtype")
        try:
            hidden = adopt(to_model(cw.encode(to_compute(input_features)), cw), input_features)
        except Exception as exc:  # noqa: BLE001  compile/launch fault: stock from now on
            return stock(fault(self, "the compiled encoder", exc))
        calls.fast(ENCODER)
        if not (return_dict if return_dict is not None else cfg.use_return_dict):
            return (hidden,)
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput(last_hidden_state=hidden)

    return new_forward


# ------------------------------------------------------------------------------ decoder step

def make_generation_forward(original):
    sig = inspect.signature(original)

    def new_forward(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        out = _fast_forward(self, bound.arguments)
        if isinstance(out, str):
            calls.stock(DECODER, out)
            return original(self, *args, **kwargs)
        calls.fast(DECODER)
        return out

    return new_forward


_MUST_BE_NONE = ("decoder_attention_mask", "head_mask", "decoder_head_mask", "cross_attn_head_mask",
                 "decoder_inputs_embeds", "decoder_position_ids", "labels")


def _fast_forward(self, a) -> Any:
    """The compiled step, or a ``str``: why the original must run."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    cfg = self.config
    g = a.get
    if self.training:
        return "the model is in training mode"
    given = [n for n in _MUST_BE_NONE if g(n) is not None] + sorted(a.get("kwargs") or ())
    if given:
        return f"{', '.join(given)} given"
    if (g("output_attentions") if g("output_attentions") is not None else cfg.output_attentions) or \
            (g("output_hidden_states") if g("output_hidden_states") is not None else cfg.output_hidden_states):
        return "output_attentions / output_hidden_states"
    use_cache = g("use_cache") if g("use_cache") is not None else cfg.use_cache
    if not use_cache and g("past_key_values") is not None:
        return "use_cache=False with past_key_values"
    ids = g("decoder_input_ids")
    cache = g("past_key_values")
    if ids is None or getattr(ids, "ndim", 0) != 2:
        return "decoder_input_ids missing or not 2-D"
    cache_position = g("cache_position")
    if cache_position is not None and cache_position.shape[0] != ids.shape[1]:
        return "cache_position does not match decoder_input_ids"
    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    elif type(cache) is not EncoderDecoderCache or type(cache.self_attention_cache) is not DynamicCache \
            or type(cache.cross_attention_cache) is not DynamicCache:
        return "past_key_values is not an EncoderDecoderCache of DynamicCaches"
    state = cache.__dict__.get(STATE)
    enc = g("encoder_outputs")
    if state is None:  # first step: the cache must be empty, and we need encoder output
        if not is_empty(cache):
            return "past_key_values filled by stock code"
        if enc is None:
            if g("input_features") is None:
                return "neither encoder_outputs nor input_features given"
            enc = self.model.encoder(g("input_features"), return_dict=True)
        hidden = enc[0]
        t = int(ids.shape[1])
        cw = compiled_to_decode(self, hidden, int(ids.shape[0]), t)
        if isinstance(cw, str):
            return cw
        try:
            kx, vx = cw.cross_kv(to_compute(hidden))
            k, v = cw.new_cache(int(ids.shape[0]), CompiledWhisper.bucket_for(t, cw.max_positions))
        except Exception as exc:  # noqa: BLE001  compile/launch fault: stock from now on
            return fault(self, "the compiled decoder (cross-attention K/V)", exc)
        state = DecodeState(cw, k, v, kx, vx, int(ids.shape[0]))
        state.like = ids
        attach(cache, state)
    else:
        hidden = enc[0] if enc is not None else None
    cw, t = state.cw, int(ids.shape[1])
    if ids.shape[0] != state.batch or state.length + t > cw.max_positions:
        state.spill(cache)  # stock code takes over (and raises what it raises)
        return ("the batch changed within a generation" if ids.shape[0] != state.batch
                else beyond_positions(state.length + t, cw.max_positions))
    need = state.length + t
    try:
        k, v = state.k, state.v
        if need > k[0].shape[2]:
            k, v = cw.grow_cache(k, v, CompiledWhisper.bucket_for(need, cw.max_positions))
        logits, k, v = cw.decode_step(ids, state.length, k, v, state.kx, state.vx)
    except Exception as exc:  # noqa: BLE001  the state is untouched: stock continues from it
        why = fault(self, "the compiled decoder step", exc)
        state.spill(cache)
        return why
    state.k, state.v, state.length = k, v, need
    logits = adopt(to_model(logits, cw), ids)
    from transformers.modeling_outputs import Seq2SeqLMOutput
    cache = cache if use_cache else None  # use_cache=False (language detection): a throwaway cache
    if not (g("return_dict") if g("return_dict") is not None else cfg.use_return_dict):
        return (logits,) + ((cache,) if cache is not None else ()) + ((hidden,) if hidden is not None else ())
    return Seq2SeqLMOutput(logits=logits, past_key_values=cache, encoder_last_hidden_state=hidden)
