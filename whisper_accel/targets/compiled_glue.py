"""The ``compiled`` group: route Whisper's encoder and per-token decoder through the compiled graphs.

Two replacement factories, each ``make_xxx_forward(original) -> new_forward`` with
``new_forward.__wrapped__ = original``:

* :func:`make_encoder_forward` replaces ``WhisperEncoder.forward``: conv stem, all layers and
  the final norm in one graph (:meth:`CompiledWhisper.encode`).
* :func:`make_generation_forward` replaces ``WhisperForConditionalGeneration.forward`` (not
  ``WhisperDecoder.forward``: the 51865-wide vocab projection is the most expensive single op,
  so it belongs in the same graph). Decoder state lives in a static-shape KV cache (buckets of
  64/128/256/448 slots) attached to the ``EncoderDecoderCache`` object that ``generate`` threads
  through the steps; cross-attention K/V are computed once, on the first step.

Anything else takes the original code: training, labels, head masks, inputs_embeds,
position ids, a decoder attention mask, output_attentions / output_hidden_states,
use_cache=False, dtypes other than float32/float16/bfloat16 (half-precision models run the
graphs in float32 on upcast weight copies; outputs come back in the model's dtype), cache objects other than an (empty or ours)
``EncoderDecoderCache`` of ``DynamicCache``s, or a compile error (then the instance stops trying).
When code outside the forward needs the HF cache contents (``reorder_cache`` for beam search,
``crop``, ``batch_*``, ``to_legacy_cache``) the static cache is first *spilled* into the HF
cache, so the remaining steps run stock and stay correct.

The weight views are cached on the module instance (``_whisper_accel_compiled``). They are
detached views of the parameters; an in-place update (``load_state_dict``, ``param.add_``)
rebinds a parameter's buffer without changing its identity, which an identity/dtype check
cannot see. So with ``REFRESH_PER_CALL`` (default) the views are rebuilt at every encoder call
and at the first step of every generation (~10 ms for tiny, no recompilation: graphs are keyed
on shapes/dtypes); with it off they are rebuilt only when parameter identity/dtype changes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from typing import Any, Optional

from ..kernels.compiled import MODEL_DTYPES, CompiledWhisper, ms, ops
from .mindnlp05 import adopt

logger = logging.getLogger(__name__)

ATTR = "_whisper_accel_compiled"  # on the module: CompiledWhisper, or False after a failure
STATE = "_whisper_accel_state"  # on the EncoderDecoderCache: _DecodeState
_build_lock = threading.Lock()
#: One process-wide re-entrant lock around every patched Whisper entry point (``generate``,
#: ``WhisperForConditionalGeneration.forward``, ``WhisperEncoder.forward``): MindSpore 2.7's
#: PyNative executor on CPU gives wrong results when several Python threads run operator
#: streams at once (seen up to 2.6e-4 relative on logits with 8 threads), so concurrent
#: inference is serialised rather than raced. Re-entrant: generate -> forward -> encoder.
INFERENCE_LOCK = threading.RLock()
REFRESH_PER_CALL = True
_SPILL_METHODS = ("reorder_cache", "crop", "batch_split", "batch_repeat_interleave",
                  "batch_select_indices", "to_legacy_cache", "reset")


def _compiled_for(module, build) -> Optional[CompiledWhisper]:
    cw = module.__dict__.get(ATTR)
    if cw is False:
        return None
    if cw is None or REFRESH_PER_CALL or not cw.matches(module):
        with _build_lock:
            try:
                cw = build(module)
            except Exception as exc:  # unexpected module layout: stock from now on
                _disable(module, exc)
                return None
            module.__dict__[ATTR] = cw
    return cw


def _disable(module, exc) -> None:
    logger.warning("whisper_accel: compiled path disabled for this model: %s", exc)
    module.__dict__[ATTR] = False


def _graph_dtype(t, weight) -> bool:
    """``t`` may enter the graphs: float32/float16/bfloat16 and the dtype of the model's
    ``weight`` (a mismatch is left to stock code, which raises its own error)."""
    return getattr(t, "dtype", None) in MODEL_DTYPES and t.dtype == weight.dtype


def to_compute(t):
    """Input for the graphs: they compute in float32."""
    return t if t.dtype == ms.float32 else ops.cast(t, ms.float32)


def to_model(t, cw):
    """A graph output in the model's dtype, as stock code would return it."""
    return t if cw.model_dtype == ms.float32 else ops.cast(t, cw.model_dtype)


# ----------------------------------------------------------------------------------- encoder

def patches(env):
    """The ``compiled`` group's patches (CPU only: the graphs are validated there)."""
    from .._errors import Unsupported
    from .._patcher import Patch
    from .mindnlp05 import import_whisper

    if env.backend != "CPU":
        raise Unsupported(f"the compiled graphs are validated on CPU only, not {env.backend}")
    mw = import_whisper()
    return [
        Patch("compiled", mw.WhisperEncoder, "forward", serialised(make_encoder_forward),
              "whole encoder as one mindspore.jit graph"),
        Patch("compiled", mw.WhisperForConditionalGeneration, "forward",
              serialised(make_generation_forward),
              "decoder step + vocab projection as one graph on a static KV cache"),
        Patch("compiled", mw.WhisperForConditionalGeneration, "generate", serialised(None),
              "one inference at a time across threads (MindSpore CPU is not thread-safe)"),
    ]


def serialised(make):
    """A factory whose replacement holds :data:`INFERENCE_LOCK` around ``make(original)``
    (or around ``original`` itself when ``make`` is None)."""

    def factory(original):
        inner = original if make is None else make(original)

        @functools.wraps(original)
        def locked(*args, **kwargs):
            with INFERENCE_LOCK:
                return inner(*args, **kwargs)

        locked.__wrapped__ = original
        return locked

    return factory


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


def make_encoder_forward(original):
    def new_forward(self, input_features, attention_mask=None, head_mask=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None):
        cfg = self.config
        oa = output_attentions if output_attentions is not None else cfg.output_attentions
        oh = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        expected = cfg.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        check_features(self, input_features, expected)
        if (self.training or head_mask is not None or oa or oh or getattr(input_features, "ndim", 0) != 3
                or input_features.shape[-1] != expected or not _graph_dtype(input_features, self.conv1.weight)):
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)
        cw = _compiled_for(self, CompiledWhisper.from_encoder)
        if cw is None or cw.model_dtype != input_features.dtype:
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)
        try:
            hidden = adopt(to_model(cw.encode(to_compute(input_features)), cw), input_features)
        except Exception as exc:  # compile/shape problem: stock from now on
            _disable(self, exc)
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)
        if not (return_dict if return_dict is not None else cfg.use_return_dict):
            return (hidden,)
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput(last_hidden_state=hidden)

    new_forward.__wrapped__ = original
    new_forward.__name__ = getattr(original, "__name__", "forward")
    new_forward.__doc__ = getattr(original, "__doc__", None)
    return new_forward


# ---------------------------------------------------------------------------- decoder step

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
