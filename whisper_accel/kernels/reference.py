"""The fused kernels' float64 numpy references, and their check inputs (numpy only: no
MindSpore, so a check can run where MindSpore is absent, e.g. under qemu for the aarch64
build). :mod:`whisper_accel.runtime.kernel_checks` and the tests read them."""

from __future__ import annotations

from math import erf, sqrt

import numpy as np

from . import weights


def gelu(x):
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


def check_inputs() -> dict:
    """The inputs of the kernels' check (seeded): rows of 37 values (a tail after the vector
    width), attention with 7 queries and 37 keys and with a head dim of 20, a projection of 5
    rows and 39 outputs, decoder layers of 3 beams and of one row, cross K/V of two layers for
    two audios of 13 frames at D 264."""
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
    return dict(x=x, y=y, bias=bias, g=g, b=b, chan=chan, q=q, k=k, v=v, q2=q2, kv2=kv2, rows=rows, w=w,
                layer3=layer3, layer1=layer1, cross=cross)
