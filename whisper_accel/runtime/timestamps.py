"""``WhisperTimeStampLogitsProcessor`` in numpy, for the ``greedy`` loop's host mode.

It writes what stock writes, value for value: on mindtorch, stock's ``scores[...] = -inf`` stores
``finfo(float32).min`` (see :func:`masked_value`), so that is what is stored here too.

Stock runs ~15 PyNative mindtorch ops per step (clone, index writes per row, ``log_softmax``,
``logsumexp``, ``max``), each paying PyNative's dispatch cost on CPU. The rules are index arithmetic on the generated
ids, exactly reproducible in numpy, except one comparison: "is the total probability of the
timestamp tokens above that of the best text token", which stock evaluates in float32 with
MindSpore's kernels. Here it is evaluated in float64; when the two sides are closer than
:data:`TIE_GUARD` (natural-log units) the result could depend on rounding, so
:func:`timestamp_scores` returns ``None`` and the caller runs the stock processor for that step.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: |log P(any timestamp) - log P(best text token)| below this is decided by stock code.
TIE_GUARD = 1e-3


def masked_value() -> np.float32:
    """What stock's ``scores[idx] = -float("inf")`` writes on mindtorch: not -inf but
    ``finfo(default dtype).min`` (mindtorch.tensor() replaces -inf), e.g. -3.40282e38."""
    import torch  # mindtorch

    return np.float32(torch.finfo(torch.get_default_dtype()).min)


def supported(p) -> bool:
    """The attributes the numpy version reads are plain ints / bools."""
    ints = (p.no_timestamps_token_id, p.timestamp_begin, p.eos_token_id, p.begin_index)
    extra = p.max_initial_timestamp_index
    return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ints) \
        and (extra is None or isinstance(extra, (int, np.integer))) \
        and isinstance(p._detect_timestamp_from_logprob, bool)


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(x - m))))


def timestamp_scores(p, ids: np.ndarray, scores: np.ndarray) -> Optional[np.ndarray]:
    """What ``p(input_ids, scores)`` returns, for ``ids`` (B, L) int64 and ``scores`` (B, V)
    float32; or None when a row's timestamp-vs-text decision is within :data:`TIE_GUARD`."""
    inf = masked_value()
    s = scores.copy()
    s[:, p.no_timestamps_token_id] = inf
    tb = int(p.timestamp_begin)
    for k in range(ids.shape[0]):
        seq = ids[k, p.begin_index:]
        last_ts = len(seq) >= 1 and seq[-1] >= tb
        penultimate_ts = len(seq) < 2 or seq[-2] >= tb
        if last_ts:
            if penultimate_ts:
                s[k, tb:] = inf
            else:
                s[k, :p.eos_token_id] = inf
        stamps = seq[seq >= tb]
        if stamps.size > 0:
            last = int(stamps[-1]) if (last_ts and not penultimate_ts) else int(stamps[-1]) + 1
            s[k, tb:last] = inf
    if ids.shape[1] == p.begin_index:
        s[:, :tb] = inf
        if p.max_initial_timestamp_index is not None:
            s[:, tb + p.max_initial_timestamp_index + 1:] = inf
    if not p._detect_timestamp_from_logprob:
        return s
    for k in range(ids.shape[0]):
        row = s[k].astype(np.float64)
        row[row <= inf] = -np.inf  # masked: no probability mass (stock's float32 agrees)
        stamp, text = _logsumexp(row[tb:]), float(np.max(row[:tb]))
        if np.isfinite(stamp) and np.isfinite(text) and abs(stamp - text) < TIE_GUARD:
            return None
        if stamp > text:
            s[k, :tb] = inf
    return s
