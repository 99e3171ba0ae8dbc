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
from . import host_calls


def gelu(x):
    from math import erf, sqrt

    return x * 0.5 * (np.vectorize(erf)(x / sqrt(2.0)) + 1.0)


def layer_norm(x, g, b):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b


def softmax(s):
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def attention(q, k, v):  # (B, T, H, Dh), (B, S, H, Dh) -> (B, T, H, Dh)
    return np.einsum("bhts,bshd->bthd", softmax(np.einsum("bthd,bshd->bhts", q, k)), v)


def layer_inputs(rng, rows, audios, pos0, heads=2, dh=12, slots=6, frames=9, ffn=40):
    """Random ``DecoderLayer`` inputs in :data:`~whisper_accel.kernels.weights.DECODER_LAYER_ARGS`'
    order: D = 24 (a tail after the 8-wide vectors), slot ``pos0`` written by the step; with
    several rows, slot 1 of row 0 is masked."""
    d = heads * dh

    def m(*shape):
        return rng.standard_normal(shape) / np.sqrt(shape[-1])

    ok = np.ones((rows if rows > 1 else 1, slots))
    if rows > 1:
        ok[0, 1] = 0
    v = {}
    # drawn in this order (the references' inputs stay the same whatever the schema's order)
    v["x"] = m(rows, d) * 3
    v["ln1.weight"], v["ln1.bias"] = 1 + 0.1 * m(d), 0.1 * m(d)
    for name in ("q_w", "q_b", "k_w", "v_w", "v_b", "o_w", "o_b"):
        v["attn." + name] = m(d, d) if name.endswith("_w") else m(d)
    v["k_cache"], v["v_cache"] = m(rows, heads, slots, dh), m(rows, heads, slots, dh)
    v["positions"], v["key_ok"] = np.array([pos0], np.int32), ok
    v["ln2.weight"], v["ln2.bias"] = 1 + 0.1 * m(d), 0.1 * m(d)
    for name in ("q_w", "q_b", "o_w", "o_b"):
        v["cross." + name] = m(d, d) if name.endswith("_w") else m(d)
    v["k_x"], v["v_x"] = m(audios, heads, dh, frames), m(audios, heads, frames, dh)
    v["ln3.weight"], v["ln3.bias"] = 1 + 0.1 * m(d), 0.1 * m(d)
    v["fc1_w"], v["fc1_b"], v["fc2_w"], v["fc2_b"] = m(ffn, d), m(ffn), m(d, ffn), m(d)
    v["scaling"] = np.array([0.3])
    return tuple(v[n] for n in weights.DECODER_LAYER_ARGS)


def decoder_layer(a):
    """The ``DecoderLayer`` kernel's inputs (named by
    :data:`~whisper_accel.kernels.weights.DECODER_LAYER_ARGS`) -> (x, k, v), in float64."""
    a = dict(zip(weights.DECODER_LAYER_ARGS, a))
    x, kc, vc, kx, vx, ok = a["x"], a["k_cache"], a["v_cache"], a["k_x"], a["v_x"], a["key_ok"]
    r, d = x.shape
    _, h, s, dh = kc.shape
    p0, sc, beams = int(a["positions"][0]), float(a["scaling"][0]), r // kx.shape[0]
    heads = lambda t: t.reshape(r, h, 1, dh)  # noqa: E731
    n = layer_norm(x, a["ln1.weight"], a["ln1.bias"])
    q, k = heads((n @ a["attn.q_w"].T + a["attn.q_b"]) * sc), heads(n @ a["attn.k_w"].T)
    v = heads(n @ a["attn.v_w"].T + a["attn.v_b"])
    keys, vals = kc.copy(), vc.copy()
    keys[:, :, p0:p0 + 1], vals[:, :, p0:p0 + 1] = k, v
    visible = (np.arange(s) <= p0) & (ok > 0)  # (1 or R, S)
    # the graph's mask: float32's lowest added (a row with nothing visible averages every slot)
    scores = q @ keys.transpose(0, 1, 3, 2) + np.where(visible, 0.0, -3.4028234663852886e38)[:, None, None, :]
    x = x + (softmax(scores) @ vals).reshape(r, d) @ a["attn.o_w"].T + a["attn.o_b"]
    q = heads((layer_norm(x, a["ln2.weight"], a["ln2.bias"]) @ a["cross.q_w"].T + a["cross.q_b"]) * sc)
    kt, vv = np.repeat(kx, beams, 0), np.repeat(vx, beams, 0)  # rows of one audio share its K/V
    x = x + (softmax(q @ kt) @ vv).reshape(r, d) @ a["cross.o_w"].T + a["cross.o_b"]
    h1 = gelu(layer_norm(x, a["ln3.weight"], a["ln3.bias"]) @ a["fc1_w"].T + a["fc1_b"])
    x = x + h1 @ a["fc2_w"].T + a["fc2_b"]
    return x, k, v


def cross_kv(enc, *ws, heads=2):
    """The ``CrossKV`` kernel's inputs (the encoder output, then each layer's
    :class:`~whisper_accel.kernels.weights.CrossKV` fields) -> per layer K^T (B, H, Dh, S), V
    (B, H, S, Dh), in float64."""
    b, s, d = enc.shape
    out = []
    for wk, wv, bv in zip(ws[0::3], ws[1::3], ws[2::3]):
        out += [(enc @ wk.T).reshape(b, s, heads, d // heads).transpose(0, 2, 3, 1),
                (enc @ wv.T + bv).reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3)]
    return tuple(out)


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

    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((2, 3, 37)) * 2 for _ in range(2))
    bias, g, b = (rng.standard_normal(37) for _ in range(3))
    chan = rng.standard_normal(3)
    q, k, v = (rng.standard_normal(shape) for shape in ((2, 7, 2, 16), (2, 37, 2, 16), (2, 37, 2, 16)))
    q2, kv2 = rng.standard_normal((1, 13, 3, 20)) * 3, rng.standard_normal((1, 13, 3, 20))
    rows, w = rng.standard_normal((5, 37)), rng.standard_normal((39, 37))
    layer3, layer1 = layer_inputs(rng, 3, 1, 3), layer_inputs(rng, 1, 1, 0)
    cross = (rng.standard_normal((2, 13, 264)),) + tuple(
        rng.standard_normal(shape) / 16 for _ in range(2) for shape in ((264, 264), (264, 264), (264,)))
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


