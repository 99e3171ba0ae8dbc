"""Small tensors of a window's bookkeeping whose operators run in numpy.

``WhisperGenerationMixin.generate`` keeps, per audio of the batch, where the next window starts
(``seek``) and how many frames the audio has (``max_frames``), and works on them inline, in its
own loop body, once or twice a window::

    while (seek < max_frames).any():
        time_offset = seek.to(torch.float64) * time_precision / input_stride
        seek_num_frames = (max_frames - seek).clamp(max=num_segment_frames)
        ...
        seek[prev_i] += segment_offset

and ``generate_with_fallback`` checks each decoded row's last id (``seek_sequence[-1] ==
pad_token_id``, then the EOS) and cuts it (``seek_sequence[:-1]``). On MindNLP each of those is
a mindtorch operator through MindSpore's asynchronous pipeline, and several read values back:
``max_frames - seek`` copies both operands through numpy first (mindtorch's ``sub`` moves its
inputs to the device), ``seek[i] += x`` builds a scatter from a meshgrid. ~10 ms a window on a
2-core CPU, where PyTorch takes microseconds (benchmarks/PROFILE_NOTES.md section 45).

A :class:`HostTensor` is an ordinary MindSpore tensor (its own buffer holds its values; any
operator not listed here runs as mindtorch runs it, on those values) whose class overrides the
operators that loop applies. They compute in numpy from ``asnumpy()`` (which waits for any
operator still writing the tensor) and return new host tensors:

* int64 tensors (``torch.long``, what stock makes; bool for ``any()`` and truth): the
  comparisons with an int or an int64 tensor,
  ``any()``, truth, ``item()``/``int()``/``__index__``, ``+``/``-`` (and in place), ``clamp``
  with int bounds, reading an element, a row or a slice (``t[i]``, ``t[a:b]``: copies, where
  torch gives views; the loop only reads them, or adds to an element and writes it back),
  writing an element (``t[i] = v``, by ``assign_value``: MindSpore waits for operators still
  reading the old buffer), and the conversion to float64/float32 where every value is exact;
* their float copies: ``*`` and ``/`` by a Python number. Mindtorch rounds a Python float to
  float32 before it multiplies a float64 tensor, so these are not recomputed in numpy: each
  distinct (values, operator, number) runs once as mindtorch's operator and its result is kept
  (:mod:`.kept`). An element of a float host tensor is a plain tensor (the segments' ``start``
  times the user gets are stock's kind of tensor).

Anything else (another dtype, a float or tensor operand of another dtype, an index that is not
an int in range, more than :data:`MAX_ELEMENTS` elements) goes to mindtorch's own operator, with
its own result or error; so does any failure inside an override. What the overrides return
holds the values and dtype mindtorch's operator gives (the tests compare each against it).
Host tensors are made by :mod:`.windows` for ``seek``, ``max_frames`` and a window's decoded
ids; :func:`plain` turns one back into a plain tensor where stock code may hand it to the user.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import mindspore as ms
import numpy as np

from .interop import as_tensor
from .kept import Kept

#: a host tensor's most elements (bookkeeping: one value per audio; a window's ids: batch x tokens)
MAX_ELEMENTS = 1 << 16
#: float products already computed by mindtorch: (operator, values, number) -> array
_KEPT = Kept(1 << 14)


class _OnCpu(NamedTuple):
    """What :func:`~.interop.as_tensor` reads of ``like``: its device."""

    device: object


def host_tensor(values, like=None) -> "HostTensor":
    """A host tensor holding ``values`` (a numpy array or scalar), on ``like``'s device (CPU
    when not given)."""
    if like is None:
        import torch

        like = _OnCpu(torch.device("cpu"))
    t = as_tensor(values, like)
    t.__class__ = HostTensor
    return t


def plain(t):
    """``t`` as a plain mindtorch tensor when it is a host tensor (a copy); anything else as is.
    For stock code that may hand a tensor on to the user."""
    return as_tensor(t.asnumpy(), t) if isinstance(t, HostTensor) else t


#: what an override returns when mindtorch's operator should answer
_DECLINE = object()


def _or_mindtorch(compute):
    """The operator ``compute`` overrides: its result, or mindtorch's operator of the same name
    when it declines or fails (with mindtorch's result or error)."""
    name = compute.__name__

    def method(self, *args, **kwargs):
        try:
            out = compute(self, *args, **kwargs)
        except Exception:  # noqa: BLE001  mindtorch's operator answers
            out = _DECLINE
        if out is _DECLINE:
            return getattr(super(HostTensor, self), name)(*args, **kwargs)
        return out

    method.__name__ = method.__qualname__ = name
    method.__doc__ = compute.__doc__
    return method


def _values(t) -> Optional[np.ndarray]:
    """A host tensor's values (``asnumpy`` waits for whatever still writes it), or None when the
    overrides do not take it: over :data:`MAX_ELEMENTS`, or not a bool, int or float dtype."""
    arr = t.asnumpy()
    return arr if arr.size <= MAX_ELEMENTS and arr.dtype.kind in "biuf" else None


def _ints(t) -> Optional[np.ndarray]:
    """An int64 host tensor's values (stock's ``torch.long``), else None: mindtorch promotes
    narrower integers with Python ints differently by operator (int32 - 7 is int64, int32 + 7
    int32), so those stay its own."""
    arr = _values(t)
    return arr if arr is not None and arr.dtype == np.int64 else None


def _operand(mine: np.ndarray, dtype, other):
    """``other`` as a numpy value of ``mine``'s dtype, or None: a Python int that fits, or a
    (host or plain) tensor of the same dtype and at most :data:`MAX_ELEMENTS` elements."""
    if isinstance(other, bool) or not isinstance(other, (numbers.Integral, ms.Tensor)):
        return None
    if isinstance(other, numbers.Integral):
        info = np.iinfo(mine.dtype)
        return mine.dtype.type(other) if info.min <= other <= info.max else None
    if other.dtype != dtype or int(np.prod(other.shape)) > MAX_ELEMENTS:
        return None
    return other.asnumpy()


def _binary(t, other, fn):
    """``fn`` of an integer host tensor and ``other`` in numpy, as a host tensor when the
    result keeps the dtype (or is a comparison's bool); else declines."""
    a = _ints(t)
    b = None if a is None else _operand(a, t.dtype, other)
    if b is None:
        return _DECLINE
    out = fn(a, b)
    return host_tensor(out, t) if out.dtype in (a.dtype, np.bool_) else _DECLINE


def _single(arr: Optional[np.ndarray], convert):
    """``convert`` of a one-element array's value, or declines."""
    return convert(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else _DECLINE


def _numpy_binary(name: str, fn):
    """The override ``name``: :func:`_binary` with ``fn``."""
    def compute(self, other):
        return _binary(self, other, fn)

    compute.__name__ = name
    return _or_mindtorch(compute)


def _element(key, arr) -> bool:
    return type(key) is int and arr is not None and arr.ndim >= 1 and -arr.shape[0] <= key < arr.shape[0]


class HostTensor(ms.Tensor):
    """See the module docstring. Made by :func:`host_tensor` only."""

    # ---- comparisons, any, truth
    __lt__ = _numpy_binary("__lt__", np.less)
    __le__ = _numpy_binary("__le__", np.less_equal)
    __gt__ = _numpy_binary("__gt__", np.greater)
    __ge__ = _numpy_binary("__ge__", np.greater_equal)

    @_or_mindtorch
    def __eq__(self, other):
        if other is None:  # mindtorch's answer
            return False
        return _binary(self, other, np.equal)

    __ne__ = _numpy_binary("__ne__", np.not_equal)

    __hash__ = ms.Tensor.__hash__  # defining __eq__ would drop it

    @_or_mindtorch
    def any(self, *args, **kwargs):
        arr = _values(self)
        if args or kwargs or arr is None or arr.dtype.kind not in "biu":
            return _DECLINE
        return host_tensor(np.array(arr.any()), self)

    @_or_mindtorch
    def __bool__(self):
        arr = _values(self)
        return bool(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else _DECLINE

    @_or_mindtorch
    def item(self):
        return _single(_values(self), lambda v: v.item())

    @_or_mindtorch
    def __int__(self):
        return _single(_ints(self), int)

    @_or_mindtorch
    def __index__(self):
        return _single(_ints(self), int)

    # ---- integer arithmetic
    __add__ = _numpy_binary("__add__", np.add)
    __sub__ = _numpy_binary("__sub__", np.subtract)

    def _assign(self, out):
        """In place: the values of ``out`` (MindSpore's ``assign_value`` waits for operators
        still reading the old buffer)."""
        if out is _DECLINE:
            return _DECLINE
        self.assign_value(ms.Tensor(out.asnumpy()))
        return self

    @_or_mindtorch
    def __iadd__(self, other):
        return self._assign(_binary(self, other, np.add))

    @_or_mindtorch
    def __isub__(self, other):
        return self._assign(_binary(self, other, np.subtract))

    @_or_mindtorch
    def clamp(self, min=None, max=None):  # noqa: A002  (torch's names)
        arr = _ints(self)
        if arr is None or (min is None and max is None) \
                or any(isinstance(b, ms.Tensor) or _operand(arr, self.dtype, b) is None
                       for b in (min, max) if b is not None):
            return _DECLINE
        out = arr
        if min is not None:  # stock's order: the lower bound, then the upper one
            out = np.maximum(out, arr.dtype.type(min))
        if max is not None:
            out = np.minimum(out, arr.dtype.type(max))
        return host_tensor(out, self)

    # ---- conversion, float products
    @_or_mindtorch
    def to(self, *args, **kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], ms.dtype.Type) \
                or args[0] not in (ms.float64, ms.float32):
            return _DECLINE
        arr = _ints(self)
        limit = 2 ** 53 if args[0] == ms.float64 else 2 ** 24  # where every integer is exact
        if arr is None or (arr.size and int(np.abs(arr.astype(np.int64)).max()) > limit):
            return _DECLINE
        return host_tensor(arr.astype(np.float64 if args[0] == ms.float64 else np.float32), self)

    def _float_op(self, op: str, other):
        """``self <op> other`` for a float host tensor and a Python number: mindtorch's
        operator's result, computed once per distinct values and number (:mod:`.kept`)."""
        arr = _values(self)
        if arr is None or arr.dtype.kind != "f" or isinstance(other, bool) or not isinstance(other, (int, float)):
            return _DECLINE
        key = (op, arr.dtype.str, arr.shape, arr.tobytes(), type(other).__name__, other)
        return host_tensor(_KEPT.get(key, lambda: getattr(as_tensor(arr, self), op)(other).asnumpy()), self)

    @_or_mindtorch
    def __mul__(self, other):
        return self._float_op("__mul__", other)

    @_or_mindtorch
    def __truediv__(self, other):
        return self._float_op("__truediv__", other)

    # ---- elements
    @_or_mindtorch
    def __getitem__(self, key):
        arr = _values(self)
        if arr is None or arr.dtype.kind in "iu" and arr.dtype != np.int64:
            return _DECLINE
        if _element(key, arr):  # a float element is what the user may get: a plain tensor
            return as_tensor(arr[key], self) if arr.dtype.kind == "f" else host_tensor(arr[key], self)
        if (type(key) is slice and arr.ndim >= 1 and arr.dtype.kind != "f"
                and all(b is None or type(b) is int for b in (key.start, key.stop)) and key.step in (None, 1)):
            return host_tensor(arr[key], self)
        return _DECLINE

    @_or_mindtorch
    def __setitem__(self, key, value):
        arr = _ints(self)
        if not _element(key, arr) or arr.ndim != 1:
            return _DECLINE
        v = _operand(arr, self.dtype, value)
        if v is None or np.ndim(v) != 0:
            return _DECLINE
        new = arr.copy()
        new[key] = v
        self.assign_value(ms.Tensor(new))
        return None
