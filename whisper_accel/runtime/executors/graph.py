"""The graph executors: ``plain`` (``mindspore.jit`` graphs of MindSpore's own operators,
:mod:`whisper_accel.kernels.graphs`) and ``fused`` (the same graphs with the fused kernels,
:mod:`whisper_accel.kernels.fused`), for the encoder and for the decoder.

Why graphs: in PyNative every CPU op pays ~1-5 ms of dispatch and ``linear`` against the
vocabulary matrix transposes the weight on every call; inside one graph the same ops cost ~0.1
ms and ``MatMul(transpose_b=True)`` reads the weight as stored. MindSpore keys each jit
function's compiled graphs on argument shapes/dtypes: one graph per (batch, frames) for the
encoder, per (rows, tokens per step, cache slots) for the decoder.
"""

from __future__ import annotations

from typing import Optional

import mindspore as ms
import numpy as np

from ... import _environment
from ...kernels import graphs as G
from .. import host_step
from ..engine import Executor
from .base import KernelExecutor


def graphs_unavailable() -> Optional[str]:
    """Why no graph executor runs in this process (None: they can)."""
    return _environment.COMPILE_CACHE if _environment.compile_cache_on() else None


def layers_per_launch(n_layers: int, layer_bytes: int, budget: int) -> int:
    """The largest divisor ``g`` of ``n_layers`` whose extra ``g - 1`` layers of intermediates,
    ``layer_bytes`` each, fit ``budget`` bytes (a MindSpore CPU graph keeps a buffer per
    intermediate tensor; each launch boundary costs the dispatch thread's wake-up)."""
    return max(g for g in range(1, n_layers + 1) if n_layers % g == 0 and (g - 1) * layer_bytes <= budget)


def encoder_layer_bytes(batch: int, frames: int, d_model: int, ffn: int) -> int:
    """Estimated intermediates of one fused encoder layer: float32 ``batch x frames x (6 d_model
    + 2 ffn)``."""
    return 4 * batch * frames * (6 * d_model + 2 * ffn)


class GraphEncoder(Executor):
    """The encoder as graph launches: stem, layers (``group`` a launch), final norm; all in one
    graph when the group is every layer."""

    def unavailable(self) -> Optional[str]:
        return graphs_unavailable()

    #: how many layers the last call ran per launch
    last_group: Optional[int] = None

    def graphs(self):
        raise NotImplementedError

    def group(self, shape) -> int:
        raise NotImplementedError

    def encode(self, feats):
        w, g = self.w, self.graphs()
        n = len(w.layers)
        group = self.last_group = self.group(tuple(feats.shape))
        if group == n:
            return g.encode_whole(feats, w.stem_graph, ms.mutable(w.layers_graph), w.final_graph, w.heads, w.scaling)
        x = g.enc_stem(feats, w.stem_graph)
        for i in range(0, n, group):
            if group == 1:
                x = g.enc_layer(x, w.layers_graph[i], w.heads, w.scaling)
            else:
                x = g.enc_layers(x, ms.mutable(w.layers_graph[i:i + group]), w.heads, w.scaling)
        return g.enc_final(x, w.final_graph)


class PlainEncoder(GraphEncoder):
    """MindSpore's operators; one layer a launch (its attention writes each layer's (B, H, T, T)
    scores out), or the whole encoder with ``Config.whole_encoder_graph``."""

    name = "plain"

    def graphs(self):
        return G.PLAIN_ENCODER

    def group(self, shape) -> int:
        return len(self.w.layers) if self.config.whole_encoder_graph else 1


class FusedEncoder(KernelExecutor, GraphEncoder):
    """The fused kernels' graphs; as many layers a launch as ``Config.group_bytes`` allows
    (:func:`layers_per_launch`), or all with ``Config.whole_encoder_graph``."""

    name = "fused"

    def graphs(self):
        return self.fused().ENCODER

    def group(self, shape) -> int:
        n = len(self.w.layers)
        if self.config.whole_encoder_graph:
            return n
        batch, _, frames = shape
        return layers_per_launch(n, encoder_layer_bytes(int(batch), int(frames) // 2, self.w.d_model, self.w.ffn),
                                 self.config.group_bytes)


_COLS = {}  # cache slots -> arange(slots) int32
_EVERY = {}  # cache slots -> (1, slots) all-True bool: no padding


def positions(pos0: int, t: int, s: int, padding=None):
    """The step's slot indices (T,), all slots (S,), position-embedding rows (1 or B, T) and
    attendable slots (1 or B, S): without ``padding`` the slots themselves and every slot."""
    slots = np.arange(pos0, pos0 + t, dtype=np.int32)
    pos = ms.Tensor(slots)
    cols = _COLS.get(s)
    if cols is None:
        cols = _COLS[s] = ms.Tensor(np.arange(s, dtype=np.int32))
    if padding is not None:
        return pos, cols, ms.Tensor(padding.positions(pos0, t)), ms.Tensor(padding.keys(s))
    every = _EVERY.get(s)
    if every is None:
        every = _EVERY[s] = ms.Tensor(np.ones((1, s), dtype=np.bool_))
    return pos, cols, ms.Tensor(slots.reshape(1, t)), every


class GraphDecoder(Executor):
    """The decoder's cross K/V and greedy / beam steps as graph launches; caches are MindSpore
    tensors (a host step's numpy cache is copied in first)."""

    def unavailable(self) -> Optional[str]:
        return graphs_unavailable()

    def steps(self):
        raise NotImplementedError

    def _args(self, ids, pos0, k_cache, v_cache, padding):
        t, s = int(ids.shape[1]), int(k_cache[0].shape[2])
        pos, cols, pos_ids, key_ok = positions(pos0, t, s, padding)
        w = self.w
        return pos, cols, pos_ids, key_ok, (w.vocab.embed, w.vocab.proj, w.vocab.positions, w.layers_graph,
                                            w.final_graph, w.heads, w.scaling)

    def decode_next(self, ids, pos0, k_cache, v_cache, k_x, v_x, suppress, cross=None, padding=None):
        steps = self.steps()
        k_cache, v_cache = host_step.on_device(k_cache), host_step.on_device(v_cache)
        pos, cols, pos_ids, key_ok, (embed, proj, pos_table, layers, final, heads, scaling) = self._args(
            ids, pos0, k_cache, v_cache, padding)
        nxt, scores, logits, k, v, probs = steps.decode_next(
            ids, pos, cols, k_cache, v_cache, k_x, v_x, embed, proj, pos_table, layers, final, heads, scaling,
            suppress, pos_ids, key_ok, cross is not None)
        if cross is not None:
            cross.append(tuple(probs))
        return nxt, scores, logits, ms.mutable(tuple(k)), ms.mutable(tuple(v))

    def decode_beams(self, ids, pos0, k_cache, v_cache, beam_idx, k_x, v_x, beams, cross=None, padding=None):
        steps = self.steps()
        k_cache, v_cache = host_step.on_device(k_cache), host_step.on_device(v_cache)
        pos, cols, pos_ids, key_ok, (embed, proj, pos_table, layers, final, heads, scaling) = self._args(
            ids, pos0, k_cache, v_cache, padding)
        logits, logp, k, v, probs = steps.decode_beams(
            ids, pos, cols, k_cache, v_cache, beam_idx, k_x, v_x, embed, proj, pos_table, layers, final, heads,
            scaling, beams, pos_ids, key_ok, cross is not None)
        if cross is not None:
            cross.append(tuple(probs))
        return logits, logp, ms.mutable(tuple(k)), ms.mutable(tuple(v))


class PlainDecoder(GraphDecoder):
    """MindSpore's operators: also the multi-token prompt step (:meth:`decode_step`) and the
    per-layer cross K/V graphs."""

    name = "plain"

    def steps(self):
        return G.PLAIN

    def cross_kv(self, hidden):
        ks, vs = [], []
        for p in self.w.cross_graph:
            k, v = G.cross_kv(hidden, p, self.w.heads)
            ks.append(k)
            vs.append(v)
        return ks, vs

    def decode_step(self, ids, pos0, k_cache, v_cache, k_x, v_x):
        k_cache, v_cache = host_step.on_device(k_cache), host_step.on_device(v_cache)
        t, s = int(ids.shape[1]), int(k_cache[0].shape[2])
        pos, cols, pos_ids, key_ok = positions(pos0, t, s)
        w = self.w
        logits, k, v = G.decode(ids, pos, cols, k_cache, v_cache, k_x, v_x, w.vocab.embed, w.vocab.proj,
                                w.vocab.positions, w.layers_graph, w.final_graph, w.heads, w.scaling, pos_ids, key_ok)
        return logits, ms.mutable(tuple(k)), ms.mutable(tuple(v))


class FusedDecoder(KernelExecutor, GraphDecoder):
    """The fused kernels: every layer's cross K/V in one ``CrossKV`` launch, and step graphs with
    the ``RowsMatMul`` projection and one ``DecoderLayer`` kernel a layer (prompts of several
    tokens: :class:`PlainDecoder`)."""

    name = "fused"

    def steps(self):
        return self.fused().DECODER

    def cross_kv(self, hidden):
        return self.fused().cross_kv(hidden, self.w.cross_flat, self.w.heads)
