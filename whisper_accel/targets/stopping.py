"""Stopping criteria for the ``generation`` group: greedy ``generate``'s per-step checks.

``MaxLengthCriteria`` / ``EosTokenCriteria`` / ``StoppingCriteriaList.__call__`` compute their
result in numpy from ``input_ids`` (which ``_sample`` syncs on right afterwards anyway) and hand
back one bool tensor; the list ORs in numpy when every criterion is one of these two (exact
type), else the stock loop runs. See :mod:`whisper_accel.targets.generation`.
"""

from __future__ import annotations

import numpy as np

from .generation import _ids_np, _like, _ms, _ours
from .mindnlp05 import adopt


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


def _eos_np(c, input_ids, ids_np):
    if c.eos_token_id.device != input_ids.device:
        c.eos_token_id = c.eos_token_id.to(input_ids.device)
    eos = _ids_np(c.eos_token_id)
    if eos is None:
        raise TypeError("eos ids")
    return np.isin(ids_np[:, -1], eos)


def _as_bool_tensor(arr, like):
    mindspore, _ = _ms()
    return adopt(mindspore.Tensor(np.ascontiguousarray(arr, dtype=bool)), like)


def _ids_ok(input_ids) -> bool:
    mindspore, _ = _ms()
    return isinstance(input_ids, mindspore.Tensor) and input_ids.ndim == 2 and not input_ids.is_complex()


def make_max_length_call(original):
    def __call__(self, input_ids, scores, **kwargs):
        if not _ids_ok(input_ids):
            return original(self, input_ids, scores, **kwargs)
        return _as_bool_tensor(_max_length_np(self, input_ids, int(input_ids.shape[0])), input_ids)

    return _like(__call__, original)


def make_eos_call(original):
    def __call__(self, input_ids, scores, **kwargs):
        mindspore, _ = _ms()
        if not _ids_ok(input_ids) or not isinstance(self.eos_token_id, mindspore.Tensor):
            return original(self, input_ids, scores, **kwargs)
        ids_np = input_ids.asnumpy()
        if ids_np.dtype.kind not in "iu":
            return original(self, input_ids, scores, **kwargs)
        return _as_bool_tensor(_eos_np(self, input_ids, ids_np), input_ids)

    return _like(__call__, original)


def make_criteria_list_call(original):
    from transformers.generation import stopping_criteria as sc
    known = {sc.MaxLengthCriteria: "max", sc.EosTokenCriteria: "eos"}

    def __call__(self, input_ids, scores, **kwargs):
        mindspore, _ = _ms()
        if not (len(self) and _ids_ok(input_ids) and all(_ours(c, known) for c in self)
                and all(known[type(c)] == "max" or isinstance(c.eos_token_id, mindspore.Tensor) for c in self)):
            return original(self, input_ids, scores, **kwargs)
        batch = int(input_ids.shape[0])
        ids_np = None
        done = np.zeros((batch,), dtype=bool)
        for c in self:
            if known[type(c)] == "max":
                done |= _max_length_np(c, input_ids, batch)
            else:
                if ids_np is None:
                    ids_np = input_ids.asnumpy()
                    if ids_np.dtype.kind not in "iu":
                        return original(self, input_ids, scores, **kwargs)
                done |= _eos_np(c, input_ids, ids_np)
        return _as_bool_tensor(done, input_ids)

    return _like(__call__, original)
