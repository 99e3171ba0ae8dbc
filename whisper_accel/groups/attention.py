"""The ``attention`` group: Whisper's ``sdpa`` and ``flash_attention_2`` attention run the
FlashAttention-2 kernel (:mod:`whisper_accel.kernels.attention`), or Ascend's fused
``FlashAttentionScore`` where the probe finds it.

``modeling_whisper.ALL_ATTENTION_FUNCTIONS`` -- the name ``WhisperAttention.forward`` looks up on
every call -- becomes a read-through view of the global registry in which the ``sdpa`` and
``flash_attention_2`` entries run the kernel. Only Whisper sees it; the global registry and every
other model stay untouched, and ``eager`` stays stock (it is what users choose to read attention
weights).

transformers calls ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kw)``
with ``query`` ``(B, H, Lq, D)`` and expects ``((B, Lq, H, D) output, weights or None)``.
Anything the kernel does not cover runs the stock function for that key, so results and
warnings are exactly stock's:

* ``output_attentions=True``, a ``head_mask``, dropout while training;
* variable-length (packed) FlashAttention kwargs such as ``cu_seq_lens_q``;
* causal attention with more queries than keys, and (for ``sdpa``, whose causal diagonal is
  top-left aligned) causal attention with unequal query and key lengths.

Inputs that no attention can take (wrong rank, mismatched shapes or dtypes, a mask that does not
broadcast) raise :class:`ValueError` naming the shapes, never a silent wrong answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Optional

from .._environment import Gates
from .._patcher import Patch, wrap
from ..kernels import attention as kernel
from ..runtime.interop import adopt, import_whisper

GATES = Gates()
SUMMARY = "Whisper's sdpa / flash_attention_2 -> FlashAttention-2 kernel (fused on Ascend)"

#: Registry keys whose Whisper calls are routed to the kernel.
ACCELERATED = ("sdpa", "flash_attention_2")
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")


class WhisperAttentionRegistry(Mapping):
    """Read-through view of transformers' ``ALL_ATTENTION_FUNCTIONS`` for Whisper only.

    ``sdpa`` and ``flash_attention_2`` map to :func:`flash_attention_forward`, bound to the
    stock function it falls back to; other keys (``eager``, ``flex_attention``...) are stock.
    """

    def __init__(self, stock):
        self.__wrapped__ = stock
        fallback = _stock_or_none(stock, "sdpa")
        self._ours = {key: _bind(_stock_or_none(stock, key) or fallback, key) for key in ACCELERATED}

    def __getitem__(self, key):
        if key in self._ours:
            return self._ours[key]
        return self.__wrapped__[key]

    def __iter__(self):
        return iter(set(self.__wrapped__) | set(self._ours))

    def __len__(self):
        return len(set(self.__wrapped__) | set(self._ours))

    def __contains__(self, key):
        return key in self._ours or key in self.__wrapped__

    def __getattr__(self, name):  # valid_keys(), get_interface(), ... of AttentionInterface
        return getattr(self.__wrapped__, name)


def make_whisper_registry(stock) -> WhisperAttentionRegistry:
    return WhisperAttentionRegistry(stock)


def _stock_or_none(registry, key) -> Optional[Callable]:
    try:
        return registry[key]
    except KeyError:
        return None


def _bind(stock: Callable, key: str) -> Callable:
    def forward(module, query, key_states, value, attention_mask, **kwargs):
        return flash_attention_forward(module, query, key_states, value, attention_mask,
                                       stock=stock, implementation=key, **kwargs)

    return wrap(forward, stock)


def patches(env) -> List[Patch]:
    mw = import_whisper()
    return [Patch("attention", mw, "ALL_ATTENTION_FUNCTIONS", make_whisper_registry,
                  "Whisper's sdpa / flash_attention_2 -> FlashAttention-2 kernel")]


def flash_attention_forward(module, query, key, value, attention_mask, *, stock: Callable,
                            implementation: str = "sdpa", dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                            **kwargs: Any):
    """Attention in transformers' interface, computed by the FlashAttention-2 kernel."""
    if _needs_stock(module, dropout, kwargs):
        return stock(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    _check_shapes(query, key, value)
    lq, lk = query.shape[2], key.shape[2]
    mask = _additive_mask(attention_mask, query, key)
    if is_causal is None:
        if implementation == "flash_attention_2":
            # FlashAttention masks are 2-D padding masks (or None); causality is the module's.
            is_causal = lq > 1 and getattr(module, "is_causal", False)
        else:  # sdpa's own rule
            is_causal = lq > 1 and attention_mask is None and getattr(module, "is_causal", True)
    if is_causal and (lq > lk or (lq != lk and implementation != "flash_attention_2")):
        # More queries than keys: no alignment leaves every row a key. sdpa with lq != lk aligns
        # the causal diagonal top-left (torch's rule); the kernel aligns it bottom-right
        # (FlashAttention's rule, what a KV cache needs), so stock keeps sdpa's meaning.
        return stock(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    if kernel.fused_available() and query.dtype != _float32():
        out = kernel.fused(query, key, value, mask, scaling, bool(is_causal))
    else:
        out = kernel.flash_attention(query, key, value, mask, scaling, bool(is_causal))
    return adopt(kernel.to_blhd(out), query), None


def _needs_stock(module, dropout, kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if kwargs.get("head_mask") is not None:
        return True
    if dropout and getattr(module, "training", False):
        return True
    return any(kwargs.get(name) is not None for name in _PACKED_KWARGS)


def _check_shapes(query, key, value) -> None:
    q, k, v = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        raise ValueError(f"whisper_accel attention expects 4-D (batch, heads, length, head_dim) "
                         f"query/key/value, got shapes {q}, {k}, {v}")
    if k != v or q[0] != k[0] or q[1] != k[1] or q[3] != k[3]:
        raise ValueError(f"whisper_accel attention: query {q} does not match key {k} / value {v} "
                         f"(batch, heads and head_dim must agree; key and value must be equal)")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"whisper_accel attention: query/key/value dtypes differ "
                         f"({query.dtype}, {key.dtype}, {value.dtype})")
    if query.dtype not in _float_dtypes():  # not is_floating_point(): False for bf16 in mindtorch
        raise ValueError(f"whisper_accel attention: query must be floating point, got {query.dtype}")


def _additive_mask(mask, query, key):
    """The mask as an additive float tensor broadcastable to (B, H, Lq, Lk), or None.

    Accepts what transformers hands over: 4-D additive (sdpa/eager, possibly longer than the
    keys: sliced as stock does), 4-D boolean (True = attend) and 2-D ``(B, Lk)`` padding masks
    (flash_attention_2: 1 = token, 0 = padding).
    """
    if mask is None:
        return None
    import mindspore
    from mindspore import ops

    b, h, lq, _ = query.shape
    lk = key.shape[2]
    shape = tuple(mask.shape)
    if len(shape) == 2:
        if shape != (b, lk):
            raise ValueError(f"whisper_accel attention: 2-D padding mask must be (batch, "
                             f"key_length) = {(b, lk)}, got {shape}")
        keep = ops.cast(mask, mindspore.bool_)
        mask = ops.reshape(keep, (b, 1, 1, lk))
    elif len(shape) == 4:
        if shape[-1] < lk:
            raise ValueError(f"whisper_accel attention: mask {shape} covers fewer keys than "
                             f"the {lk} given")
        if shape[-1] > lk:
            mask = ops.slice(mask, [0, 0, 0, 0], [shape[0], shape[1], shape[2], lk])
        if (shape[0] not in (1, b) or shape[1] not in (1, h) or shape[2] not in (1, lq)):
            raise ValueError(f"whisper_accel attention: mask {shape} does not broadcast to "
                             f"(batch, heads, query_length, key_length) = {(b, h, lq, lk)}")
    else:
        raise ValueError(f"whisper_accel attention: attention_mask must be 2-D or 4-D, got {shape}")
    if mask.dtype == mindspore.bool_:
        zeros = ops.zeros(mask.shape, mindspore.float32)
        mask = ops.select(mask, zeros, ops.fill(mindspore.float32, mask.shape, kernel.NEG))
    return mask


def _float_dtypes():
    import mindspore

    return (mindspore.float16, mindspore.bfloat16, mindspore.float32, mindspore.float64)


def _float32():
    import mindspore

    return mindspore.float32

