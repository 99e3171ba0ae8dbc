"""The ``mindspore.jit`` graphs of Whisper's encoder and decoder step, and the helpers they trace.

Pure functions of tensors and weight tuples (:class:`whisper_accel.kernels.compiled.CompiledWhisper`
arranges the weights and launches them). MindSpore keys each jit function's compiled graphs on
argument shapes/dtypes. On CPU a graph keeps a buffer for every intermediate tensor once it has
run, so the encoder and the cross-attention K/V are graphs of one layer, launched per layer
(see ``benchmarks/PROFILE_NOTES.md`` section 11).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import mindspore as ms
from mindspore import ops

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
    return _ln(x, p[0], p[1])[0]


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
    """The encoder's self-attention on the normed (B, T, D) ``x``; ``p``: (q_w, q_b, k_w, v_w,
    v_b, o_w, o_b)."""
    q = _heads(linear(x, p[0], p[1]) * scaling, n_heads)
    k = _heads(linear(x, p[2]), n_heads)
    v = _heads(linear(x, p[3], p[4]), n_heads)
    return linear(_merge(_attend(q, k, v)), p[5], p[6])


@ms.jit
def enc_stem(feats, conv, pos):
    x = _gelu(conv1d(feats, conv[0], conv[1], 1))
    x = _gelu(conv1d(x, conv[2], conv[3], 2))
    return x.transpose(0, 2, 1) + pos


@ms.jit
def enc_layer(x, lw, n_heads, scaling):
    # lw: (ln1, attn, ln2, fc1_w, fc1_b, fc2_w, fc2_b). One graph for every layer (same shapes:
    # compiled once), launched per layer: a whole-encoder graph held every layer's activations
    # at once (tiny: +310 MB peak over stock; see PROFILE_NOTES section 11).
    x = x + self_attention(_layer_norm(x, lw[0]), lw[1], n_heads, scaling)
    h = _gelu(linear(_layer_norm(x, lw[2]), lw[3], lw[4]))
    return x + linear(h, lw[5], lw[6])


@ms.jit
def enc_final(x, final_ln):
    return _layer_norm(x, final_ln)


@ms.jit
def encode_whole(feats, conv, pos, layers, final_ln, n_heads, scaling):
    """The whole encoder as one graph (see ``compiled.WHOLE_ENCODER_GRAPH``)."""
    x = _gelu(conv1d(feats, conv[0], conv[1], 1))
    x = _gelu(conv1d(x, conv[2], conv[3], 2))
    x = x.transpose(0, 2, 1) + pos
    for lw in layers:
        x = x + self_attention(_layer_norm(x, lw[0]), lw[1], n_heads, scaling)
        h = _gelu(linear(_layer_norm(x, lw[2]), lw[3], lw[4]))
        x = x + linear(h, lw[5], lw[6])
    return _layer_norm(x, final_ln)




@ms.jit
def cross_kv(enc, p, n_heads):
    # One layer's cross-attention K^T (B, H, Dh, S) and V (B, H, S, Dh); p: (k_w, v_w, v_b).
    # Launched per layer (one compile): MindSpore CPU graphs keep every intermediate buffer
    # allocated, so one graph for all layers cost ~100 MB of resident memory on tiny, and it
    # measured slower (124 vs 98 ms on tiny; PROFILE_NOTES section 19).
    b, s, d = enc.shape
    k = linear(enc, p[0]).reshape(b, s, n_heads, d // n_heads).transpose(0, 2, 3, 1)
    return k, _heads(linear(enc, p[1], p[2]), n_heads)


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
    for i, lw in enumerate(layers):  # (ln1, self_attn, ln2, cross(q_w,q_b,o_w,o_b), ln3, fc1w, fc1b, fc2w, fc2b)
        fused = None
        if layer_of is not None and t == 1 and not with_probs:
            fused = layer_of(x.reshape(x.shape[0], x.shape[2]), lw, k_cache[i], v_cache[i], positions, key_ok,
                             k_x[i], v_x[i], scaling)
        if fused is not None:
            x = fused[0].reshape(x.shape)
            new_k.append(ops.where(write, ops.gather(fused[1], src, 2), k_cache[i]))
            new_v.append(ops.where(write, ops.gather(fused[2], src, 2), v_cache[i]))
            continue
        sa = lw[1]
        h = _layer_norm(x, lw[0])
        q = _heads(linear(h, sa[0], sa[1]) * scaling, n_heads)
        k = ops.where(write, ops.gather(_heads(linear(h, sa[2]), n_heads), src, 2), k_cache[i])
        v = ops.where(write, ops.gather(_heads(linear(h, sa[3], sa[4]), n_heads), src, 2), v_cache[i])
        new_k.append(k)
        new_v.append(v)
        x = x + linear(_merge(_attend(q, k, v, bias)), sa[5], sa[6])
        ca = lw[3]
        q = _heads(linear(_layer_norm(x, lw[2]), ca[0], ca[1]) * scaling, n_heads)
        if with_probs:
            o, p = _cross(q, k_x[i], v_x[i], beams, True)
            probs = probs + (p,)
        else:
            o = _cross(q, k_x[i], v_x[i], beams)
        x = x + linear(_merge(o), ca[2], ca[3])
        h = _gelu(linear(_layer_norm(x, lw[4]), lw[5], lw[6]))
        x = x + linear(h, lw[7], lw[8])
    return _layer_norm(x, final_ln), tuple(new_k), tuple(new_v), probs


@ms.jit
def decode(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, proj, pos_table, layers, final_ln, n_heads, scaling,
           pos_ids, key_ok):
    """All positions' logits (B,T,V) and the updated caches."""
    x, new_k, new_v, _ = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                  final_ln, n_heads, scaling, pos_ids, key_ok)
    return linear(x, proj), new_k, new_v


def decoder_graphs(logits_of, layer_of=None) -> SimpleNamespace:
    """The greedy and beam step graphs (``decode_next``, ``decode_next_attn``, ``decode_beams``,
    ``decode_beams_attn``) with ``logits_of(x (R, D), proj (V, D)) -> (R, V)`` as the vocabulary
    projection of the last positions: :data:`PLAIN` uses MindSpore's MatMul,
    :mod:`.fused` its own kernel; ``layer_of``: a whole decoder layer for one-token steps (see
    :func:`_decoder`), None for the operator-by-operator layers. Each call makes new jit
    functions (their own compile cache)."""

    @ms.jit
    def decode_next(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, proj, pos_table, layers, final_ln,
                    n_heads, scaling, suppress, pos_ids, key_ok):
        """Greedy step: the last position's logits (B,V), the scores with ``suppress`` (V,) bool set
        to -inf (what the masking logits processors return), their argmax (B,), and the caches. The
        vocabulary projection runs for the last position only."""
        x, new_k, new_v, _ = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                      final_ln, n_heads, scaling, pos_ids, key_ok, layer_of=layer_of)
        logits = logits_of(x[:, ids.shape[1] - 1, :], proj)
        scores = ops.masked_fill(logits, suppress, float("-inf"))
        return ops.argmax(scores, -1), scores, logits, new_k, new_v

    @ms.jit
    def decode_next_attn(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, proj, pos_table, layers, final_ln,
                         n_heads, scaling, suppress, pos_ids, key_ok):
        """:func:`decode_next` that also returns every layer's cross-attention probabilities
        (B,H,T,S) (what ``output_attentions`` returns; token timestamps are computed from them)."""
        x, new_k, new_v, probs = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                          final_ln, n_heads, scaling, pos_ids, key_ok, 1, True)
        logits = logits_of(x[:, ids.shape[1] - 1, :], proj)
        scores = ops.masked_fill(logits, suppress, float("-inf"))
        return ops.argmax(scores, -1), scores, logits, new_k, new_v, probs

    @ms.jit
    def decode_beams(ids, positions, cols, k_cache, v_cache, beam_idx, k_x, v_x, embed, proj, pos_table, layers,
                     final_ln, n_heads, scaling, beams, pos_ids, key_ok):
        """Beam-search step for N = B * beams rows: first the self-attention caches are reordered by
        ``beam_idx`` (N,) int32 (the row each new row continues), then the decoder runs on ``ids``
        (N,T) with cross-attention K/V shared per audio; returns the last position's logits (N,V),
        their log-softmax (MindSpore's LogSoftmax kernel, what stock beam search applies) and the
        caches."""
        k_cache = tuple(ops.gather(c, beam_idx, 0) for c in k_cache)
        v_cache = tuple(ops.gather(c, beam_idx, 0) for c in v_cache)
        x, new_k, new_v, _ = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                      final_ln, n_heads, scaling, pos_ids, key_ok, beams, layer_of=layer_of)
        logits = logits_of(x[:, ids.shape[1] - 1, :], proj)
        return logits, ops.log_softmax(logits, -1), new_k, new_v

    @ms.jit
    def decode_beams_attn(ids, positions, cols, k_cache, v_cache, beam_idx, k_x, v_x, embed, proj, pos_table, layers,
                          final_ln, n_heads, scaling, beams, pos_ids, key_ok):
        """:func:`decode_beams` that also returns every layer's cross-attention probabilities (N,H,T,S)."""
        k_cache = tuple(ops.gather(c, beam_idx, 0) for c in k_cache)
        v_cache = tuple(ops.gather(c, beam_idx, 0) for c in v_cache)
        x, new_k, new_v, probs = _decoder(ids, positions, cols, k_cache, v_cache, k_x, v_x, embed, pos_table, layers,
                                          final_ln, n_heads, scaling, pos_ids, key_ok, beams, True)
        logits = logits_of(x[:, ids.shape[1] - 1, :], proj)
        return logits, ops.log_softmax(logits, -1), new_k, new_v, probs

    return SimpleNamespace(decode_next=decode_next, decode_next_attn=decode_next_attn, decode_beams=decode_beams,
                           decode_beams_attn=decode_beams_attn)


#: The step graphs with MindSpore's MatMul as the projection (no fused kernels).
PLAIN = decoder_graphs(_mm_t)
