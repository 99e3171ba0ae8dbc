"""The ``decoder`` group: Whisper's per-token decoder step runs on the model's decoder engine.

:func:`make_generation_forward` replaces ``WhisperForConditionalGeneration.forward`` (not
``WhisperDecoder.forward``: the vocabulary projection is the most expensive single op, so it
belongs in the same step): every decoder layer, the final norm and the projection on the
:class:`~whisper_accel.runtime.decoder_engine.DecoderEngine`. Decoder state lives in a
static-shape KV cache (:mod:`whisper_accel.runtime.decode_state`) attached to the
``EncoderDecoderCache`` that ``generate`` threads through the steps; cross-attention K/V are
computed once, on the first step. ``generate`` itself is wrapped only to hold the inference lock
(one inference at a time across threads: MindSpore CPU is not thread-safe).

A call with ``use_cache=False`` (Whisper's language detection: one step on the start token)
runs the same step on a throwaway cache and returns no ``past_key_values``, as stock.
Anything else takes the original code: training, labels, head masks, inputs_embeds,
position ids, a decoder attention mask, output_attentions / output_hidden_states,
use_cache=False with a cache passed in, dtypes other than float32/float16/bfloat16, cache
objects it cannot fill (see :func:`_fast_forward`). An exception inside the fast path that no
executor recovers from is a fault: one warning, and that model runs stock code from then on
(:func:`whisper_accel.runtime.binding.fault`).

Part of the old ``compiled`` group (``patch(compiled=False)`` still turns this one and
``encoder`` off).
"""

from __future__ import annotations

import inspect
from typing import Any, List

from .._environment import Gates
from .._patcher import Patch
from ..runtime import calls
from ..runtime.binding import beyond_positions, compiled_to_decode, fault, serialised, to_compute, to_model
from ..runtime.decode_state import STATE, DecodeState, attach, is_empty
from ..runtime.interop import adopt, import_whisper

GATES = Gates(backends=("CPU",))
SUMMARY = "decoder step + vocabulary projection on a static KV cache (host kernels or graphs)"

DECODER = "decoder step"


def patches(env) -> List[Patch]:
    mw = import_whisper()
    return [
        Patch("decoder", mw.WhisperForConditionalGeneration, "forward", serialised(make_generation_forward),
              "decoder step + vocab projection on its engine, on a static KV cache"),
        Patch("decoder", mw.WhisperForConditionalGeneration, "generate", serialised(None),
              "one inference at a time across threads (MindSpore CPU is not thread-safe)"),
    ]


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
    """The compiled step, or a ``str``: why the original must run. The HF cache may hold
    ``DynamicCache``s or ``StaticCache``s (``cache_implementation="static"``); the static cache of
    this module is spilled into either (:mod:`whisper_accel.runtime.decode_state`)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from ..runtime.decode_state import static_misfit, unusable
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
    elif unusable(cache) is not None:  # DynamicCaches and/or StaticCaches (cache_implementation="static")
        return unusable(cache)
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
        misfit = static_misfit(cache, int(ids.shape[0]), t, int(hidden.shape[1]))
        if misfit is not None:
            return misfit
        cw = compiled_to_decode(self, hidden, int(ids.shape[0]), t)
        if isinstance(cw, str):
            return cw
        try:
            kx, vx = cw.cross_kv(to_compute(hidden))
            k, v = cw.new_cache(int(ids.shape[0]), cw.bucket_for(t, cw.max_positions))
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
    misfit = static_misfit(cache, state.batch, state.length + t)
    if misfit is not None:  # a StaticCache too short for this step: stock raises its own error
        state.spill(cache)
        return misfit
    need = state.length + t
    try:
        k, v = state.k, state.v
        if need > k[0].shape[2]:
            k, v = cw.grow_cache(k, v, cw.bucket_for(need, cw.max_positions))
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
