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

With ``matmul_precision="bfloat16"`` (named by the user, :mod:`whisper_accel.config`) and a
kernel library that has ``GemmBF16`` (AVX512_BF16 CPUs), the convolutions' and linear layers'
products run there instead of numpy: x rounded to bfloat16 as it is read, the weights rounded
once into a packed bfloat16 copy (``PackBF16``; half the float32 weights' bytes, kept beside
them), products summed in float32. Everything else stays float32. :attr:`HostEncoder.precision`
says which ran and :attr:`HostEncoder.precision_note` why not bfloat16 when it was asked for.

The convolutions and matrix products sum in OpenBLAS's order, not oneDNN's: the output is
within ~1e-6 relative of the graphs' (the tests hold it to 1e-5, and to stock within 1e-4).
:func:`for_weights` refuses (None) a model whose encoder weights are not float32 host buffers it
can verify (a float16/bfloat16 model's are its float32 compute copy). Not thread-safe by
itself: its executor (:class:`whisper_accel.runtime.executors.host.HostEncoderExecutor`) calls
it under the engine's lock.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

from ..kernels import weights as W
from . import host_calls, kernel_checks
from .host_calls import Call

_F32 = np.float32
FLOAT32, BFLOAT16 = "float32", "bfloat16"


@dataclass(frozen=True)
class PackedLayer:
    """One encoder layer's matrices in ``PackBF16``'s bfloat16 layout."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    fc1: np.ndarray
    fc2: np.ndarray


@functools.lru_cache(maxsize=None)
def bf16_check(library: str) -> Optional[str]:
    """:func:`~.kernel_checks.check_bf16` of ``library``, once per process."""
    return kernel_checks.check_bf16(library)


def _product(enc: "HostEncoder", x: np.ndarray, w: np.ndarray, packed: Optional[np.ndarray],
             out: np.ndarray) -> Callable[[], None]:
    """``out = x w^T``: ``GemmBF16`` on ``packed`` when given, else numpy's float32 matmul."""
    if packed is not None:
        return Call(enc.lib.GemmBF16, [x, packed, out])
    wt = w.T
    return lambda: np.matmul(x, wt, out=out)


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
        # the convolutions' unfolded inputs: (frame, (input channel, tap)) rows
        self.unfold1 = zeros(batch * 2 * t, enc.conv_w[0].shape[1])
        self.unfold2 = zeros(batch * t, enc.conv_w[1].shape[1])
        p1, p2 = enc.packed_conv or (None, None)
        self.conv1_mm = _product(enc, self.unfold1, enc.conv_w[0], p1, self.conv1)
        self.conv2_mm = _product(enc, self.unfold2, enc.conv_w[1], p2, self.y)
        split = (batch, t, heads, d // heads)
        self.gelu1 = Call(enc.lib.BiasGelu, [self.conv1, enc.stem.conv1_b, self.conv1])
        self.gelu2 = Call(enc.lib.BiasGelu, [self.y, enc.stem.conv2_b, self.y])
        heads_of = [self.q.reshape(split), self.k.reshape(split), self.v.reshape(split)]
        self.layers = []
        for i, lw in enumerate(enc.layers):
            attn, ln1, ln2 = lw.attn, lw.ln1, lw.ln2
            pk = enc.packed[i] if enc.packed else None

            def mm(x, w, name, out):
                return _product(enc, x, w, getattr(pk, name) if pk else None, out)

            # q's bias and scaling, v's bias: in AttentionBias
            self.layers.append((Call(enc.lib.LayerNorm, [self.x, ln1.weight, ln1.bias, self.n]),
                                mm(self.n, attn.q_w, "q", self.q), mm(self.n, attn.k_w, "k", self.k),
                                mm(self.n, attn.v_w, "v", self.v),
                                Call(enc.lib.AttentionBias, [*heads_of, attn.q_b, attn.v_b, enc.scaling,
                                                             self.o.reshape(split)]),
                                mm(self.o, attn.o_w, "o", self.y),
                                Call(enc.lib.ResLayerNorm, [self.x, self.y, attn.o_b, ln2.weight, ln2.bias, self.x,
                                                            self.n]),
                                mm(self.n, lw.fc1_w, "fc1", self.f), Call(enc.lib.BiasGelu, [self.f, lw.fc1_b, self.f]),
                                mm(self.f, lw.fc2_w, "fc2", self.y),
                                Call(enc.lib.BiasResidual, [self.x, self.y, lw.fc2_b, self.x])))
        self.final = Call(enc.lib.LayerNorm, [self.x, enc.final_ln.weight, enc.final_ln.bias, self.n])


class HostEncoder:
    """One model's encoder weights as host views and the encoder's kernel calls."""

    def __init__(self, library: str, stem: W.Stem, layers, final_ln: W.LayerNorm, heads: int, scaling: float,
                 precision: str = FLOAT32):
        self.library, self.lib = library, ctypes.CDLL(library)
        self.stem = stem
        self.d, self.mels = int(stem.conv1_w.shape[0]), int(stem.conv1_w.shape[1])
        # (out, in, tap) as stored is (out, in x tap): the unfolded input's column order
        self.conv_w = (stem.conv1_w.reshape(self.d, -1), stem.conv2_w.reshape(self.d, -1))
        self.pos, self.layers, self.final_ln = stem.positions, layers, final_ln
        self.frames, self.ffn = int(self.pos.shape[0]), int(layers[0].fc1_w.shape[0])
        self.heads, self.scaling = heads, np.array([scaling], _F32)
        #: the products' precision (:data:`FLOAT32` / :data:`BFLOAT16`), and why not bfloat16
        #: when ``precision`` asked for it (None otherwise)
        self.precision, self.precision_note = FLOAT32, self._bf16_refused(precision)
        self.packed_conv: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self.packed: Optional[list] = None
        if precision == BFLOAT16 and self.precision_note is None:
            self.packed_conv = tuple(host_calls.pack_bf16(self.lib, w) for w in self.conv_w)
            self.packed = [PackedLayer(*(host_calls.pack_bf16(self.lib, w) for w in (
                lw.attn.q_w, lw.attn.k_w, lw.attn.v_w, lw.attn.o_w, lw.fc1_w, lw.fc2_w))) for lw in layers]
            self.precision = BFLOAT16
        self._buffers: Optional[_Buffers] = None
        #: encoder calls this object has run (tests and reports)
        self.calls = 0

    def _bf16_refused(self, precision: str) -> Optional[str]:
        if precision != BFLOAT16:
            return None
        if self.d % 16 or self.ffn % 16:
            return f"widths {self.d} / {self.ffn} are not multiples of 16 (GemmBF16's columns)"
        why = bf16_check(self.library)
        return None if why is None else f"bfloat16 products: {why}"

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
        # conv1: every frame's (mel, tap) window, the time axis padded by one on each side
        padded = np.pad(np.asarray(feats, _F32), ((0, 0), (0, 0), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, 3, axis=2)  # (B, mels, 2t, 3)
        buf.unfold1.reshape(batch, 2 * t, self.mels, 3)[...] = windows.transpose(0, 2, 1, 3)
        buf.conv1_mm()
        buf.gelu1()
        # conv2, stride 2, on the channels-last conv1 output: frame j reads frames 2j-1 .. 2j+1
        padded = np.pad(buf.conv1.reshape(batch, 2 * t, self.d), ((0, 0), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, 3, axis=1)[:, ::2][:, :t]  # (B, t, d, 3)
        buf.unfold2.reshape(batch, t, self.d, 3)[...] = windows
        buf.conv2_mm()
        buf.gelu2()
        np.add(buf.y.reshape(batch, t, self.d), self.pos, out=buf.x.reshape(batch, t, self.d))
        for step in buf.layers:
            for call in step:
                call()
        buf.final()
        self.calls += 1
        return buf.n.reshape(batch, t, self.d).copy()


def for_weights(w, library: str, precision: str = FLOAT32) -> Optional[HostEncoder]:
    """A :class:`HostEncoder` for ``w`` (:class:`~.arranged.EncoderWeights`) on the kernel
    ``library`` with products in ``precision`` where it can, or None when a weight is not a
    float32 host buffer whose view reads the tensor's values."""

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
    return HostEncoder(library, stem, layers, final_ln, w.heads, w.scaling, precision)
