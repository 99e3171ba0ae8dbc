"""Host tensors (runtime/host_tensors.py): every override against mindtorch's own operator on a
plain tensor of the same values (value, dtype, shape, and the same errors where it declines),
writes that operators see, and ``generate``'s loop expressions running no mindtorch operator."""

import numpy as np
import pytest

import mindnlp  # noqa: F401  (torch -> mindtorch)
import torch

from conftest import counting_operators
from whisper_accel.runtime import host_tensors as HT
from whisper_accel.runtime.host_tensors import HostTensor, host_tensor, plain


def _pair(values, dtype=np.int64):
    arr = np.array(values, dtype=dtype)
    return host_tensor(arr), torch.tensor(arr)


def _same(ours, stock, host=None):
    """The same value as mindtorch's: tensors of the same dtype, shape and values (``host``:
    whether ours must be a host tensor), Python values of the same type."""
    if isinstance(stock, torch.Tensor):
        assert isinstance(ours, torch.Tensor), (ours, stock)
        assert ours.dtype == stock.dtype and tuple(ours.shape) == tuple(stock.shape), (ours, stock)
        np.testing.assert_array_equal(ours.asnumpy(), stock.asnumpy())
        assert str(ours.device) == str(stock.device)
        if host is not None:
            assert isinstance(ours, HostTensor) is host, type(ours)
    else:
        assert type(ours) is type(stock) and ours == stock, (ours, stock)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_integer_operators_equal_mindtorch(dtype):
    """int64 (stock's ``torch.long``) in numpy; int32 left to mindtorch, whose promotion with
    Python ints differs by operator."""
    s, S = _pair([0, 1500, 4000], dtype)
    m, M = _pair([3000, 1000, 4000], dtype)
    host = dtype == np.int64
    for op in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__add__", "__sub__"):
        for other, OTHER in ((m, M), (7, 7), (M, M)):
            _same(getattr(s, op)(other), getattr(S, op)(OTHER), host=host)
    if not host:
        _same((m - s).clamp(max=3000), (M - S).clamp(max=3000), host=False)
        _same(s[1], S[1], host=False)
        return
    _same((s < m).any(), (S < M).any(), host=True)
    _same((s > 10 ** 6).any(), (S > 10 ** 6).any(), host=True)
    _same((m - s).clamp(max=3000), (M - S).clamp(max=3000), host=True)
    _same((m - s).clamp(min=1200, max=2000), (M - S).clamp(min=1200, max=2000), host=True)
    _same((m - s).clamp(min=-5), (M - S).clamp(min=-5), host=True)
    for i in (0, 2, -1):
        _same(s[i], S[i], host=True)
        _same(int(s[i]), int(S[i]))
        _same(s[i].item(), S[i].item())
        _same(bool(s[i] == 1500), bool(S[i] == 1500))
    _same(s[1:], S[1:], host=True)
    _same(s[:-1], S[:-1], host=True)
    assert (s == None) is False and (S == None) is False  # noqa: E711  (mindtorch's answer)


def test_rows_and_slices_of_a_window_of_ids():
    ids, IDS = _pair([[50257, 11, 12, 50256], [50257, 13, 50256, 50256]])
    rows = list(ids)
    for row, ROW in zip(rows, IDS):
        _same(row, ROW, host=True)
        _same(row[:-1], ROW[:-1], host=True)
        _same(bool(row[-1] == 50256), bool(ROW[-1] == 50256))
        _same(row == 50256, ROW == 50256, host=True)
    _same(ids[1], IDS[1], host=True)


def test_float_copies_and_products_equal_mindtorch():
    s, S = _pair([0, 1500, 2999])
    _same(s.to(torch.float64), S.to(torch.float64), host=True)
    _same(s.to(torch.float32), S.to(torch.float32), host=True)
    # mindtorch rounds the Python float to float32 first: kept from its own operator
    offset, OFFSET = s.to(torch.float64) * 0.02 / 2, S.to(torch.float64) * 0.02 / 2
    _same(offset, OFFSET, host=True)
    np.testing.assert_array_equal(offset.asnumpy(), OFFSET.asnumpy())
    with counting_operators() as c:
        again = s.to(torch.float64) * 0.02 / 2
    assert c.n == 0, c.n  # the kept result: no operator
    _same(again, OFFSET)
    # an element of a float host tensor is a plain tensor (what a segment's start holds)
    _same(offset[1], OFFSET[1], host=False)


def _window_loop(seek, frames, segment_offset):
    """``generate``'s expressions on ``seek`` and ``max_frames``, window after window: the
    time offsets and frame counts it computed."""
    out = []
    while (seek < frames).any():
        time_offset = seek.to(torch.float64) * 0.02 / 2
        n = (frames - seek).clamp(max=3000)
        out.append((time_offset, n))
        seek[0] += segment_offset if int(seek[0]) == 0 else n[0]
        seek[1] += n[1]
    return out


def test_loop_expressions_run_no_operator():
    """``generate``'s window loop on host tensors: stock's values; no mindtorch operator once
    each distinct time offset's two products are kept."""
    HT._KEPT.clear()  # the products below not yet kept
    offset = torch.tensor(np.array(3000, np.int64))
    stock = _window_loop(*(torch.tensor(np.array(v, np.int64)) for v in ([0, 0], [5000, 2000])), offset)
    for run in range(2):
        seek, frames = host_tensor(np.zeros(2, np.int64)), host_tensor(np.array([5000, 2000], np.int64))
        with counting_operators() as c:
            ours = _window_loop(seek, frames, offset)
        assert len(ours) == len(stock) == 2
        for (t, n), (T, N) in zip(ours, stock):
            _same(t, T, host=True)
            _same(n, N, host=True)
        np.testing.assert_array_equal(seek.asnumpy(), [5000, 2000])
        assert c.n == (4 if run == 0 else 0), (run, c.n)


def test_writes_are_seen_by_operators_and_wait_for_readers():
    s, S = _pair([0, 10])
    before = torch.stack((s, s), dim=1)  # enqueued before the write: reads the old values
    s[1] += 5
    s[0] = 7
    np.testing.assert_array_equal(before.asnumpy(), [[0, 0], [10, 10]])
    np.testing.assert_array_equal(torch.stack((s, s), dim=1).asnumpy(), [[7, 7], [15, 15]])
    np.testing.assert_array_equal((s * 2).asnumpy(), [14, 30])  # mindtorch's own operator reads the write
    x = s[1]
    x += 1  # an element is a copy: the loop writes it back with t[i] = x
    np.testing.assert_array_equal(s.asnumpy(), [7, 15])
    assert x.item() == 16


def test_declined_operations_are_mindtorch_s():
    """Other operands, dtypes, indices: mindtorch's own operator, result or error."""
    s, S = _pair([3, 4])
    f, F = _pair([0.5, 1.5], np.float32)
    cases = [
        lambda t, u: t < 2.5,  # a float operand
        lambda t, u: t + u.to(torch.int32),  # another dtype
        lambda t, u: t * 3,  # integer products: mindtorch's
        lambda t, u: 5 - t,
        lambda t, u: t.clamp(max=torch.tensor(np.array(3, np.int64))),
        lambda t, u: t.to(torch.int32),
        lambda t, u: t.any(0),
        lambda t, u: t[[0, 1]],
        lambda t, u: t.sum(),
    ]
    for fn in cases:
        _same(fn(s, s), fn(S, S))
    _same(f * 2.0, F * 2.0)
    _same(f < 1, F < 1)
    for bad in (lambda t: t[5], lambda t: bool(t < 4), lambda t: t.item()):
        with pytest.raises(Exception) as ours:
            bad(s)
        with pytest.raises(Exception) as stock:
            bad(S)
        assert type(ours.value) is type(stock.value)


def test_faults_fall_back_to_mindtorch(monkeypatch):
    s, S = _pair([1, 2])
    monkeypatch.setattr(HT, "_values", lambda t: 1 / 0)
    _same(s < 2, S < 2, host=False)
    _same(s[0], S[0], host=False)
    assert bool((s > 0).any()) is True


def test_plain_copies_a_host_tensor():
    s, S = _pair([1, 2])
    p = plain(s)
    assert not isinstance(p, HostTensor) and p is not s
    _same(p, S)
    assert plain(S) is S
