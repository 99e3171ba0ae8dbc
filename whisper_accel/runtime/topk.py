"""``torch.topk(x, k)`` (largest, sorted, last dim) as mindtorch computes it on CPU, in numpy.

mindtorch's CPU ``topk`` is MindSpore's ``TopK`` kernel, which per row does::

    idx = iota(n)
    if k > n * 0.5:   std::stable_sort(idx, idx + n, cmp)            # ties: lowest index first
    else:             std::nth_element(idx, idx + k, idx + n, cmp)   # libstdc++ introselect
                      std::stable_sort(idx, idx + k, cmp)
    with cmp(a, b) = x[a] > x[b]

so equal values come out in the order libstdc++'s introselect leaves them, which is neither
"lowest index first" nor reproducible with numpy's sorts. :func:`topk` returns that exact
order: without relevant ties (the only case for real log-probs) numpy's answer is the only
possible one; with ties it replays the C++ algorithms (:func:`_kernel_order`) for small rows,
or calls mindtorch's own ``topk`` for long ones (rare: exact float ties among the top k).
"""

from __future__ import annotations

import numpy as np

#: rows up to this length replay the kernel in Python when ties matter; longer rows ask mindtorch
REPLAY_MAX = 4096


def topk(x: np.ndarray, k: int):
    """(values, indices int32) of the k largest entries of each row of 2-D ``x``, in the order
    mindtorch's ``torch.topk(x, k)`` returns them on CPU (MindSpore 2.7 ``TopK`` kernel)."""
    k = min(k, x.shape[1])
    idx = np.stack([_row_topk(row, k) for row in x])
    return np.take_along_axis(x, idx, axis=1), idx.astype(np.int32)


def _row_topk(row: np.ndarray, k: int) -> np.ndarray:
    """The kernel's top-k indices of one row: numpy when ties cannot matter, else the replay."""
    cand = _candidates(row, k)
    vals = row[cand]
    top = np.argpartition(vals, len(vals) - k)[len(vals) - k:] if len(vals) > k else np.arange(len(vals))
    order = top[np.argsort(-vals[top], kind="stable")]
    best = vals[order]
    tie_inside = k > 1 and bool((best[1:] == best[:-1]).any())
    tie_boundary = np.count_nonzero(vals == best[-1]) > np.count_nonzero(best == best[-1])
    if tie_inside or tie_boundary or np.isnan(best[-1]):
        return _row_exact(row, k)
    return cand[order]


def _candidates(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of every entry >= a lower bound of the k-th largest value (a superset of the top
    k, holding every tie of the k-th value): the bound is the k-th largest of a strided sample,
    so a 5 x 51865 row costs one compare pass instead of a full partition."""
    n = len(row)
    stride = n // max(64 * k, 1024)
    if stride < 4 or np.isnan(row.max()):
        return np.arange(n)
    sample = row[::stride]
    bound = np.partition(sample, len(sample) - k)[len(sample) - k]
    return np.flatnonzero(row >= bound)


def _row_exact(row: np.ndarray, k: int) -> np.ndarray:
    """The kernel's top-k indices for one row whose ties matter."""
    n = row.shape[0]
    if n <= REPLAY_MAX:
        return np.asarray(_kernel_order(row.tolist(), k), dtype=np.int64)
    import torch  # mindtorch (mindnlp redirects it)

    return torch.topk(torch.tensor(row[None].astype(np.float32)), k=k)[1].asnumpy()[0].astype(np.int64)


def _kernel_order(v: list, k: int) -> list:
    """The C++ kernel on a Python list: the indices of the k largest values, in its order."""
    n = len(v)
    idx = list(range(n))
    if k > int(n * 0.5):
        return sorted(idx, key=lambda i: -v[i])[:k]  # stable: lowest index first among ties
    _nth_element(idx, k, v)
    return sorted(idx[:k], key=lambda i: -v[i])


# --- libstdc++'s std::nth_element (introselect), with comp(a, b) = v[a] > v[b] -----------------


def _nth_element(a: list, nth: int, v: list) -> None:
    n = len(a)
    if n == 0 or nth == n:
        return
    first, last, depth = 0, n, 2 * (n.bit_length() - 1)
    while last - first > 3:
        if depth == 0:
            _heap_select(a, first, nth + 1, last, v)
            a[first], a[nth] = a[nth], a[first]
            return
        depth -= 1
        cut = _partition_pivot(a, first, last, v)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(a, first, last, v)


def _partition_pivot(a, first, last, v):
    mid = first + (last - first) // 2
    _move_median_to_first(a, first, first + 1, mid, last - 1, v)
    pivot = v[a[first]]
    lo, hi = first + 1, last
    while True:
        while v[a[lo]] > pivot:
            lo += 1
        hi -= 1
        while pivot > v[a[hi]]:
            hi -= 1
        if not lo < hi:
            return lo
        a[lo], a[hi] = a[hi], a[lo]
        lo += 1


def _move_median_to_first(a, result, i, j, m, v):
    x, y, z = v[a[i]], v[a[j]], v[a[m]]
    if x > y:
        pick = j if y > z else (m if x > z else i)
    else:
        pick = i if x > z else (m if y > z else j)
    a[result], a[pick] = a[pick], a[result]


def _insertion_sort(a, first, last, v):
    for i in range(first + 1, last):
        val = a[i]
        if v[val] > v[a[first]]:
            a[first + 1:i + 1] = a[first:i]
            a[first] = val
        else:
            j = i - 1
            while v[val] > v[a[j]]:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = val


def _heap_select(a, first, middle, last, v):
    length = middle - first
    if length >= 2:  # make_heap
        parent = (length - 2) // 2
        while True:
            _adjust_heap(a, first, parent, length, a[first + parent], v)
            if parent == 0:
                break
            parent -= 1
    for i in range(middle, last):
        if v[a[i]] > v[a[first]]:  # pop_heap(first, middle, i)
            val = a[i]
            a[i] = a[first]
            _adjust_heap(a, first, 0, length, val, v)


def _adjust_heap(a, base, hole, length, val, v):
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if v[a[base + child]] > v[a[base + child - 1]]:
            child -= 1
        a[base + hole] = a[base + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[base + hole] = a[base + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2  # push_heap
    while hole > top and v[a[base + parent]] > v[val]:
        a[base + hole] = a[base + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[base + hole] = val
