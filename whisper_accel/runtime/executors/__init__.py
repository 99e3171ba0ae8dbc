"""The executors: each a way to run an engine's operations (see :mod:`..engine`).

* :mod:`.graph`: ``plain`` and ``fused`` -- ``mindspore.jit`` graphs without and with the fused
  kernels;
* :mod:`.host`: ``host`` -- numpy and the fused kernels through ctypes, no graph.

Names are those of :data:`whisper_accel.config.EXECUTORS`.
"""
