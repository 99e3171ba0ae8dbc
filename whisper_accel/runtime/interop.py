"""Interop with MindNLP 0.5.x: Hugging Face ``transformers`` Whisper running on ``mindtorch``.

What every group needs to talk to that stack: importing Whisper in the right order
(:func:`import_whisper`), tagging raw MindSpore results so mindtorch code accepts them
(:func:`adopt`), and moving token ids between mindtorch tensors and numpy (:func:`ids_np`,
:func:`as_tensor`).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .._errors import Unsupported


def import_whisper():
    """Import MindNLP first (it redirects ``torch`` to mindtorch), then transformers' Whisper."""
    import mindnlp  # noqa: F401  (side effect: torch -> mindtorch)
    import mindspore
    import torch

    if torch.Tensor is not mindspore.Tensor:
        raise Unsupported(
            "`torch` is PyTorch, not MindNLP's mindtorch: transformers was imported before "
            "mindnlp in this process, so Whisper runs on PyTorch and there is nothing to patch. "
            "Import mindnlp (or whisper_accel) before transformers."
        )
    from transformers.models.whisper import modeling_whisper

    return modeling_whisper


def adopt(tensor, like):
    """Tag a MindSpore result with the device mindtorch expects on its tensors (graph and
    ``mindspore.ops`` outputs lack it, and mindtorch code then raises 'Tensor must have device')."""
    tensor._device = like.device
    return tensor


def is_tensor(obj: Any) -> bool:
    import mindspore

    return isinstance(obj, mindspore.Tensor)


def ids_np(tokens) -> Optional[np.ndarray]:
    """Integer token ids of a tensor as a 1-D int64 numpy array (``None``: not such a tensor)."""
    if not is_tensor(tokens):
        return None
    arr = tokens.asnumpy()
    if arr.dtype.kind not in "iu":
        return None
    return arr.reshape(-1).astype(np.int64, copy=False)


def dtype_name(tensor) -> str:
    """A tensor's dtype as a bare name (``"int64"``, ``"float32"``, ...)."""
    return str(tensor.dtype).split(".")[-1]


def as_tensor(arr: np.ndarray, like, dtype=None):
    """A mindtorch-ready tensor of ``arr`` (``dtype``: a MindSpore dtype to cast to), tagged
    like ``like``; a 0-d array gives a 0-d tensor."""
    import mindspore

    return adopt(mindspore.Tensor(np.asarray(arr, order="C"), dtype=dtype), like)
