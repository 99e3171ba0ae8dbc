"""A decoder attention mask with padding, as the compiled decode steps take it.

Whisper's batched long-form with ``condition_on_prev_tokens=True`` starts each window with the
previous window's tokens, left-padded to the longest row, and passes
``decoder_attention_mask = ids != pad``. Stock then (``GenerationMixin.prepare_inputs_for_generation``)
embeds positions ``cumsum(mask) - 1`` with 1 at padding, masks the padded slots as keys on
top of causality, and appends a 1 to the mask per generated token.
:class:`DecoderPadding` gives the compiled steps exactly that: the position-embedding rows of
any step and the attendable slots of a cache of any size (numpy; the graphs take them as inputs).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


class DecoderPadding:
    """The padding of a generation's first ``L`` decoder slots: ``mask`` (rows, L) of 0/1."""

    def __init__(self, mask: np.ndarray):
        self.mask = np.asarray(mask).astype(bool)
        self.rows, self.length = self.mask.shape

    def _full(self, slots: int) -> np.ndarray:
        extra = max(0, slots - self.length)
        full = self.mask[:, :slots]
        return np.concatenate([full, np.ones((self.rows, extra), bool)], axis=1) if extra else full

    def positions(self, pos0: int, t: int) -> np.ndarray:
        """(rows, t) int32: the position-embedding rows of slots ``pos0 .. pos0 + t - 1``."""
        full = self._full(pos0 + t)
        pos = np.cumsum(full, axis=1, dtype=np.int64) - 1
        pos[~full] = 1
        return np.ascontiguousarray(pos[:, pos0:pos0 + t].astype(np.int32))

    def keys(self, slots: int) -> np.ndarray:
        """(rows, slots) bool: the slots a query may attend to (False at padding)."""
        return np.ascontiguousarray(self._full(slots))


def from_kwargs(kw) -> Optional[DecoderPadding]:
    """The padding of a generation's ``decoder_attention_mask`` (None when there is no mask or
    it masks nothing). The caller has checked it with :func:`usable`."""
    mask = kw.get("decoder_attention_mask")
    if mask is None:
        return None
    arr = mask.asnumpy()
    return None if bool((arr == 1).all()) else DecoderPadding(arr)


def usable(mask, input_ids) -> Optional[str]:
    """Why a decoder attention mask cannot be handled (None when it can): it must be (rows, L)
    like ``input_ids``, of 0/1 (or bool) values."""
    shape = tuple(getattr(mask, "shape", ()))
    if shape != tuple(input_ids.shape):
        return f"a decoder attention mask of shape {shape}, not the decoder ids' {tuple(input_ids.shape)}"
    arr = mask.asnumpy()
    if not np.isin(arr, (0, 1)).all():
        return "a decoder attention mask with values other than 0 and 1"
    return None
