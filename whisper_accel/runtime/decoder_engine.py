"""The decoder engine: one model's decoder and vocabulary projection
(:class:`~.arranged.DecoderWeights`) and its executors -- ``host``
(:class:`~.executors.host.HostDecoder`: one-token greedy and beam steps), ``fused`` and
``plain`` (:mod:`.executors.graph`) -- behind the operations the decode loops call.

The self-attention cache is static-shape: per layer (rows, heads, slots, head dim), in buckets
of :data:`BUCKETS` slots (a generation uses the smallest that fits, growing as it goes). A host
step keeps it as numpy arrays (:class:`~.host_step.HostCache`), a graph step as MindSpore
tensors; each executor converts what it is given.

Which executor runs first: ``Config.decoder`` forces one (the later ones in
:data:`whisper_accel.config.EXECUTORS` order stay as fallbacks); ``auto`` runs them in that
order: host steps avoid the step graph's per-launch cost and run the same kernels, so they are
not measured against the graphs (benchmarks/PROFILE_NOTES.md). A failing executor falls back
to the next one for this model only (:mod:`.engine`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import mindspore as ms
from mindspore import ops

from .. import config as _config
from . import host_step
from .arranged import DecoderWeights
from .engine import Engine, NotCopied, order_for
from .executors.graph import FusedDecoder, PlainDecoder
from .executors.host import HostDecoder

#: Static self-attention cache sizes; a generation uses the smallest that fits.
BUCKETS = (64, 128, 256, 448)


class DecoderEngine(NotCopied):
    def __init__(self, model, config: Optional[_config.Config] = None):
        self.config = _config.current() if config is None else config
        self.weights = w = DecoderWeights(model)
        self.engine = Engine([HostDecoder(w, self.config), FusedDecoder(w, self.config),
                              PlainDecoder(w, self.config)], order_for(self.config.decoder))
        self.max_positions, self.head_dim = w.max_positions, w.head_dim
        #: decoder step keys seen (kind, rows, tokens, slots[, beams]), for reports
        self.compiled_shapes: List[Tuple] = []
        self.lock = self.engine.lock

    @property
    def model_dtype(self):
        return self.weights.model_dtype

    @property
    def dtype(self):
        return self.weights.dtype

    @property
    def proj(self):
        """The vocabulary projection (V, D) the steps use (float32)."""
        return self.weights.vocab.proj

    def matches(self, model) -> bool:
        """True while ``model``'s decoder weights are the very objects, dtypes and buffers arranged."""
        return self.weights.matches(model)

    def _note(self, key):
        if key not in self.compiled_shapes:
            self.compiled_shapes.append(key)

    @staticmethod
    def bucket_for(length: int, max_positions: int = 448) -> int:
        for b in BUCKETS:
            if length <= b <= max_positions:
                return b
        return max_positions

    def cross_kv(self, hidden):
        """-> (K^T, V): per-layer tuples of (B, H, Dh, S_enc) and (B, H, S_enc, Dh)."""
        ks, vs = self.engine.run("cross_kv", hidden)
        return ms.mutable(tuple(ks)), ms.mutable(tuple(vs))

    def new_cache(self, batch: int, bucket: int):
        """Empty self-attention cache: per-layer tuples of (B, H, bucket, Dh) zeros. When the
        host steps come first they are numpy arrays (a HostCache, which the host steps write in
        place): 2 x layers MindSpore zeros would each cost an operator dispatch, and the first
        host step would copy them to the host anyway. A graph step given it converts it once."""
        shape = (batch, self.weights.heads, bucket, self.head_dim)
        if self.engine.usable()[:1] == ["host"] and batch <= host_step.MAX_ROWS:
            return host_step.empty(shape, self.weights.n_layers), host_step.empty(shape, self.weights.n_layers)
        zeros = tuple(ops.zeros(shape, self.dtype) for _ in range(2 * self.weights.n_layers))
        return ms.mutable(zeros[::2]), ms.mutable(zeros[1::2])

    @staticmethod
    def grow_cache(k_cache, v_cache, bucket: int):
        """Zero-pad per-layer caches along the slot axis to ``bucket`` slots."""
        if isinstance(k_cache, host_step.HostCache):
            return host_step.grow(k_cache, bucket), host_step.grow(v_cache, bucket)

        def pad(c):
            b, h, s, d = c.shape
            return ops.concat((c, ops.zeros((b, h, bucket - s, d), c.dtype)), 2)
        return ms.mutable(tuple(pad(c) for c in k_cache)), ms.mutable(tuple(pad(c) for c in v_cache))

    def decode_step(self, ids, pos0: int, k_cache, v_cache, k_x, v_x):
        """Tokens ``ids`` (B, T) at positions pos0..pos0+T-1 -> (logits (B,T,V), k_cache, v_cache)."""
        self._note(("decode",) + tuple(ids.shape) + (int(k_cache[0].shape[2]),))
        return self.engine.run("decode_step", ids, pos0, k_cache, v_cache, k_x, v_x)

    def decode_next(self, ids, pos0: int, k_cache, v_cache, k_x, v_x, suppress, cross=None, padding=None):
        """Greedy step for tokens ``ids`` (B, T) at pos0..: ``suppress`` is a (V,) bool Tensor of
        ids to set to -inf. Returns (next ids (B,), scores (B,V), logits (B,V), k_cache, v_cache).
        ``cross``: a list that receives this step's per-layer cross-attention probabilities.
        ``padding``: a :class:`whisper_accel.runtime.padding.DecoderPadding`, else None."""
        self._note(("next",) + tuple(ids.shape) + (int(k_cache[0].shape[2]),))
        return self.engine.run("decode_next", ids, pos0, k_cache, v_cache, k_x, v_x, suppress, cross, padding)

    def decode_beams(self, ids, pos0: int, k_cache, v_cache, beam_idx, k_x, v_x, beams: int, cross=None,
                     padding=None):
        """Beam step: reorder the caches by ``beam_idx`` (N,) int32, run ``ids`` (N, T) at
        pos0.., cross K/V shared by each audio's ``beams`` rows. Returns (logits (N,V) of the
        last position, their log-softmax, k_cache, v_cache); ``cross``/``padding`` as for
        :meth:`decode_next`."""
        self._note(("beams",) + tuple(ids.shape) + (int(k_cache[0].shape[2]), beams))
        return self.engine.run("decode_beams", ids, pos0, k_cache, v_cache, beam_idx, k_x, v_x, beams, cross,
                               padding)

    def executor(self, op: str) -> Optional[str]:
        """Which executor ran ``op`` ("cross_kv", "decode_next", "decode_beams", "decode_step")
        last."""
        return self.engine.ran.get(op)

    def report(self) -> Dict:
        return {"config": self.config.decoder, **self.engine.report()}
