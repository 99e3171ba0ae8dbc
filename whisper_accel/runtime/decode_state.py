"""The static KV cache of one generation, attached to the ``EncoderDecoderCache`` that
``generate`` threads through the steps.

The compiled decoder keeps self-attention K/V in per-layer static-shape buffers (buckets of
64/128/256/448 slots) and cross-attention K/V computed once. :class:`DecodeState` holds them on
the HF cache object (:func:`attach`). When code outside the forward needs the HF cache
contents (``reorder_cache`` for beam search, ``crop``, ``batch_*``, ``to_legacy_cache``) the
static cache is first *spilled* into the HF cache, so the remaining steps run stock and stay
correct.

The HF cache may hold ``DynamicCache``s (the default) or ``StaticCache``s (``generate(...,
cache_implementation="static")``, or passed in by the user): :func:`unusable` says which the
fast paths take. A spill writes positions ``0..length-1`` through the cache's own ``update``,
which for a ``StaticCache`` is its in-place ``index_copy_`` into the preallocated buffers: the
same contents stock's steps leave there (the slots past the length stay as ``reset()`` left them).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from .binding import to_model
from .host_step import on_device
from .interop import adopt

STATE = "_whisper_accel_state"  # on the EncoderDecoderCache: DecodeState
_SPILL_METHODS = ("reorder_cache", "crop", "batch_split", "batch_repeat_interleave",
                  "batch_select_indices", "to_legacy_cache", "reset")


def unusable(cache) -> "str | None":
    """Why the fast paths cannot hold their state on ``cache`` (None when they can): it must be an
    ``EncoderDecoderCache`` whose self- and cross-attention caches are each a ``DynamicCache`` or
    a ``StaticCache`` of plain ``StaticLayer``s (not offloaded)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache, StaticLayer

    if type(cache) is not EncoderDecoderCache:
        return "past_key_values is not an EncoderDecoderCache of DynamicCaches / StaticCaches"
    for sub in (cache.self_attention_cache, cache.cross_attention_cache):
        if type(sub) is DynamicCache:
            continue
        if type(sub) is StaticCache and not getattr(sub, "offloading", False) and \
                all(type(layer) is StaticLayer for layer in sub.layers):
            continue
        return "past_key_values is not an EncoderDecoderCache of DynamicCaches / StaticCaches"
    return None


def static_misfit(cache, batch: int, length: int, encoder_length: "int | None" = None) -> "str | None":
    """For a cache of :func:`unusable` kind: why its ``StaticCache`` parts cannot take a generation
    of ``batch`` rows up to ``length`` self-attention positions (None when they can; stock code
    then runs and raises what it raises)."""
    from transformers.cache_utils import StaticCache

    for sub, need, what in ((cache.self_attention_cache, length, "self-attention"),
                            (cache.cross_attention_cache, encoder_length, "cross-attention")):
        if type(sub) is not StaticCache:
            continue
        if need is not None and any(layer.max_cache_len < need for layer in sub.layers):
            return f"the {what} StaticCache is shorter than the generation ({need} positions)"
        if any(getattr(layer, "is_initialized", False) and layer.max_batch_size != batch for layer in sub.layers):
            return f"the {what} StaticCache was built for another batch size"
    return None


def has_static(cache) -> bool:
    from transformers.cache_utils import StaticCache

    return cache is not None and any(type(sub) is StaticCache for sub in
                                     (getattr(cache, "self_attention_cache", None),
                                      getattr(cache, "cross_attention_cache", None)))


def _update(sub, k, v, i: int) -> None:
    """``sub.update(k, v, i)``: what stock's steps leave in layer ``i`` of a cache, positions
    0..n-1 along the slot axis. A ``StaticLayer`` (a ``StaticCache``'s) is written as stock's
    ``update`` writes it -- ``index_copy_`` of those slots into its zero-initialised tensors --
    but as one in-place ``copy_`` of each whole tensor, its other slots kept: mindtorch runs each
    ``index_copy_`` as a slow operator (a static-cache generate's spill was most of its extra time)."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(sub, "layers", None)
    layer = layers[i] if isinstance(layers, list) and i < len(layers) else None
    if type(layer) is not StaticLayer or getattr(sub, "offloading", False) or k.shape[2] > layer.max_cache_len \
            or k.dtype not in (ms.float32, ms.float16):  # numpy has no bfloat16: stock's update
        sub.update(k, v, i)
        return
    if not layer.is_initialized:
        layer.lazy_initialization(k)
    if tuple(layer.keys.shape[:2]) + (layer.keys.shape[3],) != (k.shape[0], k.shape[1], k.shape[3]) \
            or layer.keys.dtype != k.dtype:
        sub.update(k, v, i)  # stock's own error or conversion
        return
    n = int(k.shape[2])
    for dst, src in ((layer.keys, k), (layer.values, v)):
        full = np.array(dst.numpy(), copy=True)
        full[:, :, :n] = src.numpy()
        dst.copy_(adopt(ms.Tensor(full), dst))


class DecodeState:
    """Static KV cache of one generation, attached to its EncoderDecoderCache."""

    def __init__(self, cw, k, v, kx, vx, batch):
        k, v = on_device(k), on_device(v)  # a host step's cache: as MindSpore tensors
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

        # the decoder group's steps may have left a host step's cache (numpy) here
        keys, values = on_device(self.k), on_device(self.v)
        for i in range(len(keys)):
            _update(cache.self_attention_cache, out(ops.gather(keys[i], idx, 2)), out(ops.gather(values[i], idx, 2)), i)
            _update(cache.cross_attention_cache, out(ops.transpose(self.kx[i], (0, 1, 3, 2))), out(self.vx[i]), i)
            cache.is_updated[i] = True

    def spill_for_output(self, given=None):
        """The HF cache a finished generation returns: the static cache spilled into a fresh
        ``EncoderDecoderCache`` first (should that fail, ``given`` is untouched and the stock loop
        can run the generation again), then handed to ``given`` (the cache ``generate`` passed).
        A ``given`` holding ``StaticCache``s (``cache_implementation="static"``, or the user's) is
        filled in place, as stock's steps fill it (should that fail, it is ``reset()``, as
        ``generate`` would hand it to the stock loop)."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        if has_static(given):
            try:
                self.spill(given)
            except BaseException:
                given.reset()
                raise
            return given
        filled = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.spill(filled)
        if given is None:
            return filled
        given.self_attention_cache = filled.self_attention_cache
        given.cross_attention_cache = filled.cross_attention_cache
        given.is_updated = filled.is_updated
        return given


def attach(cache, state: DecodeState) -> None:
    """Put ``state`` on ``cache``: its length answers ``get_seq_length``, and the methods that
    read or edit the HF cache spill the static cache into it first."""
    d = cache.__dict__
    d[STATE] = state
    d["get_seq_length"] = lambda layer_idx=0: state.length
    for name in _SPILL_METHODS:
        bound = getattr(type(cache), name).__get__(cache)

        def spill_then(*a, _bound=bound, **kw):
            state.spill(cache)
            return _bound(*a, **kw)
        d[name] = spill_then


def is_empty(cache) -> bool:
    """The HF cache holds nothing yet (a fresh generation)."""
    # DynamicCache(config=...) pre-creates (unfilled) layers, so ask for lengths, not layers.
    # A StaticCache answers with a tensor (its occupied slots of the first row and head).
    return int(cache.self_attention_cache.get_seq_length()) == 0 and \
        int(cache.cross_attention_cache.get_seq_length()) == 0
