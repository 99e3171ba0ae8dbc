"""Sampling for the greedy loop (``do_sample=True``; Whisper samples when ``temperature`` > 0,
as temperature fallback does): transformers' sampling warpers in numpy, and the draw.

* :func:`warper` turns ``TemperatureLogitsWarper`` / ``TopKLogitsWarper`` / ``TopPLogitsWarper``
  (exact types; what ``generate`` builds from ``temperature`` / ``top_k`` / ``top_p``) into a
  numpy function on the step's (B, V) float32 scores. Temperature and top-k give stock's values
  bit for bit (one float32 division; ``scores < k-th largest`` set to what stock's
  ``masked_fill`` writes for ``filter_value``: :func:`masked_fill_value`). Top-p
  mirrors stock's ascending sort, softmax and cumulative sum in float32; a token whose
  cumulative probability sits within float32 rounding of ``1 - top_p`` may be kept where stock
  drops it or the reverse (its probability is then below ~1e-6 of the mass).
* :func:`draw` samples one id per row from ``softmax(scores)`` by inverse CDF in float64.

Randomness: stock draws with ``torch.multinomial``, which mindtorch 0.5 on CPU does not seed
(``torch.manual_seed`` and ``transformers.set_seed`` leave it irreproducible). The draw here
takes its uniforms from numpy's global generator, which ``transformers.set_seed(n)`` and
``numpy.random.seed(n)`` seed: a seeded patched run is reproducible. Samples are not stock's
samples (stock's cannot be reproduced); the per-step distributions are stock's, which is what
the tests compare.
"""

from __future__ import annotations

from typing import Callable, Optional

import functools

import numpy as np


def warper(p) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """A numpy stand-in for the sampling warper ``p``, or None when ``p`` is not one of the three."""
    from transformers.generation import logits_process as lp

    t = type(p)
    if t is lp.TemperatureLogitsWarper:
        temperature = p.temperature
        return lambda s: s / np.float32(temperature)
    if t is lp.TopKLogitsWarper:
        fill = masked_fill_value(float(p.filter_value))
        return lambda s: top_k(s, p.top_k, fill)
    if t is lp.TopPLogitsWarper:
        fill = masked_fill_value(float(p.filter_value))
        return lambda s: top_p(s, p.top_p, p.min_tokens_to_keep, fill)
    return None


@functools.lru_cache(maxsize=None)
def masked_fill_value(value: float) -> np.float32:
    """What mindtorch's float32 ``masked_fill`` writes for ``value`` (the warpers' filter): asked
    once, because mindtorch 0.5 on CPU writes float32's lowest finite value for ``-inf``."""
    import torch

    out = torch.tensor(np.zeros(1, np.float32)).masked_fill(torch.tensor(np.ones(1, bool)), value)
    return np.float32(out.asnumpy()[0])


def top_k(scores: np.ndarray, k: int, filter_value: np.float32) -> np.ndarray:
    k = min(int(k), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k:].min(axis=-1, keepdims=True)
    return np.where(scores < kth, np.float32(filter_value), scores).astype(np.float32, copy=False)


def top_p(scores: np.ndarray, p: float, min_keep: int, filter_value: np.float32) -> np.ndarray:
    order = np.argsort(scores, axis=-1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(ordered), axis=-1, dtype=np.float32)
    remove_sorted = cumulative <= np.float32(1 - p)
    remove_sorted[:, -min_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(filter_value), scores).astype(np.float32, copy=False)


def softmax(scores: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis (``-inf`` entries get probability 0)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def draw(scores: np.ndarray) -> np.ndarray:
    """One id per row, drawn from ``softmax(scores)`` (B, V) with numpy's global generator."""
    s = scores.astype(np.float64)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    cdf = np.cumsum(e, axis=-1)
    u = np.random.random_sample(scores.shape[0]) * cdf[:, -1]
    ids = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u)], dtype=np.int64)
    return np.minimum(ids, scores.shape[-1] - 1)
