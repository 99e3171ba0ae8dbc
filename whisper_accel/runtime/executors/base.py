"""What the executors that need the fused kernels share: their settings and weights, why they
cannot run here, the bound graphs module, and the host implementation built once per model."""

from __future__ import annotations

from typing import Callable, Optional

from .. import native
from ..engine import Executor, Unavailable


class KernelExecutor(Executor):
    """An executor of the fused kernels (``fused``, ``host``) for weights ``w``."""

    #: a host implementation, once built (:meth:`host_impl`)
    impl = None

    def unavailable(self) -> Optional[str]:
        # cooperative: a graph executor's own reason (its next class in the MRO) comes first
        return super().unavailable() or native.state(self.config)["reason"]

    def fused(self):
        """:mod:`whisper_accel.kernels.fused`, bound to this config's library."""
        fused = native.fused_graphs(self.config)
        if fused is None:
            raise RuntimeError(native.state(self.config)["reason"])
        return fused

    def host_impl(self, build: Callable, why: str):
        """``build(w, library path)`` once (None from it: :class:`Unavailable` with ``why``)."""
        if self.impl is None:
            lib = native.library(self.config)
            impl = build(self.w, lib.path) if lib is not None else None
            if impl is None:
                raise Unavailable(why)
            self.impl = impl
        return self.impl
