"""The ``host`` executors: the encoder (:mod:`..host_encoder`) and the decoder's one-token
steps (:mod:`..host_step`) with numpy and the fused kernels through ctypes, no graph.

Each needs the fused kernel library (:mod:`..native`) and weights it can read as host buffers;
a model whose weights it cannot read makes it :class:`~..engine.Unavailable` for that model
(the graph executors run). Calls it does not take raise :class:`~..engine.Decline`.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from ... import _environment
from ...kernels import graphs
from .. import host_calls, host_encoder, host_step
from ..engine import Decline
from .base import KernelExecutor


class HostEncoderExecutor(KernelExecutor):
    """The encoder (:attr:`impl`: its :class:`~..host_encoder.HostEncoder`, once built)."""

    name = "host"

    def encode(self, feats):
        impl = self.host_impl(lambda w, lib: host_encoder.for_weights(w, lib, self.config.matmul_precision),
                              "the encoder's weights are not float32 host buffers")
        if not impl.fits(tuple(feats.shape)):
            raise Decline
        return ms.Tensor(impl(feats.asnumpy()))

    def precision(self) -> dict:
        """The matrix products' precision: asked (``Config.matmul_precision``), what the host
        encoder runs (None before it is built) and why not what was asked."""
        impl = self.impl
        return {"asked": self.config.matmul_precision, "host": impl and impl.precision,
                "why": impl and impl.precision_note}


class HostDecoder(KernelExecutor):
    """Greedy and beam steps of at most :data:`host_step.MAX_TOKENS` tokens and
    :data:`host_step.MAX_ROWS` rows, without cross-attention probabilities, and a prompt
    without padding (a padded prompt's padding tokens attend to nothing: the graph computes
    their cache slots as stock does, a host step would not); multi-token steps with every
    position's logits (:meth:`decode_step`). :attr:`impl`: its :class:`~..host_step.HostStep`,
    once built."""

    name = "host"

    def _ready(self, ids, cross, padding) -> host_step.HostStep:
        t = int(ids.shape[1])
        if t > host_step.MAX_TOKENS or (t > 1 and padding is not None) or cross is not None \
                or int(ids.shape[0]) > host_step.MAX_ROWS:
            raise Decline
        return self._impl()

    def _impl(self) -> host_step.HostStep:
        return self.host_impl(lambda w, lib: host_step.for_weights(w, lib, self.config.matmul_precision),
                              "the decoder's weights are not host buffers it can read")

    @staticmethod
    def _caches(k_cache, v_cache, order=None):
        k, v = host_step.on_host(k_cache), host_step.on_host(v_cache)
        if order is not None:
            k, v = host_step.reordered(k, order), host_step.reordered(v, order)
        return k, v

    def cross_kv(self, hidden):
        """The cross-attention K/V on the host (``CrossKV`` through ctypes): float32 (B, S, D)
        encoder states of a model whose cross weights gave host views."""
        impl = self._impl()
        if impl.cross is None or hidden.dtype != ms.float32 or len(hidden.shape) != 3:
            raise Decline
        return impl.cross_kv(hidden.asnumpy())

    def decode_next(self, ids, pos0, k_cache, v_cache, k_x, v_x, suppress, cross=None, padding=None):
        impl = self._ready(ids, cross, padding)
        k, v = self._caches(k_cache, v_cache)
        rows = ids.asnumpy().astype(np.int64)
        s = int(k[0].shape[2])
        nxt, scores, logits = impl.next(rows, pos0, k, v, k_x, v_x, suppress,
                                        None if padding is None else padding.positions(pos0, rows.shape[1]),
                                        None if padding is None else padding.keys(s))
        # new arrays of this step: tensors sharing them (a copy of the (R, V) rows costs ~30 us)
        return host_calls.shared(nxt), host_calls.shared(scores), host_calls.shared(logits), k, v

    def decode_step(self, ids, pos0, k_cache, v_cache, k_x, v_x):
        """Every position's logits (B, T, V) of tokens ``ids`` (B, T) at ``pos0``..: up to
        :data:`host_step.MAX_POSITIONS` positions in all (an assistant's candidates verified
        with one pass over each layer's weights: :meth:`~..host_step.HostStep.all_logits`)."""
        b, t = int(ids.shape[0]), int(ids.shape[1])
        if b * t > host_step.MAX_POSITIONS:
            raise Decline
        impl = self._impl()
        k, v = self._caches(k_cache, v_cache)
        return ms.Tensor(impl.all_logits(ids.asnumpy().astype(np.int64), pos0, k, v, k_x, v_x)), k, v

    def decode_beams(self, ids, pos0, k_cache, v_cache, beam_idx, k_x, v_x, beams, cross=None, padding=None):
        """The log-softmax is MindSpore's, as in the graph (what stock beam search applies):
        :func:`log_softmax`."""
        impl = self._ready(ids, cross, padding)
        k, v = self._caches(k_cache, v_cache, beam_idx.asnumpy().astype(np.int64))
        rows = ids.asnumpy().astype(np.int64)
        s = int(k[0].shape[2])
        logits = ms.Tensor(impl.logits(rows, pos0, k, v, k_x, v_x,
                                       None if padding is None else padding.positions(pos0, rows.shape[1]),
                                       None if padding is None else padding.keys(s)))
        return logits, log_softmax(logits), k, v


def log_softmax(logits):
    """MindSpore's LogSoftmax of ``logits`` over the last axis, the kernel stock beam search
    applies (the scores are stock's bit for bit): as a one-operator graph, whose launch costs a
    fraction of a PyNative operator's dispatch; as a PyNative operator when no graph may run in
    this process (MindSpore's compile cache is on: ``_environment.compile_cache_on``)."""
    if _environment.compile_cache_on():
        return ops.log_softmax(logits, -1)
    return graphs.log_softmax(logits)
