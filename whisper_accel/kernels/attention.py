"""FlashAttention-2 for MindSpore: blockwise attention with an online softmax.

The algorithm (Dao, 2023) never materialises the full ``Lq x Lk`` score matrix. Queries are
split into blocks of ``q_block`` rows and keys/values into blocks of ``kv_block`` rows; for each
query block a running row maximum ``m``, running normaliser ``l`` and unnormalised output
``acc`` are updated block by block::

    s     = q_blk @ k_blk^T (+ mask block)        # scale already folded into q
    m_new = max(m, rowmax(s))
    p     = exp(s - m_new)
    l     = l * exp(m - m_new) + rowsum(p)
    acc   = acc * exp(m - m_new) + p @ v_blk
    out   = acc / l                               # once, after the last block

so memory per head is bounded by ``q_block x kv_block``. Key blocks lying wholly above the
causal diagonal are skipped, and no mask tensor is built when there is none.

Everything here is plain MindSpore (``mindspore.ops``, never mindtorch's Tensor methods, whose
dispatch costs milliseconds per call on CPU); it knows nothing of MindNLP. When one key/value
tile covers the whole key range the recurrence reduces to a single fused softmax, which is the
default for Whisper's sequence lengths (measured fastest on CPU; see benchmarks/PROFILE_NOTES.md).
Running statistics are kept in float32 whatever the input dtype (fp16/bf16 inputs are computed
in fp32 and cast back).

On Ascend, :func:`fused` calls the ``FlashAttentionScore`` kernel, which implements the same
algorithm in one fused operator.
"""

from __future__ import annotations

import functools
from typing import Optional

import mindspore
import numpy as np
from mindspore import ops

#: Default block sizes, chosen by measurement on CPU (see benchmarks/PROFILE_NOTES.md): with the
#: loops compiled, one key/value block covering Whisper's whole 1500-frame encoder sequence is
#: fastest; smaller blocks bound memory at the price of more operators.
DEFAULT_Q_BLOCK = 1536
DEFAULT_KV_BLOCK = 1536

_bmm_t = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()
_reduce_max = ops.ReduceMax(keep_dims=True)
_reduce_sum = ops.ReduceSum(keep_dims=True)
#: Finite "minus infinity" for masked scores: exp(NEG - m) == 0 without NaN for empty rows.
NEG = -1e30


@functools.lru_cache(maxsize=256)
def _causal_bias(q_start: int, q_len: int, k_start: int, k_len: int, offset: int):
    """Additive bias for one (query block, key block) tile, bottom-right aligned causality:
    query row ``i`` sees key ``j`` iff ``j <= i + offset`` with ``offset = Lk - Lq``.
    Built once per tile geometry on the host and cached."""
    rows = np.arange(q_start, q_start + q_len).reshape(q_len, 1)
    cols = np.arange(k_start, k_start + k_len).reshape(1, k_len)
    bias = np.where(cols <= rows + offset, 0.0, NEG).astype(np.float32)
    return mindspore.Tensor(bias)


def flash_attention(q, k, v, mask=None, scale: Optional[float] = None, causal: bool = False,
                    q_block: int = DEFAULT_Q_BLOCK, kv_block: int = DEFAULT_KV_BLOCK):
    """Attention ``softmax(q k^T * scale + mask) v`` computed blockwise.

    :param q: ``(B, H, Lq, D)``.
    :param k: ``(B, H, Lk, D)``; ``v`` the same.
    :param mask: ``None`` or an additive float mask broadcastable to ``(B, H, Lq, Lk)``
        (``-inf``/large negative where attention is not allowed).
    :param scale: multiplies the scores; ``None`` means ``D ** -0.5``. Folded into ``q``.
    :param causal: bottom-right aligned causal masking, applied per tile without a full mask.
    :returns: ``(B, H, Lq, D)`` in the dtype of ``q``.

    With ``causal=True`` every query row must see at least one key, i.e. ``Lq <= Lk``.
    """
    out_dtype = q.dtype
    lq, lk = q.shape[2], k.shape[2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = _f32(q), _f32(k), _f32(v)
    if scale != 1.0:
        q = ops.mul(q, scale)
    if mask is not None:
        mask = _f32(mask)
    offset = lk - lq
    outs = []
    for qs in range(0, lq, q_block):
        qe = min(qs + q_block, lq)
        q_blk = _rows(q, qs, qe)
        # keys past the causal diagonal of this block's last row are never needed
        k_end = min(lk, qe + offset) if causal else lk
        tiles = [(ks, min(ks + kv_block, k_end)) for ks in range(0, k_end, kv_block)]
        if len(tiles) == 1:
            # One key/value tile: the online recurrence below reduces to a single softmax,
            # which MindSpore runs as one fused kernel.
            s = _scores(q_blk, k, mask, causal, qs, qe, 0, k_end, offset)
            outs.append(_bmm(ops.softmax(s, -1), _rows(v, 0, k_end)))
            continue
        m = l = acc = None
        for ks, ke in tiles:  # scores of one tile at a time: memory O(q_block x kv_block)
            s = _scores(q_blk, k, mask, causal, qs, qe, ks, ke, offset)
            blk_max = _max(s)
            m_new = blk_max if m is None else ops.maximum(m, blk_max)
            p = ops.exp(ops.sub(s, m_new))
            pv = _bmm(p, _rows(v, ks, ke))
            if m is None:
                l, acc = _sum(p), pv
            else:
                corr = ops.exp(ops.sub(m, m_new))
                l = ops.add(ops.mul(l, corr), _sum(p))
                acc = ops.add(ops.mul(acc, corr), pv)
            m = m_new
        outs.append(ops.div(acc, l))
    out = outs[0] if len(outs) == 1 else ops.concat(outs, axis=2)
    return ops.cast(out, out_dtype)


def _scores(q_blk, k, mask, causal: bool, qs: int, qe: int, ks: int, ke: int, offset: int):
    s = _bmm_t(q_blk, _rows(k, ks, ke))
    if mask is not None:
        s = ops.add(s, _tile(mask, qs, qe, ks, ke))
    if causal and ke - 1 > qs + offset:  # the tile crosses the diagonal
        s = ops.add(s, _causal_bias(qs, qe - qs, ks, ke - ks, offset))
    return s


def _f32(x):
    return x if x.dtype == mindspore.float32 else ops.cast(x, mindspore.float32)


def _rows(x, start: int, end: int):
    """``x[..., start:end, :]`` along axis -2 with a MindSpore op (Tensor indexing is
    overridden by mindtorch outside compiled graphs)."""
    if start == 0 and end == x.shape[-2]:
        return x
    begin = [0] * len(x.shape)
    size = list(x.shape)
    begin[-2], size[-2] = start, end - start
    return ops.slice(x, begin, size)


def _max(x):
    return _reduce_max(x, -1)


def _sum(x):
    return _reduce_sum(x, -1)


def _tile(mask, qs: int, qe: int, ks: int, ke: int):
    """The ``[qs:qe, ks:ke]`` tile of a mask that may broadcast along the query axis."""
    if mask.shape[-2] != 1:
        mask = _rows(mask, qs, qe)
    begin = [0] * len(mask.shape)
    size = list(mask.shape)
    begin[-1], size[-1] = ks, ke - ks
    if ks == 0 and ke == mask.shape[-1]:
        return mask
    return ops.slice(mask, begin, size)


def fused(q, k, v, mask=None, scale: Optional[float] = None, causal: bool = False):
    """Ascend's fused ``FlashAttentionScore`` (BNSD layout). Only where :func:`has_fused`.

    ``mask`` (additive, broadcastable to ``(B, H, Lq, Lk)``) and ``causal`` (bottom-right
    aligned) are combined into the operator's one ``attn_mask`` (uint8, 1 = masked out):
    causal attention keeps a padding mask too."""
    from mindspore.ops.operations.nn_ops import FlashAttentionScore

    head_num = q.shape[1]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    attn_mask = combined_mask(mask, causal, q.shape[2], k.shape[2])
    op = FlashAttentionScore(head_num=head_num, scale_value=float(scale), input_layout="BNSD",
                             sparse_mode=0)
    return op(q, k, v, None, None, None, attn_mask)[3]


def combined_mask(mask, causal: bool, lq: int, lk: int):
    """``None``, or a uint8 mask (1 = masked out) of the additive ``mask`` OR-ed with the
    bottom-right aligned causal mask: ``(Lq, Lk)`` for causal alone, else ``mask``'s shape
    broadcast over the query and key axes (``(B, 1|H, Lq, Lk)``)."""
    masked = None
    if mask is not None:
        masked = ops.less(_f32(mask), -1.0)
    if causal:
        upper = ops.cast(ops.triu(ops.ones((lq, lk), mindspore.uint8), 1 + lk - lq), mindspore.bool_)
        masked = upper if masked is None else ops.logical_or(masked, upper)
    return None if masked is None else ops.cast(masked, mindspore.uint8)


def to_blhd(out):
    """``(B, H, L, D)`` -> ``(B, L, H, D)``, the layout transformers' attention functions return."""
    return ops.transpose(out, (0, 2, 1, 3))


@functools.lru_cache(maxsize=None)
def fused_available() -> bool:
    """:func:`has_fused`, probed once per process."""
    return has_fused()


def has_fused() -> bool:
    """Probe: does this backend run ``FlashAttentionScore``? (Ascend only as of MindSpore 2.7.)"""
    try:
        if mindspore.get_context("device_target") != "Ascend":
            return False
        import numpy as np

        x = mindspore.Tensor(np.zeros((1, 1, 2, 16), np.float16))
        fused(x, x, x)
        return True
    except Exception:
        return False
