"""What the numpy-driven decode loops (``greedy``, ``beam``) share: when a generation call may
take the fast path, and the encoder states it decodes against.

The loops replace ``GenerationMixin._sample`` / ``_beam_search``, whose arguments are the
prepared ids, processors, criteria, generation config and model kwargs. Anything outside what
the loops reproduce exactly runs the stock loop (:func:`eligible` says False).
"""

from __future__ import annotations

from typing import Any, Callable

from .binding import INFERENCE_LOCK, fault, graph_dtype
from .decode_state import is_empty
from .rules import max_length

#: Model kwargs the loops understand (``attention_mask`` is the encoder's, unread by the decoder).
KWARGS = frozenset({"encoder_outputs", "past_key_values", "use_cache", "attention_mask"})


def eligible(model, input_ids, stopping_criteria, gc, synced_gpus, kw) -> bool:
    """The checks common to both loops: inference, no sampling, no per-step attentions or
    hidden states, plain kwargs, a usable cache (none, or an empty ``EncoderDecoderCache`` of
    ``DynamicCache``s), integer 2-D ids and a ``MaxLengthCriteria``."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if model.training or synced_gpus or gc.do_sample:
        return False
    if gc.return_dict_in_generate and (gc.output_attentions or gc.output_hidden_states):
        return False
    if getattr(gc, "prefill_chunk_size", None) is not None or not set(kw) <= KWARGS:
        return False
    if not (kw.get("use_cache") if kw.get("use_cache") is not None else model.config.use_cache):
        return False
    if getattr(input_ids, "ndim", 0) != 2 or str(input_ids.dtype).split(".")[-1] not in ("int64", "int32"):
        return False
    cache = kw.get("past_key_values")
    if cache is not None and (type(cache) is not EncoderDecoderCache
                              or type(cache.self_attention_cache) is not DynamicCache
                              or type(cache.cross_attention_cache) is not DynamicCache or not is_empty(cache)):
        return False
    return max_length(stopping_criteria) is not None


def fast_or_stock(model, what: str, fast: Callable[[], Any], stock: Callable[[], Any]) -> Any:
    """Under the inference lock: ``fast()`` (``None`` means "not eligible"), else ``stock()``.
    An exception inside ``fast`` is a fault of ours (:func:`binding.fault`, naming ``what``):
    nothing of it is visible, so ``stock()`` runs the call from the start."""
    with INFERENCE_LOCK:
        try:
            out = fast()
        except Exception as exc:  # noqa: BLE001
            fault(model, what, exc)
            out = None
        return stock() if out is None else out


def encoder_hidden(model, kw, rows: int):
    """The encoder states in ``kw`` when the graphs can take them ((rows, frames, d) in the
    model's float dtype), else None."""
    enc = kw.get("encoder_outputs")
    hidden = enc[0] if enc is not None and hasattr(enc, "__getitem__") else None
    if getattr(hidden, "ndim", 0) != 3 or hidden.shape[0] != rows or not graph_dtype(hidden, model.proj_out.weight):
        return None
    return hidden
