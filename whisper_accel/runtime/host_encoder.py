"""The encoder on the host: numpy's matrix multiply (its OpenBLAS) for the two convolutions and
every linear layer, the fused kernels through ``ctypes`` for the rest, no graph.

Why: inside a graph launch MindSpore's dispatch thread spins on one core while the graph runs,
so the graph's MatMuls and kernels share a core with it; run back to back from Python, the
same kernels need no dispatch thread. Whether that beats the fused graphs depends on the
machine (numpy's BLAS against MindSpore's oneDNN MatMul): :mod:`whisper_accel.runtime.choice`
measures it where it runs.

What it computes is :func:`whisper_accel.kernels.fused.encode_whole`'s arithmetic, in float32:

* conv1 / conv2 (kernel 3, padding 1, strides 1 / 2) as one GEMM each over the unfolded input
  (rows = output frames, columns = (input channel, tap), the weights' own layout), then
  ``BiasGelu``; the positions added;
* per layer ``LayerNorm``; h Wq^T, h Wk^T, h Wv^T; ``AttentionBias`` (q = (h Wq^T + bq) *
  scaling and v = h Wv^T + bv as it loads them, then ``Attention``'s arithmetic); its output
  times Wo^T; ``ResLayerNorm`` (the residual with bo, then the second norm); h W1^T,
  ``BiasGelu``; times W2^T; ``BiasResidual``;
* the final ``LayerNorm``.

The convolutions and matrix products sum in OpenBLAS's order, not oneDNN's: the output is
within ~1e-6 relative of the graphs' (the tests hold it to 1e-5, and to stock within 1e-4).
:func:`for_weights` refuses (None) a model whose encoder weights are not float32 host buffers it
can verify (a float16/bfloat16 model's are its float32 compute copy). Not thread-safe by
itself: its executor (:class:`whisper_accel.runtime.executors.host.HostEncoderExecutor`) calls
it under the engine's lock.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import numpy as np

from ..kernels import weights as W
from . import host_calls
from .host_calls import Call

_F32 = np.float32


class _Buffers:
    """The work arrays of one batch size, and the kernel calls that read them."""

    def __init__(self, enc: "HostEncoder", batch: int):
        d, ffn, t = enc.d, enc.ffn, enc.frames
        rows, heads = batch * t, enc.heads

        def zeros(*shape):
            return np.zeros(shape, _F32)

        self.batch = batch
        self.x, self.y, self.n, self.q, self.k, self.v, self.o = (zeros(rows, d) for _ in range(7))
        self.f = zeros(rows, ffn)
        self.conv1 = zeros(batch * 2 * t, d)
        split = (batch, t, heads, d // heads)
        self.gelu1 = Call(enc.lib.BiasGelu, [self.conv1, enc.stem.conv1_b, self.conv1])
        self.gelu2 = Call(enc.lib.BiasGelu, [self.y, enc.stem.conv2_b, self.y])
        heads_of = [self.q.reshape(split), self.k.reshape(split), self.v.reshape(split)]
        self.layers = []
        for lw in enc.layers:
            attn, ln1, ln2 = lw.attn, lw.ln1, lw.ln2
            self.layers.append((Call(enc.lib.LayerNorm, [self.x, ln1.weight, ln1.bias, self.n]), attn,
                                Call(enc.lib.AttentionBias, [*heads_of, attn.q_b, attn.v_b, enc.scaling,
                                                             self.o.reshape(split)]),
                                Call(enc.lib.ResLayerNorm, [self.x, self.y, attn.o_b, ln2.weight, ln2.bias, self.x,
                                                            self.n]),
                                lw.fc1_w, Call(enc.lib.BiasGelu, [self.f, lw.fc1_b, self.f]), lw.fc2_w,
                                Call(enc.lib.BiasResidual, [self.x, self.y, lw.fc2_b, self.x])))
        self.final = Call(enc.lib.LayerNorm, [self.x, enc.final_ln.weight, enc.final_ln.bias, self.n])


class HostEncoder:
    """One model's encoder weights as host views and the encoder's kernel calls."""

    def __init__(self, library: str, stem: W.Stem, layers, final_ln: W.LayerNorm, heads: int, scaling: float):
        self.lib = ctypes.CDLL(library)
        self.stem = stem
        self.d, self.mels = int(stem.conv1_w.shape[0]), int(stem.conv1_w.shape[1])
        # (out, in, tap) as stored is (out, in x tap): the unfolded input's column order
        self.conv_w = (stem.conv1_w.reshape(self.d, -1), stem.conv2_w.reshape(self.d, -1))
        self.pos, self.layers, self.final_ln = stem.positions, layers, final_ln
        self.frames, self.ffn = int(self.pos.shape[0]), int(layers[0].fc1_w.shape[0])
        self.heads, self.scaling = heads, np.array([scaling], _F32)
        self._buffers: Optional[_Buffers] = None
        #: encoder calls this object has run (tests and reports)
        self.calls = 0

    def fits(self, shape: Tuple[int, ...]) -> bool:
        """Whether features of ``shape`` are (batch, mels, 2 x positions)."""
        return len(shape) == 3 and shape[0] >= 1 and shape[1] == self.mels and shape[2] == 2 * self.frames

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        """(B, mels, 2 x positions) float32 -> (B, positions, d_model), a new array."""
        batch = int(feats.shape[0])
        buf = self._buffers
        if buf is None or buf.batch != batch:
            buf = self._buffers = _Buffers(self, batch)
        t = self.frames
        w1, w2 = self.conv_w
        # conv1: every frame's (mel, tap) window, the time axis padded by one on each side
        padded = np.pad(np.asarray(feats, _F32), ((0, 0), (0, 0), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, 3, axis=2)  # (B, mels, 2t, 3)
        np.matmul(np.ascontiguousarray(windows.transpose(0, 2, 1, 3)).reshape(batch * 2 * t, -1), w1.T, out=buf.conv1)
        buf.gelu1()
        # conv2, stride 2, on the channels-last conv1 output: frame j reads frames 2j-1 .. 2j+1
        padded = np.pad(buf.conv1.reshape(batch, 2 * t, self.d), ((0, 0), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, 3, axis=1)[:, ::2][:, :t]  # (B, t, d, 3)
        np.matmul(np.ascontiguousarray(windows).reshape(batch * t, -1), w2.T, out=buf.y)
        buf.gelu2()
        np.add(buf.y.reshape(batch, t, self.d), self.pos, out=buf.x.reshape(batch, t, self.d))
        for ln1, attn, attention, res_ln, fc1, gelu, fc2, residual in buf.layers:
            ln1()
            np.matmul(buf.n, attn.q_w.T, out=buf.q)  # q's bias and scaling, v's bias: in AttentionBias
            np.matmul(buf.n, attn.k_w.T, out=buf.k)
            np.matmul(buf.n, attn.v_w.T, out=buf.v)
            attention()
            np.matmul(buf.o, attn.o_w.T, out=buf.y)
            res_ln()
            np.matmul(buf.n, fc1.T, out=buf.f)
            gelu()
            np.matmul(buf.f, fc2.T, out=buf.y)
            residual()
        buf.final()
        self.calls += 1
        return buf.n.reshape(batch, t, self.d).copy()


def for_weights(w, library: str) -> Optional[HostEncoder]:
    """A :class:`HostEncoder` for ``w`` (:class:`~.arranged.EncoderWeights`) on the kernel
    ``library``, or None when a weight is not a float32 host buffer whose view reads the
    tensor's values."""

    def viewed(structure):
        paths = [p for p in W.leaf_paths(type(structure))]
        got = host_calls.views([W.get(structure, type(structure), p) for p in paths])
        if got is None:
            return None
        by_path = dict(zip(paths, got))
        return W.mapped(structure, lambda path, _: by_path[path])

    stem, final_ln = viewed(w.stem), viewed(w.final_ln)
    layers = [viewed(lw) for lw in w.layers]
    if stem is None or final_ln is None or not layers or any(lw is None for lw in layers):
        return None
    return HostEncoder(library, stem, layers, final_ln, w.heads, w.scaling)
