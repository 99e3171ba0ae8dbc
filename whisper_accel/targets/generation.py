"""The ``generation`` group: cheaper per-step glue around greedy ``generate``.

With the ``compiled`` group each decode step's forward is one graph, and the PyNative glue that
transformers runs around it (every mindtorch op costs ~1-5 ms of dispatch on CPU) becomes a
large share of the step. This group replaces the hot glue with implementations that give the
same values using fewer ops:

* ``SuppressTokensLogitsProcessor`` / ``SuppressTokensAtBeginLogitsProcessor`` /
  ``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor``: stock builds
  ``arange(V)``, runs ``isin`` and ``where`` (and a ``clone``) every step. Here the boolean
  vocabulary mask is built once in numpy and cached per (vocab size, token ids); the step is
  one ``mindspore.ops.masked_fill`` (or one copy when the processor is inactive).
* ``LogitsProcessorList.__call__``: when every processor is one of the four above (exact type),
  the active masks are OR-ed (cached) and applied with a single ``masked_fill``. Sequential
  ``where(mask_i, -inf, s)`` equals ``where(any mask_i, -inf, s)`` exactly.
* ``MaxLengthCriteria`` / ``EosTokenCriteria`` / ``StoppingCriteriaList.__call__``: the
  result is computed in numpy from ``input_ids`` (which ``_sample`` syncs on right afterwards
  anyway) and handed back as one bool tensor; the list ORs in numpy when every criterion is one
  of these two (exact type), else the stock loop runs.

Every replacement falls back to the original for inputs it does not handle: non-mindspore
tensors, non-floating scores, scores that require grad, ``input_ids`` that are not 2-D,
subclasses, or any exception while building a mask. Values, dtypes, shapes and devices of
results are those of the originals; a processor that stock returns as a fresh tensor is a
fresh tensor here too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

from .mindnlp05 import adopt

GROUP = "generation"
_MAX_MASKS = 64
_masks: "OrderedDict[tuple, Any]" = OrderedDict()
_masks_lock = threading.Lock()
_FLOATS = ("float16", "float32", "float64", "bfloat16")
#: class -> the replacement ``__call__`` we installed (to check a class is still ours).
_installed: dict = {}


def _ms():
    import mindspore
    from mindspore import ops

    return mindspore, ops


def _like(fn, original):
    """Give a replacement the original's name and doc, and ``__wrapped__`` for unwrapping."""
    fn.__wrapped__ = original
    fn.__name__ = getattr(original, "__name__", "__call__")
    fn.__doc__ = getattr(original, "__doc__", None)
    return fn


def _float_scores(scores) -> bool:
    mindspore, _ = _ms()
    if not isinstance(scores, mindspore.Tensor) or scores.ndim < 1:
        return False
    if getattr(scores, "requires_grad", False):
        return False
    return str(scores.dtype).lower().rsplit(".", 1)[-1] in _FLOATS


def _ids_np(tokens) -> Optional[np.ndarray]:
    """Token ids as a 1-D int64 numpy array (``None``: not something we understand)."""
    mindspore, _ = _ms()
    if isinstance(tokens, mindspore.Tensor):
        arr = tokens.asnumpy()
    else:
        return None
    if arr.dtype.kind not in "iu":
        return None
    return arr.reshape(-1).astype(np.int64, copy=False)


def _mask(vocab: int, ids: np.ndarray):
    """Cached bool mindspore Tensor [vocab]: True where ``arange(vocab)`` is in ``ids``."""
    key = (vocab, np.unique(ids).tobytes())
    with _masks_lock:
        m = _masks.get(key)
        if m is not None:
            _masks.move_to_end(key)
            return m
    mindspore, _ = _ms()
    m = mindspore.Tensor(np.isin(np.arange(vocab, dtype=np.int64), ids))
    with _masks_lock:
        _masks[key] = m
        while len(_masks) > _MAX_MASKS:
            _masks.popitem(last=False)
    return m


def _fill(scores, mask):
    _, ops = _ms()
    return adopt(ops.masked_fill(scores, mask, float("-inf")), scores)


# ------------------------------------------------------------------- logits processors
#
# Each ``_plan_xxx(p, length, ids)`` gets the processor, ``input_ids.shape[-1]`` and the
# processor's token ids (numpy) and returns (ids or None, fresh): the token ids to set to -inf
# this step (None: none), and whether stock returns a fresh tensor when nothing is masked.

def _plan_suppress(p, length, ids):
    return ids, True


def _plan_begin(p, length, ids):
    if length == p.begin_index:
        return ids, True
    return None, False


def _plan_min_length(p, length, ids):
    if length < p.min_length:
        return ids, True
    return None, True  # stock: scores.clone()


def _plan_min_new(p, length, ids):
    if length - p.prompt_length_to_skip < p.min_new_tokens:
        return ids, True
    return None, True  # stock: scores.clone()


_ATTRS = {}  # class -> (plan, attribute holding the token tensor)


def _plans():
    if not _ATTRS:
        from transformers.generation import logits_process as lp
        _ATTRS.update({
            lp.SuppressTokensLogitsProcessor: (_plan_suppress, "suppress_tokens"),
            lp.SuppressTokensAtBeginLogitsProcessor: (_plan_begin, "begin_suppress_tokens"),
            lp.MinLengthLogitsProcessor: (_plan_min_length, "eos_token_id"),
            lp.MinNewTokensLengthLogitsProcessor: (_plan_min_new, "eos_token_id"),
        })
    return _ATTRS


_FAIL = object()


def processor_ids(p) -> Optional[np.ndarray]:
    """The token ids (numpy) of one of the four masking processors (exact type), or None when
    ``p`` is another type or holds something other than an integer mindspore tensor."""
    mindspore, _ = _ms()
    entry = _plans().get(type(p))
    tokens = getattr(p, entry[1], None) if entry else None
    return _ids_np(tokens) if isinstance(tokens, mindspore.Tensor) else None


def _apply_plans(processors, input_ids, scores):
    """Result of running ``processors`` (all of known exact types) in order, or ``_FAIL``."""
    mindspore, _ = _ms()
    if not _float_scores(scores) or not isinstance(input_ids, mindspore.Tensor):
        return _FAIL
    plans = _plans()
    ids, fresh = [], False
    for p in processors:
        tokens = processor_ids(p)
        if tokens is None:
            return _FAIL
        got, f = plans[type(p)][0](p, input_ids.shape[-1], tokens)
        if got is not None:
            ids.append(got)
        fresh = fresh or f
    if ids:
        return _fill(scores, _mask(int(scores.shape[-1]), np.concatenate(ids)))
    return scores.clone() if fresh else scores


def make_processor_call(original):
    """Replacement ``__call__`` for one of the four masking processors."""
    def __call__(self, input_ids, scores):
        try:
            out = _apply_plans((self,), input_ids, scores)
        except Exception:  # noqa: BLE001  anything unexpected: stock answers
            out = _FAIL
        return original(self, input_ids, scores) if out is _FAIL else out

    return _like(__call__, original)


def _ours(obj, cls_map) -> bool:
    t = type(obj)
    return t in cls_map and _installed.get(t) is t.__dict__.get("__call__")


def make_processor_list_call(original):
    """Replacement ``LogitsProcessorList.__call__``: all-known lists take one fused masked_fill."""
    def __call__(self, input_ids, scores, **kwargs):
        if len(self) and all(_ours(p, _plans()) for p in self):
            try:
                out = _apply_plans(self, input_ids, scores)
            except Exception:  # noqa: BLE001
                out = _FAIL
            if out is not _FAIL:
                return out
        return original(self, input_ids, scores, **kwargs)

    return _like(__call__, original)


def _register(cls, make):
    def build(original):
        fn = make(original)
        _installed[cls] = fn
        return fn
    return build


def patches(env):
    """The ``generation`` group's patches (CPU only, like the compiled graphs they surround)."""
    from .._errors import Unsupported
    from .._patcher import Patch
    from .mindnlp05 import import_whisper

    if env.backend != "CPU":
        raise Unsupported(f"the generation glue is validated on CPU only, not {env.backend}")
    import_whisper()  # mindnlp before transformers, and torch must be mindtorch
    from transformers.generation import logits_process as lp

    from .stopping import make_criteria_list_call, make_eos_call, make_max_length_call
    from transformers.generation import stopping_criteria as sc

    out = []
    for cls in (lp.SuppressTokensLogitsProcessor, lp.SuppressTokensAtBeginLogitsProcessor,
                lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor):
        out.append(Patch(GROUP, cls, "__call__", _register(cls, make_processor_call),
                         "cached vocab mask + one masked_fill instead of arange/isin/where"))
    out.append(Patch(GROUP, lp.LogitsProcessorList, "__call__", make_processor_list_call,
                     "known masking processors fused into one masked_fill"))
    out.append(Patch(GROUP, sc.MaxLengthCriteria, "__call__", _register(sc.MaxLengthCriteria, make_max_length_call),
                     "max-length check in Python, one tensor out"))
    out.append(Patch(GROUP, sc.EosTokenCriteria, "__call__", _register(sc.EosTokenCriteria, make_eos_call),
                     "EOS check in numpy, one tensor out"))
    out.append(Patch(GROUP, sc.StoppingCriteriaList, "__call__", make_criteria_list_call,
                     "known criteria OR-ed in numpy, one tensor out"))
    return out
