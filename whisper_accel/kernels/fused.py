"""The Whisper encoder's ``mindspore.jit`` graphs with fused element-wise kernels (``fused.cc``).

Same signatures, weight layout and results (within ~4e-7 relative) as
:func:`whisper_accel.kernels.graphs.enc_stem` / ``enc_layer`` / ``enc_final`` /
``encode_whole``; the convolutions and the linear layers are :mod:`.graphs`' own
(:func:`.graphs.conv1d`, :func:`.graphs.linear`). What
changes: MindSpore CPU runs every element-wise operator as its own pass over memory, and its
``Erf`` single-threaded, so GELU (6 operators), LayerNorm and the bias / residual adds cost
13-20x PyTorch's on the encoder's (1500, 1536) activations; here each chain is one Custom AOT
kernel from ``fused.cc`` (benchmarks/PROFILE_NOTES.md section 17).

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
from .graphs import conv1d, linear

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
    """Bind the kernels to the shared library at ``library`` (an absolute path)."""
    global _LIBRARY
    for name in NAMES:
        if name in _GLOBAL:
            globals()[_GLOBAL[name]] = kernel(library, name)
    _LIBRARY = library
    _CROSS.clear()


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


def _stem(feats, conv, pos):
    x = _CHAN_GELU(conv1d(feats, conv[0], None, 1), conv[1])
    x = _CHAN_GELU(conv1d(x, conv[2], None, 2), conv[3])
    return x.transpose(0, 2, 1) + pos


def _attention(x, p, n_heads, scaling):
    """:func:`.graphs.self_attention` less the output bias, with the scores, softmax and
    weighted sum in one kernel that reads q, k, v as (B, T, H, Dh) views (no transposes) and
    never writes the (B, H, T, T) scores out."""
    b, t, d = x.shape
    shape = (b, t, n_heads, d // n_heads)
    q = (linear(x, p[0], p[1]) * scaling).reshape(shape)
    o = _ATTN(q, linear(x, p[2]).reshape(shape), linear(x, p[3], p[4]).reshape(shape))
    return linear(o.reshape(b, t, d), p[5])


def _layer(x, lw, n_heads, scaling):
    # lw: (ln1, attn (q_w, q_b, k_w, v_w, v_b, o_w, o_b), ln2, fc1_w, fc1_b, fc2_w, fc2_b)
    b, t, d = x.shape
    o = _attention(_LN(x, lw[0][0], lw[0][1]), lw[1], n_heads, scaling)
    x, h = _RES_LN(x, o, lw[1][6], lw[2][0], lw[2][1])
    f = _BIAS_GELU(_mm_t(h.reshape(b * t, d), lw[3]), lw[4])
    return _BIAS_RES(x, _mm_t(f, lw[5]).reshape(b, t, d), lw[6])


@ms.jit
def enc_stem(feats, conv, pos):
    return _stem(feats, conv, pos)


@ms.jit
def enc_layer(x, lw, n_heads, scaling):
    return _layer(x, lw, n_heads, scaling)


@ms.jit
def enc_layers(x, layers, n_heads, scaling):
    """Several layers in one launch (``runtime.model.layers_per_launch``)."""
    for lw in layers:
        x = _layer(x, lw, n_heads, scaling)
    return x


@ms.jit
def enc_final(x, final_ln):
    return _LN(x, final_ln[0], final_ln[1])


@ms.jit
def encode_whole(feats, conv, pos, layers, final_ln, n_heads, scaling):
    """The whole encoder as one graph (when ``runtime.model.layers_per_launch`` allows it)."""
    x = _stem(feats, conv, pos)
    for lw in layers:
        x = _layer(x, lw, n_heads, scaling)
    return _LN(x, final_ln[0], final_ln[1])


#: Up to this many rows (a step's last positions: batch x beams) the vocabulary projection runs
#: as ``RowsMatMul``; more rows, MindSpore's MatMul (compute-bound there, and at oneDNN's speed).
ROWS_MATMUL_MAX = 16


def _logits(x, proj):
    # x (R, D): R is static when the graph is traced, so this picks one kernel per graph
    return _ROWS_MM(x, proj) if x.shape[0] <= ROWS_MATMUL_MAX else _mm_t(x, proj)


def _decoder_layer(x, lw, k_cache, v_cache, positions, key_ok, k_x, v_x, scaling):
    """One decoder layer of a one-token step as the ``DecoderLayer`` kernel (up to
    :data:`ROWS_MATMUL_MAX` rows; None, the operator-by-operator layer, for more): about 30
    operators a layer become one launch (benchmarks/PROFILE_NOTES.md section 22)."""
    if x.shape[0] > ROWS_MATMUL_MAX:
        return None
    sa, ca = lw[1], lw[3]
    return _DEC_LAYER(x, lw[0][0], lw[0][1], sa[0], sa[1], sa[2], sa[3], sa[4], sa[5], sa[6], k_cache, v_cache,
                      positions, ops.cast(key_ok, x.dtype), lw[2][0], lw[2][1], ca[0], ca[1], ca[2], ca[3], k_x, v_x,
                      lw[4][0], lw[4][1], lw[5], lw[6], lw[7], lw[8], ops.fill(x.dtype, (1,), scaling))


#: The decoder-step graphs of :func:`.graphs.decoder_graphs` with ``RowsMatMul`` as the
#: vocabulary projection (the step's largest cost: tiny reads 80 MB of weights a step) and each
#: layer of a one-token step as the ``DecoderLayer`` kernel.
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
    ``CrossKV`` launch that writes the step graphs' layouts directly (benchmarks/PROFILE_NOTES.md
    section 23). A graph of that one operator: launched in PyNative it took ~15 ms more."""
    run = _CROSS.get(n_heads)
    if run is None:
        run = _CROSS[n_heads] = _cross_graph(n_heads)
    out = run(enc, weights)
    return tuple(out[0::2]), tuple(out[1::2])
