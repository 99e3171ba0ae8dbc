"""The ``compiled`` group's decoder step: ``WhisperForConditionalGeneration.forward`` on the
compiled decoder graph with a static KV cache attached to the ``EncoderDecoderCache`` that
``generate`` threads through the steps (see :mod:`whisper_accel.targets.compiled_glue` for what
falls back to stock and why the weight views are rebuilt per generation).

Cross-attention K/V are computed once, on the first step. When code outside the forward needs
the HF cache contents (``reorder_cache`` for beam search, ``crop``, ``batch_*``,
``to_legacy_cache``) the static cache is first *spilled* into the HF cache, so the remaining
steps run stock and stay correct.
"""

from __future__ import annotations

import inspect
from typing import Any

import mindspore as ms
from mindspore import ops

from ..kernels.compiled import CompiledWhisper
from .compiled_glue import _compiled_for, _disable, _graph_dtype, to_compute, to_model
from .mindnlp05 import adopt

STATE = "_whisper_accel_state"  # on the EncoderDecoderCache: _DecodeState
_SPILL_METHODS = ("reorder_cache", "crop", "batch_split", "batch_repeat_interleave",
                  "batch_select_indices", "to_legacy_cache", "reset")


class _DecodeState:
    """Static KV cache of one generation, attached to its EncoderDecoderCache."""

    def __init__(self, cw, k, v, kx, vx, batch):
        self.cw, self.k, self.v, self.kx, self.vx, self.batch = cw, k, v, kx, vx, batch
        self.length = 0
        self.like = None  # a mindtorch tensor to copy ``_device`` from

    def spill(self, cache) -> None:
        """Copy the static cache into the HF cache objects and detach, so stock code continues."""
        d = cache.__dict__
        d.pop(STATE, None)
        for name in ("get_seq_length",) + _SPILL_METHODS:
            d.pop(name, None)
        n = self.length
        idx = ms.Tensor(list(range(n)), ms.int32)
        cw = self.cw

        def out(t):
            return adopt(to_model(t, cw), self.like)

        for i in range(len(self.k)):
            cache.self_attention_cache.update(out(ops.gather(self.k[i], idx, 2)), out(ops.gather(self.v[i], idx, 2)), i)
            cache.cross_attention_cache.update(out(ops.transpose(self.kx[i], (0, 1, 3, 2))), out(self.vx[i]), i)
            cache.is_updated[i] = True


def _attach(cache, state) -> None:
    d = cache.__dict__
    d[STATE] = state
    d["get_seq_length"] = lambda layer_idx=0: state.length
    for name in _SPILL_METHODS:
        bound = getattr(type(cache), name).__get__(cache)

        def spill_then(*a, _bound=bound, **kw):
            state.spill(cache)
            return _bound(*a, **kw)
        d[name] = spill_then


def _empty(cache) -> bool:
    # DynamicCache(config=...) pre-creates (unfilled) layers, so ask for lengths, not layers.
    return cache.self_attention_cache.get_seq_length() == 0 and cache.cross_attention_cache.get_seq_length() == 0


def make_generation_forward(original):
    sig = inspect.signature(original)

    def new_forward(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        a = bound.arguments
        out = _fast_forward(self, a)
        return original(self, *args, **kwargs) if out is None else out

    new_forward.__wrapped__ = original
    new_forward.__name__ = getattr(original, "__name__", "forward")
    new_forward.__doc__ = getattr(original, "__doc__", None)
    new_forward.__signature__ = sig
    return new_forward


_MUST_BE_NONE = ("decoder_attention_mask", "head_mask", "decoder_head_mask", "cross_attn_head_mask",
                 "decoder_inputs_embeds", "decoder_position_ids", "labels")


def _fast_forward(self, a) -> Any:
    """The compiled step, or None to let the original run."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    cfg = self.config
    g = a.get
    if self.training or any(g(n) is not None for n in _MUST_BE_NONE) or a.get("kwargs"):
        return None
    if (g("output_attentions") if g("output_attentions") is not None else cfg.output_attentions) or \
            (g("output_hidden_states") if g("output_hidden_states") is not None else cfg.output_hidden_states):
        return None
    if not (g("use_cache") if g("use_cache") is not None else cfg.use_cache):
        return None
    ids = g("decoder_input_ids")
    cache = g("past_key_values")
    if ids is None or getattr(ids, "ndim", 0) != 2:
        return None
    cache_position = g("cache_position")
    if cache_position is not None and cache_position.shape[0] != ids.shape[1]:
        return None
    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    elif type(cache) is not EncoderDecoderCache or type(cache.self_attention_cache) is not DynamicCache \
            or type(cache.cross_attention_cache) is not DynamicCache:
        return None
    state = cache.__dict__.get(STATE)
    enc = g("encoder_outputs")
    if state is None:  # first step: the cache must be empty, and we need encoder output
        if not _empty(cache):
            return None
        if enc is None:
            if g("input_features") is None:
                return None
            enc = self.model.encoder(g("input_features"), return_dict=True)
        hidden = enc[0]
        if getattr(hidden, "ndim", 0) != 3 or hidden.shape[0] != ids.shape[0] \
                or not _graph_dtype(hidden, self.proj_out.weight):
            return None
        cw = _compiled_for(self, CompiledWhisper.from_model)
        if cw is None or cw.model_dtype != hidden.dtype:
            return None
        t = int(ids.shape[1])
        if t > cw.max_positions:
            return None
        try:
            kx, vx = cw.cross_kv(to_compute(hidden))
            k, v = cw.new_cache(int(ids.shape[0]), CompiledWhisper.bucket_for(t, cw.max_positions))
        except Exception as exc:
            _disable(self, exc)
            return None
        state = _DecodeState(cw, k, v, kx, vx, int(ids.shape[0]))
        state.like = ids
        _attach(cache, state)
    else:
        hidden = enc[0] if enc is not None else None
    cw, t = state.cw, int(ids.shape[1])
    if ids.shape[0] != state.batch or state.length + t > cw.max_positions:
        state.spill(cache)  # stock code takes over (and raises what it raises)
        return None
    need = state.length + t
    if need > state.k[0].shape[2]:
        state.k, state.v = cw.grow_cache(state.k, state.v, CompiledWhisper.bucket_for(need, cw.max_positions))
    logits, state.k, state.v = cw.decode_step(ids, state.length, state.k, state.v, state.kx, state.vx)
    state.length = need
    logits = adopt(to_model(logits, cw), ids)
    from transformers.modeling_outputs import Seq2SeqLMOutput
    if not (g("return_dict") if g("return_dict") is not None else cfg.use_return_dict):
        return (logits, cache) + ((hidden,) if hidden is not None else ())
    return Seq2SeqLMOutput(logits=logits, past_key_values=cache, encoder_last_hidden_state=hidden)
