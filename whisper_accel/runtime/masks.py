"""The masking logits processors as token-id sets and cached vocabulary masks.

transformers' ``SuppressTokensLogitsProcessor``, ``SuppressTokensAtBeginLogitsProcessor``,
``MinLengthLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor`` each set a fixed set of
token ids to ``-inf``, on some steps. :func:`suppressed` says which ids one of them masks at a
given length; :func:`vocab_mask` turns ids into a cached boolean ``(V,)`` tensor;
:func:`apply_processors` runs a list of them as one ``masked_fill``. Sequential
``where(mask_i, -inf, s)`` equals ``where(any mask_i, -inf, s)`` exactly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from .interop import adopt, ids_np, is_tensor

_MAX_MASKS = 64
_masks: "OrderedDict[tuple, Any]" = OrderedDict()
_masks_lock = threading.Lock()
_FLOATS = ("float16", "float32", "float64", "bfloat16")

#: ``apply_processors`` result meaning "cannot: run the stock code".
FAIL = object()


# Each rule gets the processor, ``input_ids.shape[-1]`` and the processor's token ids (numpy)
# and returns (ids or None, fresh): the token ids to set to -inf this step (None: none), and
# whether stock returns a fresh tensor when nothing is masked.

def _rule_suppress(p, length, ids):
    return ids, True


def _rule_begin(p, length, ids):
    if length == p.begin_index:
        return ids, True
    return None, False


def _rule_min_length(p, length, ids):
    if length < p.min_length:
        return ids, True
    return None, True  # stock: scores.clone()


def _rule_min_new(p, length, ids):
    if length - p.prompt_length_to_skip < p.min_new_tokens:
        return ids, True
    return None, True  # stock: scores.clone()


_RULES: Dict[type, Tuple[Callable, str]] = {}  # class -> (rule, attribute holding the token tensor)


def rules() -> Dict[type, Tuple[Callable, str]]:
    """Processor class -> (rule, attribute holding its token ids), for the four masking types."""
    if not _RULES:
        from transformers.generation import logits_process as lp
        _RULES.update({
            lp.SuppressTokensLogitsProcessor: (_rule_suppress, "suppress_tokens"),
            lp.SuppressTokensAtBeginLogitsProcessor: (_rule_begin, "begin_suppress_tokens"),
            lp.MinLengthLogitsProcessor: (_rule_min_length, "eos_token_id"),
            lp.MinNewTokensLengthLogitsProcessor: (_rule_min_new, "eos_token_id"),
        })
    return _RULES


def processor_ids(p) -> Optional[np.ndarray]:
    """The token ids (numpy) of one of the four masking processors (exact type), or None when
    ``p`` is another type or holds something other than an integer tensor."""
    entry = rules().get(type(p))
    tokens = getattr(p, entry[1], None) if entry else None
    return ids_np(tokens)


def suppressed(p, length: int, tokens: np.ndarray):
    """``(ids or None, fresh)``: what masking processor ``p`` (token ids ``tokens``) sets to
    -inf at sequence length ``length``, and whether stock returns a fresh tensor."""
    return rules()[type(p)][0](p, length, tokens)


def vocab_mask(vocab: int, ids: np.ndarray):
    """Cached bool mindspore Tensor [vocab]: True where ``arange(vocab)`` is in ``ids``."""
    import mindspore

    key = (vocab, np.unique(ids).tobytes())
    with _masks_lock:
        m = _masks.get(key)
        if m is not None:
            _masks.move_to_end(key)
            return m
    m = mindspore.Tensor(np.isin(np.arange(vocab, dtype=np.int64), ids))
    with _masks_lock:
        _masks[key] = m
        while len(_masks) > _MAX_MASKS:
            _masks.popitem(last=False)
    return m


def float_scores(scores) -> bool:
    """``scores`` is a floating tensor the masks can apply to (no autograd)."""
    if not is_tensor(scores) or scores.ndim < 1 or getattr(scores, "requires_grad", False):
        return False
    return str(scores.dtype).lower().rsplit(".", 1)[-1] in _FLOATS


def apply_processors(processors, input_ids, scores):
    """Result of running ``processors`` (all masking types) in order, or :data:`FAIL`."""
    from mindspore import ops

    if not float_scores(scores) or not is_tensor(input_ids):
        return FAIL
    ids, fresh = [], False
    for p in processors:
        tokens = processor_ids(p)
        if tokens is None:
            return FAIL
        got, f = suppressed(p, input_ids.shape[-1], tokens)
        if got is not None:
            ids.append(got)
        fresh = fresh or f
    if ids:
        mask = vocab_mask(int(scores.shape[-1]), np.concatenate(ids))
        return adopt(ops.masked_fill(scores, mask, float("-inf")), scores)
    return scores.clone() if fresh else scores
