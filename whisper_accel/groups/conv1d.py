"""The ``conv1d`` group: ``mindtorch.nn.Conv1d.forward`` calls MindSpore's native conv1d kernel
(:mod:`whisper_accel.kernels.conv1d`) once, instead of mindtorch's expand_dims + Conv2D +
bias_add emulation. Gated on the ``native_conv1d`` probe (an Ascend kernel in MindSpore 2.7; on
CPU the group is reported as skipped). Untested on real Ascend hardware: its behaviour is tested
with a fake kernel (tests/test_groups.py).
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

from .._environment import Gates
from .._patcher import Patch
from ..kernels.conv1d import native_conv1d
from ..runtime.interop import adopt, import_whisper

GATES = Gates(probes=("native_conv1d",))
SUMMARY = "Conv1d.forward -> native conv1d kernel (Conv1DExt) where the probe finds it"


def make_conv1d_forward(original: Callable, conv: Optional[Callable] = None) -> Callable:
    """A ``Conv1d.forward`` that calls ``conv`` (default: :func:`native_conv1d`) once.

    Non-``zeros`` padding modes (reflect, replicate, circular) keep the stock path, and so do
    inputs that are not 2-D/3-D floating tensors of the weight's dtype (stock raises its own
    error for those).
    """
    kernel = conv or native_conv1d()

    def forward(self, input):
        if (self.padding_mode != "zeros" or len(input.shape) not in (2, 3)
                or input.dtype != self.weight.dtype or not input.is_floating_point()):
            return original(self, input)
        out = kernel(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        return adopt(out, input)

    return forward


def patches(env) -> List[Patch]:
    import_whisper()
    conv_module = sys.modules.get("mindtorch.nn.modules.conv")
    if conv_module is None:
        import mindtorch.nn.modules.conv as conv_module
    return [Patch("conv1d", conv_module.Conv1d, "forward", make_conv1d_forward,
                  "Conv1d.forward -> native conv1d kernel (Conv1DExt)")]
