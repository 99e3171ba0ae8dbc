"""The fused kernels called through ``ctypes`` on numpy arrays, and numpy views of MindSpore
tensors' host buffers: what the host steps (:mod:`.host_step`) and the half-precision kernels'
check (:mod:`.native`) share.

A kernel keeps MindSpore's Custom AOT signature (``nparam, params, ndims, shapes, dtypes,
stream, extra``), so the same function runs inside a graph and here. :func:`view` reads a
tensor's buffer without a copy; :func:`same` checks that a view reads what the tensor holds
(a parameter whose buffer MindSpore has not materialised, or one on a device, gives no view).
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import ops

#: MindSpore dtype -> the numpy dtype a view of its buffer has (bfloat16: its raw bits)
VIEW_DTYPES = {ms.float32: np.dtype(np.float32), ms.float16: np.dtype(np.float16), ms.bfloat16: np.dtype(np.uint16)}


def upcast(a: np.ndarray) -> np.ndarray:
    """A view's values as float32 (exact for float16 and for bfloat16 bits)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 ``a`` rounded to bfloat16 (to nearest, ties to even), as its raw bits (uint16,
    what :func:`upcast` reads back; finite values: NaN and infinity are not expected here)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


#: On a tensor made by :func:`shared`: the numpy array it shares.
_SHARED = "_whisper_accel_shared"


def shared(a: np.ndarray):
    """A MindSpore tensor sharing the numpy array ``a`` (``Tensor.from_numpy``: no copy), whose
    :func:`view` is ``a`` itself (such a tensor has no buffer address until an operator reads it)."""
    t = ms.Tensor.from_numpy(a)
    setattr(t, _SHARED, a)
    return t


def view(t) -> Optional[np.ndarray]:
    """A numpy view of a float32, float16 or bfloat16 MindSpore tensor's host buffer (no copy),
    or None (another dtype, no host buffer)."""
    a = getattr(t, _SHARED, None)
    if a is not None:
        return a
    dtype = VIEW_DTYPES.get(t.dtype)
    if dtype is None:
        return None
    ptr = t._data_ptr()
    if not ptr:
        return None
    n = int(np.prod(t.shape))
    raw = (ctypes.c_uint8 * (n * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype).reshape(tuple(t.shape))


def same(a: np.ndarray, t) -> bool:
    """The view reads what the tensor holds: all of a vector, the first row of a matrix."""
    if a.ndim == 1:
        want = t
    else:  # MindSpore's slice: a cast copy has no mindtorch device
        want = ops.slice(t, (0,) * a.ndim, (1,) + a.shape[1:])
        a = a[:1]
    return np.array_equal(upcast(a), ops.cast(want, ms.float32).asnumpy())


def views(tensors, dtype=np.float32) -> Optional[list]:
    """:func:`view` of every tensor, each of numpy ``dtype`` and checked with :func:`same`; None
    when any is not (the caller then keeps the graphs)."""
    out = [view(t) for t in tensors]
    if any(a is None or a.dtype != dtype for a in out) or not all(same(a, t) for a, t in zip(out, tensors)):
        return None
    return out


class Call:
    """One kernel call with its argument arrays fixed (MindSpore's Custom AOT signature)."""

    def __init__(self, fn, arrays: Sequence[np.ndarray]):
        n = len(arrays)
        self.fn, self.n, self.arrays = fn, n, tuple(arrays)  # the arrays stay alive with the call
        self.params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        self.ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
        self._dims = [(ctypes.c_int64 * max(a.ndim, 1))(*(a.shape or (1,))) for a in arrays]
        self.shapes = (ctypes.POINTER(ctypes.c_int64) * n)(
            *[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in self._dims])

    def __call__(self) -> None:
        if self.fn(self.n, self.params, self.ndims, self.shapes, None, None, None) != 0:
            raise RuntimeError("a fused kernel refused its arguments")


def pack_bf16(lib, w: np.ndarray) -> np.ndarray:
    """``w`` (N, K) float32 rounded to bfloat16 in ``GemmBF16``'s packed layout (the kernel
    library ``lib``'s ``PackBF16``): (ceil(N / 32), ceil(K / 2), 64) uint16."""
    n, k = w.shape
    out = np.empty(((n + 31) // 32, (k + 1) // 2, 64), np.uint16)
    Call(lib.PackBF16, [np.ascontiguousarray(w, np.float32), out])()
    return out
