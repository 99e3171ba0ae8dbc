"""The ``generation`` group: cheaper per-step glue around ``generate``.

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

from typing import List

import numpy as np

from .._environment import Gates
from .._patcher import Patch
from ..runtime.interop import as_tensor, ids_np, import_whisper, is_tensor
from ..runtime.masks import FAIL, apply_processors, rules

GATES = Gates(backends=("CPU",))
SUMMARY = "masking logits processors and max-length/EOS criteria as one cached mask / numpy check"

#: class -> the replacement ``__call__`` installed (to check a class is still ours).
_installed: dict = {}


def _ours(obj, classes) -> bool:
    t = type(obj)
    return t in classes and _installed.get(t) is t.__dict__.get("__call__")


# ------------------------------------------------------------------- logits processors

def make_processor_call(original):
    """Replacement ``__call__`` for one of the four masking processors."""
    def __call__(self, input_ids, scores):
        try:
            out = apply_processors((self,), input_ids, scores)
        except Exception:  # noqa: BLE001  anything unexpected: stock answers
            out = FAIL
        return original(self, input_ids, scores) if out is FAIL else out

    return __call__


def make_processor_list_call(original):
    """Replacement ``LogitsProcessorList.__call__``: all-known lists take one fused masked_fill."""
    def __call__(self, input_ids, scores, **kwargs):
        if len(self) and all(_ours(p, rules()) for p in self):
            try:
                out = apply_processors(self, input_ids, scores)
            except Exception:  # noqa: BLE001
                out = FAIL
            if out is not FAIL:
                return out
        return original(self, input_ids, scores, **kwargs)

    return __call__


# ------------------------------------------------------------------- stopping criteria

def _max_length_np(c, input_ids, batch):
    from transformers.generation import stopping_criteria as sc
    cur_len = input_ids.shape[1]
    is_done = cur_len >= c.max_length
    if c.max_position_embeddings is not None and not is_done and cur_len > c.max_position_embeddings:
        sc.logger.warning_once(
            "This is a friendly reminder - the current text generation call has exceeded the model's predefined "
            f"maximum length ({c.max_position_embeddings}). Depending on the model, you may observe "
            "exceptions, performance degradation, or nothing at all."
        )
    return np.full((batch,), bool(is_done), dtype=bool)


def _eos_np(c, input_ids, ids):
    if c.eos_token_id.device != input_ids.device:
        c.eos_token_id = c.eos_token_id.to(input_ids.device)
    eos = ids_np(c.eos_token_id)
    if eos is None:
        raise TypeError("eos ids")
    return np.isin(ids[:, -1], eos)


def _ids_ok(input_ids) -> bool:
    return is_tensor(input_ids) and input_ids.ndim == 2 and not input_ids.is_complex()


def _done(arr, like):
    return as_tensor(np.asarray(arr, dtype=bool), like)


def make_max_length_call(original):
    def __call__(self, input_ids, scores, **kwargs):
        if not _ids_ok(input_ids):
            return original(self, input_ids, scores, **kwargs)
        return _done(_max_length_np(self, input_ids, int(input_ids.shape[0])), input_ids)

    return __call__


def make_eos_call(original):
    def __call__(self, input_ids, scores, **kwargs):
        if not _ids_ok(input_ids) or not is_tensor(self.eos_token_id):
            return original(self, input_ids, scores, **kwargs)
        ids = input_ids.asnumpy()
        if ids.dtype.kind not in "iu":
            return original(self, input_ids, scores, **kwargs)
        return _done(_eos_np(self, input_ids, ids), input_ids)

    return __call__


def make_criteria_list_call(original):
    from transformers.generation import stopping_criteria as sc
    known = {sc.MaxLengthCriteria: "max", sc.EosTokenCriteria: "eos"}

    def __call__(self, input_ids, scores, **kwargs):
        if not (len(self) and _ids_ok(input_ids) and all(_ours(c, known) for c in self)
                and all(known[type(c)] == "max" or is_tensor(c.eos_token_id) for c in self)):
            return original(self, input_ids, scores, **kwargs)
        batch = int(input_ids.shape[0])
        ids = None
        done = np.zeros((batch,), dtype=bool)
        for c in self:
            if known[type(c)] == "max":
                done |= _max_length_np(c, input_ids, batch)
            else:
                if ids is None:
                    ids = input_ids.asnumpy()
                    if ids.dtype.kind not in "iu":
                        return original(self, input_ids, scores, **kwargs)
                done |= _eos_np(c, input_ids, ids)
        return _done(done, input_ids)

    return __call__


# ------------------------------------------------------------------- the group

def _register(cls, make):
    def build(original):
        fn = make(original)
        _installed[cls] = fn
        return fn
    return build


def patches(env) -> List[Patch]:
    """The ``generation`` group's patches."""
    import_whisper()  # mindnlp before transformers, and torch must be mindtorch
    from transformers.generation import logits_process as lp
    from transformers.generation import stopping_criteria as sc

    out = []
    for cls in (lp.SuppressTokensLogitsProcessor, lp.SuppressTokensAtBeginLogitsProcessor,
                lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor):
        out.append(Patch("generation", cls, "__call__", _register(cls, make_processor_call),
                         "cached vocab mask + one masked_fill instead of arange/isin/where"))
    out.append(Patch("generation", lp.LogitsProcessorList, "__call__", make_processor_list_call,
                     "known masking processors fused into one masked_fill"))
    out.append(Patch("generation", sc.MaxLengthCriteria, "__call__",
                     _register(sc.MaxLengthCriteria, make_max_length_call),
                     "max-length check in Python, one tensor out"))
    out.append(Patch("generation", sc.EosTokenCriteria, "__call__",
                     _register(sc.EosTokenCriteria, make_eos_call), "EOS check in numpy, one tensor out"))
    out.append(Patch("generation", sc.StoppingCriteriaList, "__call__", make_criteria_list_call,
                     "known criteria OR-ed in numpy, one tensor out"))
    return out
