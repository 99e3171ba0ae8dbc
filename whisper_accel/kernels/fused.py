"""Whisper's ``mindspore.jit`` graphs with the fused kernels (``fused.cc``).

:data:`ENCODER`: the encoder graphs of :func:`.graphs.encoder_graphs` (same signatures and
weights as :data:`.graphs.PLAIN_ENCODER`, results within ~4e-7 relative); the convolutions and
the linear layers are :mod:`.graphs`' own. What changes: MindSpore CPU runs every element-wise
operator as its own pass over memory, and its ``Erf`` single-threaded, so GELU, LayerNorm and
the bias / residual adds are each one Custom AOT kernel here (what they cost is in
benchmarks/PROFILE_NOTES.md).

:data:`DECODER` holds the decoder-step graphs of :func:`.graphs.decoder_graphs` with the
``RowsMatMul`` kernel as the vocabulary projection (MindSpore's MatMul runs it on one thread)
and, for one-token steps, each decoder layer as one ``DecoderLayer`` kernel.

Pure MindSpore. :func:`configure` binds the kernels to a built library (the caller,
:mod:`whisper_accel.runtime.native`, builds and checks it) before any graph here is traced.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import ops

from . import graphs
from . import weights as W
from .graphs import EL, LN, SA, ST, conv1d, linear

#: The operators in ``fused.cc``, each checked by :func:`whisper_accel.runtime.native.check`.
NAMES = ("LayerNorm", "ResLayerNorm", "BiasResidual", "BiasGelu", "ChanBiasGelu", "Attention", "RowsMatMul",
         "DecoderLayer", "CrossKV")

_mm_t = ops.MatMul(transpose_b=True)

# The kernels as ops.Custom primitives, set by :func:`configure` (module globals: the graphs
# below resolve them when first traced).
_LN = _RES_LN = _BIAS_RES = _BIAS_GELU = _CHAN_GELU = _ATTN = _ROWS_MM = _DEC_LAYER = None
_LIBRARY = None  # the library's path: CrossKV's graphs are made per head count (_CROSS)
_CROSS = {}
_GLOBAL = {"LayerNorm": "_LN", "ResLayerNorm": "_RES_LN", "BiasResidual": "_BIAS_RES", "BiasGelu": "_BIAS_GELU",
           "ChanBiasGelu": "_CHAN_GELU", "Attention": "_ATTN", "RowsMatMul": "_ROWS_MM",
           "DecoderLayer": "_DEC_LAYER"}


def _same(*shapes):
    return shapes[0]


def _pair(*shapes):
    return shapes[0], shapes[0]


def _rows_out(x, w):
    return (x[0], w[0])


def _layer_out(*shapes):  # DecoderLayer: x (R, D) and this step's K, V (R, H, 1, Dh) (k_cache is input 10)
    r, h, _, dh = shapes[10]
    return tuple(shapes[0]), (r, h, 1, dh), (r, h, 1, dh)


def _layer_dtypes(*dtypes):
    return dtypes[0], dtypes[0], dtypes[0]


def _cross_out(heads: int):
    def shapes(*s):  # CrossKV: enc (B, S, D), then (Wk, Wv, bv) per layer -> per layer K^T, V
        b, t, d = s[0]
        k, v = (b, heads, d // heads, t), (b, heads, t, d // heads)
        return tuple(kv for _ in range((len(s) - 1) // 3) for kv in (k, v))
    return shapes


def _cross_dtypes(*dtypes):
    return tuple(dtypes[0] for _ in range(2 * ((len(dtypes) - 1) // 3)))


def configure(library: str) -> None:
    """Bind the kernels to the shared library at ``library`` (an absolute path). The graphs
    here take the kernels bound when they are first traced: a process binds one library (a
    later call with another path is ignored, and :func:`bound` still names the first)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    for name in NAMES:
        if name in _GLOBAL:
            globals()[_GLOBAL[name]] = kernel(library, name)
    _LIBRARY = library
    _CROSS.clear()


def bound():
    """The library the graphs use (None before :func:`configure`)."""
    return _LIBRARY


def kernel(library: str, name: str, heads: int = 0):
    """One of the library's kernels as an ``ops.Custom`` primitive (usable in PyNative too);
    ``heads``: CrossKV's head count (its output shapes depend on it)."""
    if name == "CrossKV":
        return ops.Custom(f"{library}:{name}", out_shape=_cross_out(heads), out_dtype=_cross_dtypes, func_type="aot")
    if name == "RowsMatMul":
        return ops.Custom(f"{library}:{name}", out_shape=_rows_out, out_dtype=_same, func_type="aot")
    if name == "DecoderLayer":
        return ops.Custom(f"{library}:{name}", out_shape=_layer_out, out_dtype=_layer_dtypes, func_type="aot")
    two = name == "ResLayerNorm"
    return ops.Custom(f"{library}:{name}", out_shape=_pair if two else _same, out_dtype=_pair if two else _same,
                      func_type="aot")


def _stem(feats, st):
    x = _CHAN_GELU(conv1d(feats, st[ST.conv1_w], None, 1), st[ST.conv1_b])
    x = _CHAN_GELU(conv1d(x, st[ST.conv2_w], None, 2), st[ST.conv2_b])
    return x.transpose(0, 2, 1) + st[ST.positions]


def _attention(x, p, n_heads, scaling):
    """:func:`.graphs.self_attention` less the output bias, with the scores, softmax and
    weighted sum in one kernel that reads q, k, v as (B, T, H, Dh) views (no transposes) and
    never writes the (B, H, T, T) scores out."""
    b, t, d = x.shape
    shape = (b, t, n_heads, d // n_heads)
    q = (linear(x, p[SA.q_w], p[SA.q_b]) * scaling).reshape(shape)
    o = _ATTN(q, linear(x, p[SA.k_w]).reshape(shape), linear(x, p[SA.v_w], p[SA.v_b]).reshape(shape))
    return linear(o.reshape(b, t, d), p[SA.o_w])


def _norm(x, ln):
    return _LN(x, ln[LN.weight], ln[LN.bias])


def _layer(x, lw, n_heads, scaling):
    b, t, d = x.shape
    o = _attention(_norm(x, lw[EL.ln1]), lw[EL.attn], n_heads, scaling)
    x, h = _RES_LN(x, o, lw[EL.attn][SA.o_b], lw[EL.ln2][LN.weight], lw[EL.ln2][LN.bias])
    f = _BIAS_GELU(_mm_t(h.reshape(b * t, d), lw[EL.fc1_w]), lw[EL.fc1_b])
    return _BIAS_RES(x, _mm_t(f, lw[EL.fc2_w]).reshape(b, t, d), lw[EL.fc2_b])


#: The encoder graphs with the fused kernels (same signatures as :data:`.graphs.PLAIN_ENCODER`).
ENCODER = graphs.encoder_graphs(_stem, _layer, _norm)


#: Up to this many rows (a step's last positions: batch x beams) the vocabulary projection runs
#: as ``RowsMatMul``; more rows, MindSpore's MatMul (compute-bound there, and at oneDNN's speed).
ROWS_MATMUL_MAX = 16


def _logits(x, proj):
    # x (R, D): R is static when the graph is traced, so this picks one kernel per graph
    return _ROWS_MM(x, proj) if x.shape[0] <= ROWS_MATMUL_MAX else _mm_t(x, proj)


def _decoder_layer(x, lw, k_cache, v_cache, positions, key_ok, k_x, v_x, scaling):
    """One decoder layer of a one-token step as the ``DecoderLayer`` kernel (up to
    :data:`ROWS_MATMUL_MAX` rows; None, the operator-by-operator layer, for more): about 30
    operators a layer become one launch. Its arguments in :data:`.weights.DECODER_LAYER_ARGS`'
    order."""
    if x.shape[0] > ROWS_MATMUL_MAX:
        return None
    state = {"x": x, "k_cache": k_cache, "v_cache": v_cache, "positions": positions,
             "key_ok": ops.cast(key_ok, x.dtype), "k_x": k_x, "v_x": v_x, "scaling": ops.fill(x.dtype, (1,), scaling)}
    return _DEC_LAYER(*W.kernel_args(lw, state))


#: The decoder-step graphs of :func:`.graphs.decoder_graphs` with ``RowsMatMul`` as the
#: vocabulary projection (the step's largest read: the whole vocabulary matrix) and each layer
#: of a one-token step as the ``DecoderLayer`` kernel.
DECODER = graphs.decoder_graphs(_logits, _decoder_layer)


def _cross_graph(heads: int):
    prim = kernel(_LIBRARY, "CrossKV", heads)

    @ms.jit
    def run(enc, weights):
        return prim(enc, *weights)

    return run


def cross_kv(enc, weights, n_heads: int):
    """Every decoder layer's cross-attention K^T (B, H, Dh, S) and V (B, H, S, Dh), as per-layer
    tuples, from the encoder output ``enc`` (B, S, D) and ``weights``, (k_w, v_w, v_b) of every
    layer in one flat tuple: what :func:`.graphs.cross_kv` computes a layer at a time, as one
    ``CrossKV`` launch that writes the step graphs' layouts directly. A graph of that one
    operator (launched in PyNative it pays the dispatch cost)."""
    run = _CROSS.get(n_heads)
    if run is None:
        run = _CROSS[n_heads] = _cross_graph(n_heads)
    out = run(enc, weights)
    return tuple(out[0::2]), tuple(out[1::2])
