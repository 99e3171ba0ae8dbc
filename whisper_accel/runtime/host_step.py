"""Decode steps on the host: the fused kernels called through ``ctypes``, no graph.

Why: a one-token step is a few milliseconds of memory traffic (the layers' weights, the cross
K/V, the vocabulary projection), but a step graph adds Python before the launch (MindSpore
builds an argument key over ~120 tensors) and the graph runtime around its operators. Here the
same kernels (``DecoderLayer`` per layer, ``LayerNorm``, ``RowsMatMul``) run back to back on
numpy views of the weights' buffers, the self-attention cache lives in numpy arrays
(:class:`HostCache`), and the token embedding, the suppression mask and the argmax are numpy
(benchmarks/PROFILE_NOTES.md has the measurements).

The cross-attention K/V of a window (``CrossKV``, every layer in one call) runs here too, into
numpy arrays the steps then read where they are (no graph launch, no copy back).

What runs here: greedy and beam-search steps (no cross-attention probabilities) of one token
a row, and prompts without padding of up to :data:`MAX_TOKENS` tokens (one after another), of up to
:data:`MAX_ROWS` rows (batch x beams), with or without a decoder padding mask, when the
fused kernels are usable. A float16/bfloat16 model's weight matrices are read as stored (half the
bytes of its float32 compute copy; the same results, bit for bit). :class:`HostStep` refuses
(``None`` from :func:`for_weights`) a model whose weights are not host buffers it can verify; the
caller then runs the step graphs. Not thread-safe by itself: its executor
(:class:`whisper_accel.runtime.executors.host.HostDecoder`) calls it under the engine's lock.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import mindspore as ms
import numpy as np

from ..kernels import weights as W
from ..kernels.fused import ROWS_MATMUL_MAX
from . import host_calls
from .host_calls import Call

#: Rows (batch x beams) one host step takes: the projection kernel's limit.
MAX_ROWS = ROWS_MATMUL_MAX
#: The most tokens a row one host step takes: a window's prompt (start of transcript, language,
#: task, timestamps) runs its tokens one after another; a longer one (previous text as a
#: prompt) runs the prompt graph, which takes all its positions in one pass.
MAX_TOKENS = 8
#: The most positions (rows x tokens) one multi-token step with every position's logits
#: (:meth:`HostStep.all_logits`) takes: an assistant's candidates, a batch's prompts.
MAX_POSITIONS = 64

_F32 = np.float32
#: The weight matrices' dtype (numpy's, as :func:`host_calls.view` gives them) -> the suffix of
#: the kernels that read it (``DecoderLayerF16``, ``RowsMatMulBF16``, ...)
_SUFFIX = {np.dtype(np.float32): "", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16"}


class HostCache(tuple):
    """A self-attention cache as per-layer numpy arrays (R, H, S, Dh), written in place by the
    host steps (the step graphs take MindSpore tensors: :func:`on_device`). ``spare``: the
    other buffers beam search reorders into (:func:`reordered`)."""

    spare: Optional["HostCache"] = None


def on_host(cache) -> HostCache:
    """``cache`` (per-layer MindSpore tensors or a HostCache) as a HostCache (copies)."""
    if isinstance(cache, HostCache):
        return cache
    return HostCache(np.array(c.asnumpy(), dtype=_F32, copy=True) for c in cache)


def on_device(cache):
    """``cache`` as per-layer MindSpore tensors (copies a HostCache; anything else as is)."""
    if isinstance(cache, HostCache):
        return ms.mutable(tuple(ms.Tensor(a.copy()) for a in cache))
    return cache


def empty(shape, layers: int) -> HostCache:
    """A HostCache of ``layers`` float32 zero arrays of ``shape`` (R, H, S, Dh)."""
    return HostCache(np.zeros(shape, _F32) for _ in range(layers))


def grow(cache: HostCache, bucket: int) -> HostCache:
    """Zero-pad a HostCache along the slot axis to ``bucket`` slots."""
    return HostCache(np.pad(a, ((0, 0), (0, 0), (0, bucket - a.shape[2]), (0, 0))) for a in cache)


def _audio_views(kx, vx) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Host views of an audio's per-layer cross K/V tensors, once the graph that may be writing
    them has finished (launches are asynchronous); a RuntimeError when one is not float32 host
    memory."""
    vx[-1].asnumpy()
    kxs, vxs = [host_calls.view(t) for t in kx], [host_calls.view(t) for t in vx]
    if any(a is None or a.dtype != _F32 for a in kxs + vxs):
        raise RuntimeError("cross-attention K/V without a float32 host buffer")
    return kxs, vxs


@dataclass(frozen=True)
class _Plan:
    """A step's buffers and kernel calls for one shape, cache and audio (:meth:`HostStep._plan`):
    ``x`` the layers' input (R, D), ``slot`` the cache slot the calls write, ``ok`` the
    attendable slots, ``kn``/``vn`` a layer's new K/V, ``calls`` one per layer, ``tail`` the
    final LayerNorm and the projection into ``logits``."""

    x: np.ndarray
    slot: np.ndarray
    ok: np.ndarray
    kn: np.ndarray
    vn: np.ndarray
    calls: list
    tail: list
    logits: np.ndarray


class HostStep:
    """One model's decoder weights as host views and the step's kernel calls. The weight
    matrices (each layer's eight and the vocabulary projection) are float32, or a half-precision
    model's float16/bfloat16 parameters as stored (:attr:`weights`): the kernels convert them to
    float32 as they read them, exactly, so the step computes what it computes on the float32
    compute copy, bit for bit, and reads half the bytes."""

    def __init__(self, library: str, layers: List[W.DecoderLayer], embed, pos, final_ln, proj, heads: int,
                 head_dim: int, scaling: float, cross: Optional[List[np.ndarray]] = None):
        self.lib = ctypes.CDLL(library)
        #: CrossKV's weights, (Wk, Wv, bv) of every layer, float32 views; None: the graph computes it
        self.cross = cross
        self.layers, self.embed, self.pos, self.final_ln, self.proj = layers, embed, pos, final_ln, proj
        suffix = _SUFFIX[proj.dtype]
        #: the weight matrices' dtype as the kernels read them: "float32", "float16" or "bfloat16"
        self.weights = {"": "float32", "F16": "float16", "BF16": "bfloat16"}[suffix]
        self._layer_fn, self._rows_fn = getattr(self.lib, "DecoderLayer" + suffix), getattr(self.lib, "RowsMatMul" + suffix)
        self.heads, self.head_dim, self.scaling = heads, head_dim, scaling
        self._plans: Dict[Tuple, Any] = {}
        self._audio: Optional[Tuple[Any, Any]] = None  # the cross K/V the plans read
        self._masks: Dict[int, Tuple[Any, np.ndarray]] = {}
        #: one-token steps this object has run (tests and reports)
        self.steps = 0

    def _plan(self, rows: int, k: HostCache, v: HostCache, kx, vx, ok_rows: int):
        """Buffers and kernel calls for this shape, cache and audio. Plans are kept for the
        latest audio only, with its cross K/V tensors (so their buffers, which the calls read,
        live as long as the plans, and no other tensor can take their ids)."""
        if self._audio is None or self._audio[0] is not kx or self._audio[1] is not vx:
            self._plans.clear()
            self._audio = (kx, vx)
        key = (rows, ok_rows, tuple(id(a) for a in k + v))  # the calls hold the cache arrays too
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        kxs, vxs = _audio_views(kx, vx)
        d, s = self.embed.shape[1], k[0].shape[2]
        xs = [np.zeros((rows, d), _F32), np.zeros((rows, d), _F32)]
        kn, vn = np.zeros((rows, self.heads, 1, self.head_dim), _F32), np.zeros((rows, self.heads, 1, self.head_dim), _F32)
        pos0, ok, scaling = np.zeros(1, np.int32), np.ones((ok_rows, s), _F32), np.array([self.scaling], _F32)
        calls = []
        for i, lw in enumerate(self.layers):
            state = {"x": xs[i % 2], "k_cache": k[i], "v_cache": v[i], "positions": pos0, "key_ok": ok,
                     "k_x": kxs[i], "v_x": vxs[i], "scaling": scaling}
            calls.append(Call(self._layer_fn, W.kernel_args(lw, state) + [xs[(i + 1) % 2], kn, vn]))
        h = np.zeros((rows, d), _F32)
        logits = np.zeros((rows, self.proj.shape[0]), _F32)
        tail = [Call(self.lib.LayerNorm, [xs[len(self.layers) % 2], *self.final_ln, h]),
                Call(self._rows_fn, [h, self.proj, logits])]
        if len(self._plans) > 8:
            self._plans.clear()
        plan = self._plans[key] = _Plan(xs[0], pos0, ok, kn, vn, calls, tail, logits)
        return plan

    def cross_kv(self, enc: np.ndarray):
        """Every layer's cross-attention K^T (B, H, Dh, S) and V (B, H, S, Dh) from the encoder
        output ``enc`` (B, S, D) float32, in one ``CrossKV`` call: per-layer tuples of tensors
        that share the arrays the kernel wrote (:func:`host_calls.shared`: the steps read those
        arrays where they are)."""
        b, s, _ = enc.shape
        ks = [np.empty((b, self.heads, self.head_dim, s), _F32) for _ in self.layers]
        vs = [np.empty((b, self.heads, s, self.head_dim), _F32) for _ in self.layers]
        outs = [a for pair in zip(ks, vs) for a in pair]  # the kernel's order: K^T, V per layer
        Call(self.lib.CrossKV, [np.ascontiguousarray(enc, _F32)] + list(self.cross) + outs)()
        return tuple(host_calls.shared(a) for a in ks), tuple(host_calls.shared(a) for a in vs)

    def _mask(self, suppress) -> np.ndarray:
        hit = self._masks.get(id(suppress))
        if hit is None or hit[0] is not suppress:
            if len(self._masks) > 64:
                self._masks.clear()
            # the suppressed ids' indices: assigning through them beats a (V,) boolean mask
            hit = self._masks[id(suppress)] = (suppress, np.flatnonzero(suppress.asnumpy().astype(bool)))
        return hit[1]

    def logits(self, ids: np.ndarray, pos0: int, k: HostCache, v: HostCache, kx, vx,
               pos_ids: Optional[np.ndarray], key_ok: Optional[np.ndarray]) -> np.ndarray:
        """Tokens ``ids`` (R,) or (R, T) per row at cache slots ``pos0``.. (position-embedding rows
        ``pos_ids`` of the same shape, else the slots; attendable slots ``key_ok`` (R, S) bool,
        else all; R / B consecutive rows share an audio's cross K/V, ``kx``/``vx`` (B, ...)).
        Tokens run one after another (each attends the slots before it and its own, as the
        causal prompt graph does). Writes their K/V into ``k``/``v``; returns the logits of
        the last token (R, V), a new array."""
        ids = ids.reshape(ids.shape[0], -1)
        rows, t = int(ids.shape[0]), int(ids.shape[1])
        if pos_ids is not None:
            pos_ids = pos_ids.reshape(rows, t)
        plan = self._plan(rows, k, v, kx, vx, 1 if key_ok is None else rows)
        if key_ok is not None:
            plan.ok[...] = key_ok
        for j in range(t):
            self._token(plan, ids[:, j], pos0 + j, None if pos_ids is None else pos_ids[:, j], k, v)
        for call in plan.tail:
            call()
        self.steps += 1
        return plan.logits.copy()

    def _token(self, plan: "_Plan", ids: np.ndarray, at: int, pos_ids: Optional[np.ndarray], k: HostCache,
               v: HostCache) -> None:
        """One token a row (``ids`` (R,)) at cache slot ``at`` through every layer: its K/V into
        ``k``/``v``, its final state in the buffer ``plan.tail`` reads."""
        np.add(self.embed[ids], self.pos[at if pos_ids is None else pos_ids], out=plan.x)
        plan.slot[0] = at
        for i, call in enumerate(plan.calls):
            call()
            k[i][:, :, at] = plan.kn[:, :, 0]
            v[i][:, :, at] = plan.vn[:, :, 0]

    def all_logits(self, ids: np.ndarray, pos0: int, k: HostCache, v: HostCache, kx, vx) -> np.ndarray:
        """Tokens ``ids`` (R, T) at cache slots ``pos0``.., causal (each attends the slots before
        it and its own), with the logits of every position: (R, T, V), a new array; their K/V
        written into ``k``/``v``. What an assistant's candidate tokens are verified with.

        Each layer reads its weights once for all R x T positions (:meth:`_product`; numpy for
        the attention), and the final states go through the final LayerNorm and the projection
        together. The products sum in another order than the fused one-token layer: the logits
        are within ~1e-6 relative of one-token steps'. At most :data:`MAX_POSITIONS` positions."""
        rows, t = int(ids.shape[0]), int(ids.shape[1])
        if rows * t > MAX_POSITIONS:
            raise ValueError(f"{rows} x {t} positions: at most {MAX_POSITIONS} a call")
        states = np.ascontiguousarray(self._layers_at_once(ids, pos0, k, v, kx, vx).reshape(rows * t, -1))
        normed = np.empty_like(states)
        Call(self.lib.LayerNorm, [states, *self.final_ln, normed])()
        self.steps += 1
        return self._product(normed, self.proj).reshape(rows, t, -1)

    def _product(self, x: np.ndarray, w) -> np.ndarray:
        """x (M, K) float32 times w (N, K)^T, a new array: numpy's BLAS for float32 weights (past a
        few rows it beat ``RowsMatMul`` here: PROFILE_NOTES section 38), ``RowsMatMul`` for
        half-precision weights as stored (numpy has no bfloat16)."""
        x = np.ascontiguousarray(x, _F32)
        if w.dtype == _F32:
            return x @ w.T
        out = np.empty((x.shape[0], w.shape[0]), _F32)
        Call(self._rows_fn, [x, w, out])()
        return out

    def _layers_at_once(self, ids: np.ndarray, pos0: int, k: HostCache, v: HostCache, kx, vx) -> np.ndarray:
        """The decoder layers on tokens ``ids`` (R, T) at slots ``pos0``.. in one pass over each
        layer's weights: their final states (R, T, D) before the final norm."""
        rows, t = int(ids.shape[0]), int(ids.shape[1])
        h, dh = self.heads, self.head_dim
        end = pos0 + t
        x = (self.embed[ids] + self.pos[pos0:end]).astype(_F32).reshape(rows * t, -1)
        # token j attends slots up to pos0 + j
        causal = np.where(np.arange(end)[None, :] > (pos0 + np.arange(t))[:, None], -np.inf, 0.0).astype(_F32)
        kxs, vxs = _audio_views(kx, vx)

        def norm(x, ln):
            out = np.empty_like(x)
            Call(self.lib.LayerNorm, [x, ln.weight, ln.bias, out])()
            return out

        def heads(y):  # (R*T, D) -> (R, H, T, Dh)
            return y.reshape(rows, t, h, dh).transpose(0, 2, 1, 3)

        def merged(o):  # (R, H, T, Dh) -> (R*T, D)
            return np.ascontiguousarray(o.transpose(0, 2, 1, 3)).reshape(rows * t, h * dh)

        def softmax(w):
            w = np.exp(w - w.max(-1, keepdims=True))
            return w / w.sum(-1, keepdims=True)

        mm = self._product
        for i, lw in enumerate(self.layers):
            a, c = lw.attn, lw.cross
            n = norm(x, lw.ln1)
            q = heads((mm(n, a.q_w) + a.q_b) * self.scaling)
            k[i][:, :, pos0:end] = heads(mm(n, a.k_w))
            v[i][:, :, pos0:end] = heads(mm(n, a.v_w) + a.v_b)
            o = softmax(q @ k[i][:, :, :end].transpose(0, 1, 3, 2) + causal) @ v[i][:, :, :end]
            x = x + (mm(merged(o), a.o_w) + a.o_b)
            n = norm(x, lw.ln2)
            q = heads((mm(n, c.q_w) + c.q_b) * self.scaling)
            o = softmax(q @ kxs[i]) @ vxs[i]  # K^T (B, H, Dh, S), V (B, H, S, Dh)
            x = x + (mm(merged(o), c.o_w) + c.o_b)
            n = norm(x, lw.ln3)
            f = mm(n, lw.fc1_w)
            Call(self.lib.BiasGelu, [f, lw.fc1_b, f])()
            x = x + (mm(f, lw.fc2_w) + lw.fc2_b)
        return x.reshape(rows, t, -1)

    def next(self, ids: np.ndarray, pos0: int, k: HostCache, v: HostCache, kx, vx, suppress,
             pos_ids: Optional[np.ndarray], key_ok: Optional[np.ndarray]):
        """A greedy step (see :meth:`logits`): (argmax (R,), scores (R, V) with ``suppress``
        (a (V,) bool tensor) at -inf, logits (R, V)), new numpy arrays."""
        out = self.logits(ids, pos0, k, v, kx, vx, pos_ids, key_ok)
        scores = out.copy()
        scores[:, self._mask(suppress)] = -np.inf
        return scores.argmax(-1), scores, out


def reordered(cache: HostCache, order: np.ndarray) -> HostCache:
    """Beam search: the cache whose row r continues row ``order[r]`` of ``cache``, written into
    the cache's spare buffers (two alternate; ``cache`` itself is left as it was, so a step that
    fails after this can still run as a graph on it)."""
    if np.array_equal(order, np.arange(len(order))):
        return cache
    spare = getattr(cache, "spare", None)
    if spare is None or len(spare) != len(cache) or any(a.shape != b.shape for a, b in zip(cache, spare)):
        spare = HostCache(np.empty_like(a) for a in cache)
    for a, b in zip(cache, spare):
        np.take(a, order, axis=0, out=b)
    spare.spare = cache
    return spare


def _layer_views(lw: W.DecoderLayer, dtype) -> Optional[W.DecoderLayer]:
    """One layer's weights as host views: the matrices (:func:`W.matrix_paths`) viewed as
    ``dtype``, the rest float32; None when a view is not usable."""
    paths = W.leaf_paths(W.DecoderLayer)
    matrices = set(W.matrix_paths(W.DecoderLayer))
    mats = host_calls.views([W.get(lw, W.DecoderLayer, p) for p in paths if p in matrices], dtype)
    rest = host_calls.views([W.get(lw, W.DecoderLayer, p) for p in paths if p not in matrices])
    if mats is None or rest is None:
        return None
    mats, rest = iter(mats), iter(rest)
    got = {p: next(mats) if p in matrices else next(rest) for p in paths}
    return W.mapped(lw, lambda path, _: got[path])


def _bf16_copy(lw: W.DecoderLayer) -> W.DecoderLayer:
    """``lw`` (host views) with its weight matrices rounded to bfloat16 (new uint16 arrays)."""
    matrices = set(W.matrix_paths(W.DecoderLayer))
    return W.mapped(lw, lambda path, a: host_calls.bf16_bits(a) if path in matrices else a)


def for_weights(w, library: str, precision: str = "float32") -> Optional[HostStep]:
    """A :class:`HostStep` for ``w`` (:class:`~.arranged.DecoderWeights`) on the kernel
    ``library``, or None when a weight is not a host buffer whose view reads the tensor's
    values. A half-precision model's weight matrices are read as stored (``w.stored``,
    ``w.proj_stored``) when they all give such views, else from the float32 copy
    (``w.layers``, built then). ``precision="bfloat16"`` (``Config.matmul_precision``, named by
    the user) gives a float32 model's steps a copy of the matrices rounded to bfloat16, which the
    ``*BF16`` kernels read as a bfloat16 model's (half the bytes a step reads); the cross
    attention's K/V weights, embeddings and norms stay float32, and a half-precision model's
    weights are read as stored either way."""
    views = host_calls.views
    dtype = host_calls.VIEW_DTYPES.get(w.proj_stored.dtype) if w.proj_stored is not None else None
    layers = proj = None
    if dtype is not None:
        layers = [_layer_views(lw, dtype) for lw in w.stored]
        proj = views((w.proj_stored,), dtype)
    if dtype is None or proj is None or any(p is None for p in layers):
        layers = [_layer_views(lw, np.dtype(np.float32)) for lw in w.layers]
        proj = views((w.vocab.proj,))
        if proj is None or any(p is None for p in layers):
            return None
    rest = views((w.vocab.embed, w.vocab.positions, w.vocab.final_ln.weight, w.vocab.final_ln.bias))
    if rest is None:
        return None
    embed, pos, g, b = rest
    if precision == "bfloat16" and proj[0].dtype == np.float32:
        layers, proj = [_bf16_copy(lw) for lw in layers], [host_calls.bf16_bits(proj[0])]
    return HostStep(library, layers, embed, pos, (g, b), proj[0], w.heads, w.head_dim, w.scaling,
                    cross=views(tuple(w.cross_flat)))
