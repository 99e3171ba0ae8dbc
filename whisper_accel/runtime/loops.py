"""What the numpy-driven decode loops (``greedy``, ``beam``) share: when a generation call may
take the fast path, and the encoder states it decodes against.

The loops replace ``GenerationMixin._sample`` / ``_beam_search``, whose arguments are the
prepared ids, processors, criteria, generation config and model kwargs. Anything outside what
the loops reproduce exactly runs the stock loop (:func:`why_stock` says why); each call is
counted in :mod:`.calls`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from . import calls, padding
from .binding import INFERENCE_LOCK, compiled_to_decode, fault
from .decode_state import is_empty, static_misfit, unusable
from .interop import adopt, dtype_name
from .rules import max_length

#: Model kwargs the loops understand (``attention_mask`` is the encoder's, unread by the decoder).
KWARGS = frozenset({"encoder_outputs", "past_key_values", "use_cache", "attention_mask"})


#: Set on a generation config (by the ``word_timestamps`` group) when token timestamps need the
#: cross-attentions but the caller did not ask for attentions: ``output_attentions`` stays off
#: (the encoder and the loops keep their fast paths) and the loops return the per-step
#: cross-attention probabilities themselves (:func:`wants_cross`). A loop that runs stock code
#: instead turns ``output_attentions`` back on first (:func:`for_stock`).
CROSS_ATTENTIONS = "_whisper_accel_cross_attentions"


def wants_cross(gc) -> bool:
    """Must this generation return its per-step cross-attentions (for token timestamps)?"""
    return bool(getattr(gc, CROSS_ATTENTIONS, False)) and bool(gc.return_dict_in_generate)


def for_stock(gc):
    """``gc`` ready for the stock loop: ``output_attentions`` on again when :func:`wants_cross`."""
    if getattr(gc, CROSS_ATTENTIONS, False):
        gc.output_attentions = True
    return gc


def cross_attentions(steps, like):
    """The loops' collected per-step cross-attentions as stock returns them: a tuple over steps
    of tuples over layers of mindtorch tensors; None when none were collected."""
    if steps is None:
        return None
    return tuple(tuple(adopt(p, like) for p in step) for step in steps)


def why_stock(model, input_ids, stopping_criteria, gc, synced_gpus, kw) -> Optional[str]:
    """The checks common to both loops: why this call must run the stock loop, or None when the
    fast loop may take it (inference, no per-step attentions or hidden states, plain kwargs --
    a decoder attention mask of 0/1 shaped like the ids (:mod:`.padding`) --, a usable cache -- none, or an empty
    ``EncoderDecoderCache`` of ``DynamicCache``s and/or ``StaticCache``s (``cache_implementation="static"``)
    that fit the generation --, integer 2-D ids and a ``MaxLengthCriteria``)."""
    if model.training:
        return "the model is in training mode"
    if synced_gpus:
        return "synced_gpus=True"
    if gc.return_dict_in_generate and (gc.output_attentions or gc.output_hidden_states):
        return ("output_attentions / output_hidden_states (also set by return_token_timestamps): the fast "
                "loop does not return per-step attentions")
    if getattr(gc, "prefill_chunk_size", None) is not None:
        return "prefill_chunk_size is set"
    extra = sorted(set(kw) - KWARGS - {"decoder_attention_mask"})
    if extra:
        return f"model kwargs {', '.join(extra)} are not on the fast path"
    mask = kw.get("decoder_attention_mask")
    why = None if mask is None else padding.usable(mask, input_ids)
    if why is not None:
        return why
    if not (kw.get("use_cache") if kw.get("use_cache") is not None else model.config.use_cache):
        return "use_cache=False"
    if getattr(input_ids, "ndim", 0) != 2 or dtype_name(input_ids) not in ("int64", "int32"):
        return "decoder input ids are not a 2-D integer tensor"
    if max_length(stopping_criteria) is None:
        return "no MaxLengthCriteria among the stopping criteria"
    cache = kw.get("past_key_values")
    if cache is not None:
        why = unusable(cache)
        if why is not None:
            return why
        if not is_empty(cache):
            return "past_key_values is not empty"
        enc = kw.get("encoder_outputs")
        hidden = enc[0] if enc is not None and hasattr(enc, "__getitem__") else None
        why = static_misfit(cache, int(input_ids.shape[0]), max_length(stopping_criteria) - 1,
                            None if hidden is None else int(hidden.shape[1]))
        if why is not None:
            return why
    return None


class UserCodeError(Exception):
    """Raised inside a fast loop around an exception of the user's own code that the loop calls
    (a streamer's ``put``/``end``): :func:`fast_or_stock` re-raises the original as stock would,
    instead of treating it as a fault of ours."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


def user_call(fn, *args):
    """``fn(*args)`` (user code); its exception wrapped in :class:`UserCodeError`."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        raise UserCodeError(exc) from exc


def fast_or_stock(model, entry: str, fast: Callable[[], Any], stock: Callable[[], Any]) -> Any:
    """Under the inference lock: ``fast()``, else ``stock()``, counted in :mod:`.calls` under
    ``entry``. ``fast()`` returns the result, or a ``str``: why stock code must run instead
    (nothing of the call has run yet). An exception inside ``fast`` is a fault of ours
    (:func:`binding.fault`): nothing of it is visible, so ``stock()`` runs the call from the start."""
    with INFERENCE_LOCK:
        try:
            out = fast()
        except UserCodeError as err:  # the user's code raised: as stock would, not a fault
            calls.fast(entry)
            raise err.exc
        except Exception as exc:  # noqa: BLE001
            out = fault(model, entry, exc)
        if isinstance(out, str):
            calls.stock(entry, out)
            return stock()
        calls.fast(entry)
        return out


def prepare(model, kw, input_ids, stopping_criteria):
    """``(compiled model, encoder states, padding)`` for a loop over ``input_ids``' rows, or a
    ``str``: why the stock loop must run (:func:`binding.compiled_to_decode`). ``padding``: the
    decoder attention mask's :class:`.padding.DecoderPadding`, or None when nothing is masked."""
    enc = kw.get("encoder_outputs")
    hidden = enc[0] if enc is not None and hasattr(enc, "__getitem__") else None
    got = compiled_to_decode(model, hidden, int(input_ids.shape[0]), max_length(stopping_criteria))
    return got if isinstance(got, str) else (got, hidden, padding.from_kwargs(kw))
