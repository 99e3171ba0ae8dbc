"""MindSpore's native 1-D convolution (``mint.nn.functional.conv1d`` -> ``Conv1DExt``).

mindtorch's CPU and GPU ``conv1d`` emulate a 1-D convolution with expand_dims + Conv2D +
bias_add + squeeze, each a separately dispatched operator. Where MindSpore has a native 1-D
kernel (Ascend in MindSpore 2.7) one call does it all. Whether it exists is probed, not assumed
(``whisper_accel._environment.has_native_conv1d``).
"""

from __future__ import annotations

from typing import Callable


def native_conv1d() -> Callable:
    """MindSpore's native conv1d function: ``(input, weight, bias, stride, padding, dilation,
    groups) -> output``."""
    from mindspore import mint

    return mint.nn.functional.conv1d
