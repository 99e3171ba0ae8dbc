"""The ``mindspore.jit`` graphs of Whisper's encoder and decoder step, and the helpers they trace.

Pure functions of tensors and weight tuples (the tuple forms of :mod:`.weights`' structures,
read by name); the runtime's executors (:mod:`whisper_accel.runtime.executors`) arrange the
weights and launch them. MindSpore keys each jit function's compiled graphs on argument
shapes/dtypes. On CPU a graph keeps a buffer for every intermediate tensor once it has run, so
the plain encoder and the cross-attention K/V are launched a layer at a time.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import mindspore as ms
from mindspore import ops

from . import weights as W

# Named indices into the weight tuples (:mod:`.weights`), resolved when a graph is traced.
SA, CA, ST = W.slots(W.SelfAttention), W.slots(W.CrossAttention), W.slots(W.Stem)
EL, DL, KV, LN = W.slots(W.EncoderLayer), W.slots(W.DecoderLayer), W.slots(W.CrossKV), W.slots(W.LayerNorm)

_mm_t = ops.MatMul(transpose_b=True)  # x @ W.T reading W [out, in] as stored
_bmm_t = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()
_ln = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)


def linear(x, w, b=None):
    """x @ w.T (+ b): a Linear layer on the last dim, ``w`` [out, in] as stored."""
    shape = x.shape
    y = _mm_t(x.reshape(-1, shape[-1]), w)
    if b is not None:
        y = y + b
    return y.reshape(shape[:-1] + (w.shape[0],))


def _layer_norm(x, p):
    return _ln(x, p[LN.weight], p[LN.bias])[0]


def _gelu(x):  # exactly what mindtorch's CPU gelu(approximate='none') computes
    return x * 0.5 * (ops.erf(x / math.sqrt(2.0)) + 1.0)


def _heads(x, n_heads):  # (B, T, D) -> (B, H, T, Dh)
    b, t, d = x.shape
    return x.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def _merge(x):  # (B, H, T, Dh) -> (B, T, D)
    b, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * dh)


def _attend(q, k, v, bias=None, k_transposed=False):
    w = _bmm(q, k) if k_transposed else _bmm_t(q, k)
    if bias is not None:
        w = w + bias
    return _bmm(ops.softmax(w, -1), v)


def conv1d(x, w, b, stride):
    """Whisper's conv1/conv2 (kernel 3, padding 1) on (B, C, T); ``b`` None: no bias added
    (:mod:`.fused` adds it inside its GELU kernel)."""
    y = ops.conv2d(x.expand_dims(2), w.expand_dims(2), None, (1, stride), "pad", (0, 1)).squeeze(2)
    return y if b is None else y + b.reshape(1, -1, 1)


def self_attention(x, p, n_heads, scaling):
    """The encoder's self-attention on the normed (B, T, D) ``x``; ``p``: a
    :class:`~.weights.SelfAttention` tuple."""
    q = _heads(linear(x, p[SA.q_w], p[SA.q_b]) * scaling, n_heads)
    k = _heads(linear(x, p[SA.k_w]), n_heads)
    v = _heads(linear(x, p[SA.v_w], p[SA.v_b]), n_heads)
    return linear(_merge(_attend(q, k, v)), p[SA.o_w], p[SA.o_b])


def stem(feats, st):
    """conv1, GELU, conv2, GELU, positions: (B, mels, 2T) -> (B, T, D); ``st``: a
    :class:`~.weights.Stem` tuple."""
    x = _gelu(conv1d(feats, st[ST.conv1_w], st[ST.conv1_b], 1))
    x = _gelu(conv1d(x, st[ST.conv2_w], st[ST.conv2_b], 2))
    return x.transpose(0, 2, 1) + st[ST.positions]


def layer(x, lw, n_heads, scaling):
    """One encoder layer; ``lw``: an :class:`~.weights.EncoderLayer` tuple."""
    x = x + self_attention(_layer_norm(x, lw[EL.ln1]), lw[EL.attn], n_heads, scaling)
    h = _gelu(linear(_layer_norm(x, lw[EL.ln2]), lw[EL.fc1_w], lw[EL.fc1_b]))
    return x + linear(h, lw[EL.fc2_w], lw[EL.fc2_b])


def encoder_graphs(stem_of, layer_of, norm_of) -> SimpleNamespace:
    """The encoder's jit functions from its parts (``stem_of(feats, stem)``, ``layer_of(x,
    layer, n_heads, scaling)``, ``norm_of(x, ln)``): ``enc_stem``, ``enc_layer`` (one layer a
    launch), ``enc_layers`` (several), ``enc_final`` and ``encode_whole`` (all in one graph).
    :data:`PLAIN` has MindSpore's operators, :mod:`.fused` its kernels. Each call makes new jit
    functions (their own compile cache)."""

    @ms.jit
    def enc_stem(feats, st):
        return stem_of(feats, st)

    @ms.jit
    def enc_layer(x, lw, n_heads, scaling):
        return layer_of(x, lw, n_heads, scaling)

    @ms.jit
    def enc_layers(x, layers, n_heads, scaling):
        for lw in layers:
            x = layer_of(x, lw, n_heads, scaling)
        return x

    @ms.jit
    def enc_final(x, final_ln):
        return norm_of(x, final_ln)

    @ms.jit
    def encode_whole(feats, st, layers, final_ln, n_heads, scaling):
        x = stem_of(feats, st)
        for lw in layers:
            x = layer_of(x, lw, n_heads, scaling)
        return norm_of(x, final_ln)

    return SimpleNamespace(enc_stem=enc_stem, enc_layer=enc_layer, enc_layers=enc_layers, enc_final=enc_final,
                           encode_whole=encode_whole)


@ms.jit
def cross_kv(enc, p, n_heads):
    # One layer's cross-attention K^T (B, H, Dh, S) and V (B, H, S, Dh); p: a CrossKV tuple.
    # Launched per layer (one compile): MindSpore CPU graphs keep every intermediate buffer
    # allocated, so one graph for all layers holds every layer's at once.
    b, s, d = enc.shape
    k = linear(enc, p[KV.k_w]).reshape(b, s, n_heads, d // n_heads).transpose(0, 2, 3, 1)
    return k, _heads(linear(enc, p[KV.v_w], p[KV.v_b]), n_heads)


def _cross(q, k_x, v_x, beams, with_probs=False):
    """Cross-attention of ``q`` (N,H,T,Dh), N = B * beams, against one audio's K^T (B,H,Dh,S)
    and V (B,H,S,Dh) shared by its ``beams`` consecutive rows: the beams' queries are stacked
    along the query axis, so the encoder states are never copied per beam. ``with_probs``:
    returns ``(out, probabilities (N,H,T,S))`` (for token timestamps)."""
    n, h, t, dh = q.shape
    b = n // beams
    qg = q if beams == 1 else q.reshape(b, beams, h, t, dh).transpose(0, 2, 1, 3, 4).reshape(b, h, beams * t, dh)
    if not with_probs:
        o = _attend(qg, k_x, v_x, None, True)
        return o if beams == 1 else o.reshape(b, h, beams, t, dh).transpose(0, 2, 1, 3, 4).reshape(n, h, t, dh)
    p = ops.softmax(_bmm(qg, k_x), -1)
    o = _bmm(p, v_x)
    if beams == 1:
        return o, p
    s = p.shape[-1]
    return (o.reshape(b, h, beams, t, dh).transpose(0, 2, 1, 3, 4).reshape(n, h, t, dh),
            p.reshape(b, h, beams, t, s).transpose(0, 2, 1, 3, 4).reshape(n, h, t, s))


def _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers, final_ln, n_heads, scaling,
             pos_ids, key_ok, beams=1, with_probs=False, layer_of=None):
    """ids (B,T); positions (T,) int32 = pos0..pos0+T-1 (the cache slots this step writes);
    cols (S,) int32 = 0..S-1; caches: per-layer tuples of (B,H,S,Dh); cross K/V per audio
    (``beams`` rows share one). ``pos_ids`` (1 or B, T) int32: the position-embedding rows
    (``positions`` itself without a decoder attention mask; with one, stock's
    ``cumsum(mask) - 1``, 1 at padding); ``key_ok`` (1 or B, S) bool: the slots a query may
    attend to besides causality (False at padding). Returns the final-norm hidden states (B,T,D),
    the updated caches and (``with_probs``) each layer's cross-attention probabilities, else an
    empty tuple. ``layer_of(x (B, D), layer, k_cache, v_cache, positions, key_ok, k_x, v_x,
    scaling) -> (x, k, v (B, H, 1, Dh))``, when given and the step feeds one token per row
    without ``with_probs``, computes a whole layer (:mod:`.fused`'s kernel) and returns this
    step's K/V for the cache; it may return None for a shape it does not take. Traced inside the
    jit functions below (not a graph of its own)."""
    t = ids.shape[1]
    s = k_cache[0].shape[2]
    x = ops.gather(embed, ids, 0) + ops.gather(pos_table, pos_ids, 0)
    rel = cols.reshape(1, s) - positions[0]  # (1, S) slot index relative to this step
    write = ((rel >= 0) & (rel < t)).reshape(1, 1, s, 1)  # slots written by this step
    src = ops.clip(rel.reshape(s), 0, t - 1)  # which new token a slot takes
    # causal over the cache and not padding; one where (not a sum of two biases, which would
    # overflow to -inf and give a fully masked padding row NaNs)
    visible = (cols.reshape(1, 1, s) <= positions.reshape(1, t, 1)) & key_ok.reshape(-1, 1, s)
    bias = ops.where(visible, ops.zeros(visible.shape, x.dtype),
                     ops.fill(x.dtype, visible.shape, -3.4028234663852886e38)).reshape(-1, 1, t, s)
    new_k, new_v = [], []
    probs = ()
    for i, lw in enumerate(layers):  # DecoderLayer tuples
        fused = None
        if layer_of is not None and t == 1 and not with_probs:
            fused = layer_of(x.reshape(x.shape[0], x.shape[2]), lw, k_cache[i], v_cache[i], positions, key_ok,
                             k_x[i], v_x[i], scaling)
        if fused is not None:
            x = fused[0].reshape(x.shape)
            new_k.append(ops.where(write, ops.gather(fused[1], src, 2), k_cache[i]))
            new_v.append(ops.where(write, ops.gather(fused[2], src, 2), v_cache[i]))
            continue
        sa = lw[DL.attn]
        h = _layer_norm(x, lw[DL.ln1])
        q = _heads(linear(h, sa[SA.q_w], sa[SA.q_b]) * scaling, n_heads)
        k = ops.where(write, ops.gather(_heads(linear(h, sa[SA.k_w]), n_heads), src, 2), k_cache[i])
        v = ops.where(write, ops.gather(_heads(linear(h, sa[SA.v_w], sa[SA.v_b]), n_heads), src, 2), v_cache[i])
        new_k.append(k)
        new_v.append(v)
        x = x + linear(_merge(_attend(q, k, v, bias)), sa[SA.o_w], sa[SA.o_b])
        ca = lw[DL.cross]
        q = _heads(linear(_layer_norm(x, lw[DL.ln2]), ca[CA.q_w], ca[CA.q_b]) * scaling, n_heads)
        if with_probs:
            o, p = _cross(q, k_x[i], v_x[i], beams, True)
            probs = probs + (p,)
        else:
            o = _cross(q, k_x[i], v_x[i], beams)
        x = x + linear(_merge(o), ca[CA.o_w], ca[CA.o_b])
        h = _gelu(linear(_layer_norm(x, lw[DL.ln3]), lw[DL.fc1_w], lw[DL.fc1_b]))
        x = x + linear(h, lw[DL.fc2_w], lw[DL.fc2_b])
    return _layer_norm(x, final_ln), tuple(new_k), tuple(new_v), probs


@ms.jit
def decode(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, proj, pos_table, layers, final_ln, n_heads, scaling,
           pos_ids, key_ok):
    """All positions' logits (B,T,V) and the updated caches."""
    x, new_k, new_v, _ = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                  final_ln, n_heads, scaling, pos_ids, key_ok)
    return linear(x, proj), new_k, new_v


@ms.jit
def log_softmax(logits):
    """MindSpore's LogSoftmax over the last axis as a one-operator graph: the kernel stock beam
    search runs (so its scores bit for bit), launched without PyNative's per-operator dispatch
    (the host executor's beam steps; PROFILE_NOTES section 37)."""
    return ops.log_softmax(logits, -1)


def decoder_graphs(logits_of, layer_of=None) -> SimpleNamespace:
    """The greedy and beam step graphs (``decode_next``, ``decode_beams``; each with a constant
    ``with_probs``: also return every layer's cross-attention probabilities, what
    ``output_attentions`` returns and token timestamps read) with ``logits_of(x (R, D), proj
    (V, D)) -> (R, V)`` as the vocabulary projection of the last positions: :data:`PLAIN` uses
    MindSpore's MatMul, :mod:`.fused` its own kernel; ``layer_of``: a whole decoder layer for
    one-token steps (see :func:`_decoder`), None for the operator-by-operator layers. Each call
    makes new jit functions (their own compile cache)."""

    @ms.jit
    def decode_next(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, proj, pos_table, layers, final_ln,
                    n_heads, scaling, suppress, pos_ids, key_ok, with_probs):
        """Greedy step: the last position's logits (B,V), the scores with ``suppress`` (V,) bool set
        to -inf (what the masking logits processors return), their argmax (B,), the caches, and
        (``with_probs``) the probabilities (B,H,T,S) per layer. The vocabulary projection runs
        for the last position only."""
        x, new_k, new_v, probs = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                          final_ln, n_heads, scaling, pos_ids, key_ok, 1, with_probs,
                                          None if with_probs else layer_of)
        logits = logits_of(x[:, ids.shape[1] - 1, :], proj)
        scores = ops.masked_fill(logits, suppress, float("-inf"))
        return ops.argmax(scores, -1), scores, logits, new_k, new_v, probs

    @ms.jit
    def decode_beams(ids, positions, cols, k_cache, v_cache, beam_idx, k_x, v_x, embed, proj, pos_table, layers,
                     final_ln, n_heads, scaling, beams, pos_ids, key_ok, with_probs):
        """Beam-search step for N = B * beams rows: first the self-attention caches are reordered by
        ``beam_idx`` (N,) int32 (the row each new row continues), then the decoder runs on ``ids``
        (N,T) with cross-attention K/V shared per audio; returns the last position's logits (N,V),
        their log-softmax (MindSpore's LogSoftmax kernel, what stock beam search applies), the
        caches and (``with_probs``) the probabilities (N,H,T,S) per layer."""
        k_cache = tuple(ops.gather(c, beam_idx, 0) for c in k_cache)
        v_cache = tuple(ops.gather(c, beam_idx, 0) for c in v_cache)
        x, new_k, new_v, probs = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                          final_ln, n_heads, scaling, pos_ids, key_ok, beams, with_probs,
                                          None if with_probs else layer_of)
        logits = logits_of(x[:, ids.shape[1] - 1, :], proj)
        return logits, ops.log_softmax(logits, -1), new_k, new_v, probs

    return SimpleNamespace(decode_next=decode_next, decode_beams=decode_beams)


#: The step graphs with MindSpore's MatMul as the projection (no fused kernels).
PLAIN = decoder_graphs(_mm_t)
#: The encoder graphs of MindSpore's own operators.
PLAIN_ENCODER = encoder_graphs(stem, layer, _layer_norm)
