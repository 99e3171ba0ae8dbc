"""Patch sets for MindNLP 0.5.x: Hugging Face ``transformers`` Whisper on ``mindtorch``.

* ``attention``: ``modeling_whisper.ALL_ATTENTION_FUNCTIONS`` -- the name WhisperAttention.forward
  looks up on every call -- becomes a read-through view of the global registry in which the
  ``sdpa`` and ``flash_attention_2`` entries run :mod:`whisper_accel.kernels.attention`. Only
  Whisper sees it; the global registry and every other model stay untouched, and ``eager`` stays
  stock (it is what users choose to read attention weights).
* ``conv1d``: ``mindtorch.nn.Conv1d.forward`` runs MindSpore's native conv1d kernel directly
  instead of mindtorch's expand_dims + Conv2D + bias_add emulation, where the backend has it.
"""

from __future__ import annotations

import sys
from typing import List

from .._errors import Unsupported
from .._patcher import Patch


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


def attention_patches(env) -> List[Patch]:
    mw = import_whisper()
    from . import hf_attention

    return [Patch("attention", mw, "ALL_ATTENTION_FUNCTIONS", hf_attention.make_whisper_registry,
                  "Whisper's sdpa / flash_attention_2 -> FlashAttention-2 kernel")]


def conv1d_patches(env) -> List[Patch]:
    from .._environment import has_native_conv1d

    if not has_native_conv1d():
        raise Unsupported(
            f"no native conv1d kernel on {env.backend or 'this backend'} (MindSpore's Conv1DExt "
            "probe failed; it is an Ascend kernel in MindSpore 2.7): mindtorch's Conv2D "
            "emulation stays"
        )
    import_whisper()
    conv_module = sys.modules.get("mindtorch.nn.modules.conv")
    if conv_module is None:
        import mindtorch.nn.modules.conv as conv_module
    from ..kernels.conv1d import make_conv1d_forward

    return [Patch("conv1d", conv_module.Conv1d, "forward", make_conv1d_forward,
                  "Conv1d.forward -> native conv1d kernel (Conv1DExt)")]
