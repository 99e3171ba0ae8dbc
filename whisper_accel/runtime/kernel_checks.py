"""The fused kernels' checks: every kernel of a built library against a numpy reference
before any use (:func:`check`), and the numpy references themselves (tests reuse them).

The references compute in float64 from the same inputs; a kernel passes within 1e-5 relative
(the half-precision and host-encoder kernels: bit for bit against their float32 counterparts).
:func:`check_signature` compares the ``DecoderLayer`` argument order the library was compiled
with (its ``ArgNames`` export) with :data:`whisper_accel.kernels.weights.DECODER_LAYER_ARGS`.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np

from ..kernels import weights
from ..kernels.reference import (attention, check_inputs, cross_kv, decoder_layer, gelu, layer_inputs, layer_norm,
                                 softmax)
from . import host_calls

__all__ = ["attention", "cross_kv", "decoder_layer", "gelu", "layer_inputs", "layer_norm", "softmax", "check",
           "check_half", "check_host", "check_signature", "check_bf16", "has_bf16_gemm", "BF16_SHAPES", "MATRICES", "ARG", "HALVES"]


#: Positions of the DecoderLayer kernel's weight matrices among its inputs (from the schema)
MATRICES = weights.matrix_args()
#: DecoderLayer argument name -> position
ARG = {name: i for i, name in enumerate(weights.DECODER_LAYER_ARGS)}
HALVES = (("F16", lambda a: a.astype(np.float16)),
          ("BF16", lambda a: (a.view(np.uint32) >> 16).astype(np.uint16)))  # bfloat16 bits (truncated)


def check_half(library: str) -> Optional[str]:
    """The host steps' half-precision kernels (``DecoderLayerF16``/``BF16``, ``RowsMatMulF16``/
    ``BF16``, called through ctypes) against the float32 kernels on the same weights' exact
    float32 values: equal bit for bit (the layer for 3 beams of one audio with a masked slot;
    the projection with 5 rows, 37 inputs: a scalar tail, 39 outputs). None, else what differs."""
    lib = ctypes.CDLL(library)
    rng = np.random.default_rng(1)
    layer = [a if a.dtype == np.int32 else a.astype(np.float32) for a in layer_inputs(rng, 3, 1, 3)]
    (r, d), (_, h, _, dh) = layer[ARG['x']].shape, layer[ARG['k_cache']].shape
    rows, w = rng.standard_normal((5, 37)).astype(np.float32), rng.standard_normal((39, 37)).astype(np.float32)
    for suffix, lower in HALVES:
        half = [lower(a) if i in MATRICES else a for i, a in enumerate(layer)]
        exact = [host_calls.upcast(a) if i in MATRICES else a for i, a in enumerate(half)]
        got = {}
        for name, args in (("DecoderLayer", exact), ("DecoderLayer" + suffix, half)):
            outs = [np.zeros((r, d), np.float32), np.zeros((r, h, 1, dh), np.float32), np.zeros((r, h, 1, dh), np.float32)]
            host_calls.Call(getattr(lib, name), args + outs)()
            got[name] = outs
        for name, args in (("RowsMatMul", [rows, host_calls.upcast(lower(w))]), ("RowsMatMul" + suffix, [rows, lower(w)])):
            out = np.zeros((5, 39), np.float32)
            host_calls.Call(getattr(lib, name), args + [out])()
            got[name] = [out]
        for base in ("DecoderLayer", "RowsMatMul"):
            if not all(np.array_equal(a, b) for a, b in zip(got[base], got[base + suffix])):
                return f"kernel {base + suffix} differs from {base} on the same weights"
    return None


def check_host(library: str) -> Optional[str]:
    """The host encoder's ``AttentionBias`` (called through ctypes) against ``Attention`` on q and
    v with their biases and scaling applied in numpy's float32: equal bit for bit (2 audios, 11
    queries, 37 keys, 2 heads of 20). None, else what differs."""
    lib = ctypes.CDLL(library)
    rng = np.random.default_rng(2)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v, bq, bv = f32(2, 11, 2, 20), f32(2, 37, 2, 20), f32(2, 37, 2, 20), f32(40), f32(40)
    scale = np.array([0.3], np.float32)
    want, got = np.zeros_like(q), np.zeros_like(q)
    heads = lambda b: b.reshape(2, 20)  # noqa: E731
    host_calls.Call(lib.Attention, [(q + heads(bq)) * scale[0], k, v + heads(bv), want])()
    host_calls.Call(lib.AttentionBias, [q, k, v, bq, bv, scale, got])()
    return None if np.array_equal(want, got) else "kernel AttentionBias differs from Attention on the biased inputs"


#: (M, K, N) of the bfloat16 GEMM's check: 8-row tiles and a tail, an odd K (a zero-padded pair),
#: a 16-column last panel, K over one 1280-input block, one row, and a convolution-like K of 240.
BF16_SHAPES = ((37, 333, 48), (13, 1000, 16), (21, 2565, 96), (1, 64, 80), (200, 240, 384))


def bf16_round(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16, as float64 values."""
    return host_calls.upcast(host_calls.bf16_bits(a)).astype(np.float64)


def has_bf16_gemm(library: str) -> bool:
    """Whether the kernel library at ``library`` was built with ``GemmBF16`` (AVX512_BF16);
    False when it cannot be loaded."""
    try:
        fn = getattr(ctypes.CDLL(library), "HasGemmBF16", None)
    except OSError:
        return False
    return bool(fn and fn())


def check_bf16(library: str) -> Optional[str]:
    """``PackBF16`` + ``GemmBF16`` (through ctypes) against float64 products of the same inputs
    rounded to bfloat16 in numpy (:func:`~.host_calls.bf16_bits`), on :data:`BF16_SHAPES`: within 1e-5
    relative (what is left is float32 summation order). Checked before the host encoder first
    uses them, not with :func:`check` (they are used only when named). None, else what differs;
    "not built" where the library lacks them."""
    if not has_bf16_gemm(library):
        return "not built (needs a CPU with AVX512_BF16)"
    lib = ctypes.CDLL(library)
    rng = np.random.default_rng(3)
    for m, k, n in BF16_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        packed = host_calls.pack_bf16(lib, w)
        got = np.full((m, n), np.nan, np.float32)
        host_calls.Call(lib.GemmBF16, [x, packed, got])()
        ref = bf16_round(x) @ bf16_round(w).T
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        if not err < 1e-5:
            return f"kernel GemmBF16 differs from its reference by {err:.1e} on ({m}, {k}) x ({k}, {n})"
    return None


def check(library: str) -> Optional[str]:
    """Run every kernel once against a float64 numpy reference (rows of 37 values: a tail after
    the 8-wide vectors; attention with 7 queries and 37 keys: a partial row block and a partial
    key tile, and with a head dim of 20; the projection with 5 rows and with 1, 39 outputs; the
    decoder layer for 3 beams of one audio with a masked slot, and for one row; cross K/V of two
    layers for two audios of 13 frames, D 264: a row panel across the audios, a partial column
    block, two blocks of the inner dimension), then :func:`check_half` and :func:`check_host`.
    None when all agree within 1e-5 (the half-precision and host kernels: bit for bit), else
    what differs."""
    import mindspore as ms

    from ..kernels import fused

    i = check_inputs()
    x, y, bias, g, b, chan = i["x"], i["y"], i["bias"], i["g"], i["b"], i["chan"]
    q, k, v, q2, kv2, rows, w = i["q"], i["k"], i["v"], i["q2"], i["kv2"], i["rows"], i["w"]
    layer3, layer1, cross = i["layer3"], i["layer1"], i["cross"]
    r = x + (y + bias)
    want = (("LayerNorm", (x, g, b), (layer_norm(x, g, b),)),
            ("ResLayerNorm", (x, y, bias, g, b), (r, layer_norm(r, g, b))),
            ("BiasResidual", (x, y, bias), (r,)),
            ("BiasGelu", (y, bias), (gelu(y + bias),)),
            ("ChanBiasGelu", (y, chan), (gelu(y + chan[:, None]),)),
            ("Attention", (q, k, v), (attention(q, k, v),)),
            ("Attention", (q2, kv2, -kv2), (attention(q2, kv2, -kv2),)),  # head dim not a multiple of 16
            ("RowsMatMul", (rows, w), (rows @ w.T,)),  # 5 rows: a partial block of 4; 39 outputs: an odd one
            ("RowsMatMul", (rows[:1], w), (rows[:1] @ w.T,)),  # one row: blocks of 8 outputs, then 2, then 1
            ("DecoderLayer", layer3, decoder_layer(layer3)),  # 3 beams of one audio, a masked slot
            ("DecoderLayer", layer1, decoder_layer(layer1)),  # one row, mask shared
            ("CrossKV", cross, cross_kv(*cross, heads=2)))
    for name, args, outs in want:
        tensors = (ms.Tensor(a if a.dtype == np.int32 else a.astype(np.float32)) for a in args)
        got = fused.kernel(library, name, heads=2)(*tensors)
        got = got if isinstance(got, tuple) else (got,)
        for out, ref in zip(got, outs):
            err = float(np.abs(out.asnumpy() - ref).max() / (np.abs(ref).max() + 1e-30))
            if not err < 1e-5:
                return f"kernel {name} differs from its reference by {err:.1e}"
    return check_signature(library) or check_half(library) or check_host(library)


def check_signature(library: str) -> Optional[str]:
    """The ``DecoderLayer`` argument order ``library`` was compiled with (``ArgNames``, exported
    from the same list its code indexes) against :data:`weights.DECODER_LAYER_ARGS` and
    :data:`weights.DECODER_LAYER_OUTS`. None when equal, else the difference."""
    fn = getattr(ctypes.CDLL(library), "ArgNames", None)
    if fn is None:
        return "the kernel library exports no ArgNames (built from an older source)"
    fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_char_p]
    raw = fn(b"DecoderLayer")
    got = tuple(raw.decode().split(",")) if raw else ()
    want = weights.DECODER_LAYER_ARGS + weights.DECODER_LAYER_OUTS
    if got != want:
        diff = next((f"position {i}: kernel {a!r}, schema {b!r}" for i, (a, b) in enumerate(zip(got, want)) if a != b),
                    f"{len(got)} names against {len(want)}")
        return f"kernel DecoderLayer's argument order differs from the weight schema ({diff})"
    return None


