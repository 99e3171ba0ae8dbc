"""Native conv1d forward for ``mindtorch.nn.Conv1d``.

mindtorch's CPU and GPU ``conv1d`` emulate a 1-D convolution with expand_dims + Conv2D +
bias_add + squeeze, each a separately dispatched operator. Where MindSpore has a native 1-D
kernel (``mint.nn.functional.conv1d`` -> ``Conv1DExt``; Ascend in MindSpore 2.7), one call
does it all. :func:`make_conv1d_forward` builds the replacement ``Conv1d.forward``; the caller
decides by probing whether the kernel exists (``_environment.has_native_conv1d``).
"""

from __future__ import annotations

from typing import Callable, Optional


def native_conv1d():
    """MindSpore's native conv1d function (``mint.nn.functional.conv1d``)."""
    from mindspore import mint

    return mint.nn.functional.conv1d


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
        out._device = input.device
        return out

    forward.__wrapped__ = original
    forward.__name__ = "forward"
    forward.__qualname__ = "Conv1d.forward"
    return forward
