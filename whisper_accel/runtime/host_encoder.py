"""The encoder on the host: numpy's matrix multiply (its OpenBLAS) for the two convolutions and
every linear layer, the fused kernels through ``ctypes`` for the rest, no graph.

Why: inside a graph launch MindSpore's dispatch thread spins on one of the two cores while the
graph runs (PROFILE_NOTES section 19), so the graph's MatMuls and kernels share a core with it.
Run back to back from Python, the same kernels and a BLAS of the same speed took 0.82-0.84x the
fused graphs' time for two large-v3 layers and 0.77-0.96x for tiny's four, each in a process
of its own (PROFILE_NOTES section 29).

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
:func:`for_model` refuses (None) a model whose encoder weights are not float32 host buffers it
can verify (a float16/bfloat16 model's are its float32 compute copy). Not thread-safe by
itself: :class:`whisper_accel.runtime.model.CompiledWhisper` calls it under its lock.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import numpy as np

from . import host_calls, native
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
        self.gelu1 = Call(enc.lib.BiasGelu, [self.conv1, enc.conv[1], self.conv1])
        self.gelu2 = Call(enc.lib.BiasGelu, [self.y, enc.conv[3], self.y])
        heads_of = [self.q.reshape(split), self.k.reshape(split), self.v.reshape(split)]
        self.layers = []
        for (g1, b1), attn, (g2, b2), w1, c1, w2, c2 in enc.layers:
            _, bq, _, _, bv, _, _ = attn
            self.layers.append((Call(enc.lib.LayerNorm, [self.x, g1, b1, self.n]), attn,
                                Call(enc.lib.AttentionBias, [*heads_of, bq, bv, enc.scaling, self.o.reshape(split)]),
                                Call(enc.lib.ResLayerNorm, [self.x, self.y, attn[6], g2, b2, self.x, self.n]),
                                w1, Call(enc.lib.BiasGelu, [self.f, c1, self.f]), w2,
                                Call(enc.lib.BiasResidual, [self.x, self.y, c2, self.x])))
        self.final = Call(enc.lib.LayerNorm, [self.x, *enc.final_ln, self.n])


class HostEncoder:
    """One model's encoder weights as host views and the encoder's kernel calls."""

    def __init__(self, library: str, conv, pos, layers, final_ln, heads: int, scaling: float):
        self.lib = ctypes.CDLL(library)
        w1, b1, w2, b2 = conv
        self.d, self.mels = int(w1.shape[0]), int(w1.shape[1])
        # (out, in, tap) as stored is (out, in x tap): the unfolded input's column order
        self.conv = (w1.reshape(self.d, -1), b1, w2.reshape(self.d, -1), b2)
        self.pos, self.layers, self.final_ln = pos, layers, final_ln
        self.frames, self.ffn = int(pos.shape[0]), int(layers[0][3].shape[0])
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
        w1, _, w2, _ = self.conv
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
            wq, _, wk, wv, _, wo, _ = attn
            ln1()
            np.matmul(buf.n, wq.T, out=buf.q)  # q's bias and scaling, v's bias: in AttentionBias
            np.matmul(buf.n, wk.T, out=buf.k)
            np.matmul(buf.n, wv.T, out=buf.v)
            attention()
            np.matmul(buf.o, wo.T, out=buf.y)
            res_ln()
            np.matmul(buf.n, fc1.T, out=buf.f)
            gelu()
            np.matmul(buf.f, fc2.T, out=buf.y)
            residual()
        buf.final()
        self.calls += 1
        return buf.n.reshape(batch, t, self.d).copy()


def for_model(cw) -> Optional[HostEncoder]:
    """A :class:`HostEncoder` for the encoder of ``cw`` (a ``CompiledWhisper``), or None when the
    fused kernels are not usable here or a weight is not a float32 host buffer whose view reads
    the tensor's values."""
    library = native.state()["library"]
    if library is None:
        return None

    views = host_calls.views
    conv = views(cw.conv)
    rest = views((cw.enc_pos, *cw.enc_ln))
    layers = []
    for lw in cw.enc_layers:  # (ln1, attn (q_w, q_b, k_w, v_w, v_b, o_w, o_b), ln2, fc1_w, fc1_b, fc2_w, fc2_b)
        ln1, attn, ln2, tail = views(lw[0]), views(lw[1]), views(lw[2]), views(lw[3:])
        if None in (ln1, attn, ln2, tail):
            return None
        layers.append((tuple(ln1), tuple(attn), tuple(ln2), *tail))
    if conv is None or rest is None or not layers:
        return None
    pos, g, b = rest
    return HostEncoder(library, conv, pos, layers, (g, b), cw.n_heads_enc, cw.scaling_enc)
