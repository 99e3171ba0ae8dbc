"""One model's weights arranged once for every executor: :class:`EncoderWeights` and
:class:`DecoderWeights`, in the schema of :mod:`whisper_accel.kernels.weights`.

A float32 model's weights are detached *views* (no copies). A float16/bfloat16 model's are
copied to float32 once for the graphs, which compute in float32 (MindSpore CPU lacks bf16
Conv2D and mixes f16/f32 in Dense); its decoder's float32 copy is made only when a step graph
first needs it (:attr:`DecoderWeights.layers`): the host steps read the matrices as stored
(:attr:`DecoderWeights.stored`). The arrangement is kept while :func:`fingerprint` of the
parameters holds (same objects, dtypes, buffers): mindtorch's in-place updates give a parameter
a new buffer, so its address changes; the views (or, for half precision, the kept detached
originals) hold the old buffers alive, so an address cannot come back while captured.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import mindspore as ms
from mindspore import ops

from ..kernels import weights as W

#: Parameter dtypes the engines accept (they compute in float32).
MODEL_DTYPES = (ms.float32, ms.float16, ms.bfloat16)


def compute(p):
    """A weight as the graphs take it: a detached float32 tensor (a view when it is float32).
    Graph args must be plain tensors: a mindtorch Parameter fails with "Parameter[i] has no
    default param"."""
    t = p.detach()
    return t if t.dtype == ms.float32 else ops.cast(t, ms.float32)


def stored(p):
    """A weight as stored, detached (no copy)."""
    return p.detach()


def buffer(p) -> int:
    """A parameter's buffer address: MindSpore's ``_data_ptr`` (~1 us), not mindtorch's
    ``data_ptr``, which first runs an operator and syncs with pending work."""
    raw = getattr(p, "_data_ptr", None)
    return raw() if raw is not None else p.data_ptr()


def fingerprint(params) -> Tuple:
    """Identity, dtype and buffer address of every parameter: changes when weights are
    replaced, cast, or updated in place."""
    return tuple((id(p), p.dtype, buffer(p)) for p in params)


def unchanged(print_, params) -> bool:
    """``params`` still have fingerprint ``print_``. Identities and dtypes are compared first:
    a parameter that replaced another may hold host data only, whose address is not asked."""
    if len(print_) != len(params) or any(f[0] != id(p) or f[1] != p.dtype for f, p in zip(print_, params)):
        return False
    return all(f[2] == buffer(p) for f, p in zip(print_, params))


def materialize(params) -> None:
    """A parameter read from a checkpoint holds host data only until an operator reads it: it
    has no buffer address yet (MindSpore logs an error for each one asked), and the first graph
    launched on it gives it one, which would change the fingerprint and rebuild the engine on
    the next call. A one-element slice of each (no copy: it reads the data where it is) gives
    every parameter its buffer before the fingerprint is taken."""
    for p in params:
        shape = tuple(p.shape)
        if shape and all(d > 0 for d in shape):
            ops.slice(p, (0,) * len(shape), (1,) * len(shape))


def decoder_params(model) -> Tuple:
    """What the decoder reads of a WhisperForConditionalGeneration: the decoder's parameters
    and the vocabulary projection."""
    return tuple(model.model.decoder.parameters()) + (model.proj_out.weight,)


def _mutable(structure):
    # Tensors inside tuple args are graph *constants* unless marked mutable: without it every
    # weight is baked into the graph and re-validated on each call.
    return ms.mutable(W.as_tuple(structure))


class _Arranged:
    def __init__(self, dtype, params):
        if dtype not in MODEL_DTYPES:
            raise TypeError(f"whisper_accel's engines support {MODEL_DTYPES}, not {dtype}")
        #: the parameters' dtype (the compute dtype is float32)
        self.model_dtype = dtype
        self.dtype = ms.float32
        params = tuple(params)
        materialize(params)
        self.fingerprint = fingerprint(params)
        # Half precision: the compute copies do not hold the parameters' buffers; these views
        # do, so a buffer address seen in the fingerprint cannot be reused while this lives.
        self._keep = tuple(p.detach() for p in params) if dtype != ms.float32 else ()


class EncoderWeights(_Arranged):
    """A ``WhisperEncoder``'s weights: :attr:`stem`, :attr:`layers`, :attr:`final_ln` (float32
    views or copies), their graph tuples (``*_graph``) and the dimensions."""

    def __init__(self, encoder):
        super().__init__(encoder.embed_positions.weight.dtype, encoder.parameters())
        cfg = encoder.config
        self.heads = int(cfg.encoder_attention_heads)
        self.d_model, self.ffn = int(cfg.d_model), int(cfg.encoder_ffn_dim)
        self.scaling = float((self.d_model // self.heads) ** -0.5)
        self.mels = int(encoder.conv1.in_channels)
        self.stem = W.stem(encoder, compute)
        self.layers = tuple(W.encoder_layer(l, compute) for l in encoder.layers)
        self.final_ln = W.LayerNorm(compute(encoder.layer_norm.weight), compute(encoder.layer_norm.bias))
        self.positions = int(self.stem.positions.shape[0])
        self.stem_graph = _mutable(self.stem)
        self.layers_graph = tuple(_mutable(l) for l in self.layers)
        self.final_graph = _mutable(self.final_ln)

    def dims(self) -> Tuple:
        """What a timing verdict for this encoder depends on besides the input's shape."""
        return (len(self.layers), self.d_model, self.ffn, self.heads, self.mels, self.positions, str(self.model_dtype))

    def matches(self, encoder) -> bool:
        return unchanged(self.fingerprint, tuple(encoder.parameters()))


class DecoderWeights(_Arranged):
    """A ``WhisperForConditionalGeneration``'s decoder and vocabulary projection:
    :attr:`vocab`, :attr:`layers` (the step graphs' float32 weights), :attr:`stored` (the
    host steps': matrices as stored), :attr:`cross` (each layer's cross K/V projections), their
    graph tuples and the dimensions."""

    def __init__(self, model):
        decoder, proj_weight = model.model.decoder, model.proj_out.weight
        super().__init__(decoder.embed_positions.weight.dtype, decoder_params(model))
        cfg = decoder.config
        self.heads = int(cfg.decoder_attention_heads)
        self.scaling = float((cfg.d_model // self.heads) ** -0.5)
        embed = compute(decoder.embed_tokens.weight)
        tied = proj_weight is decoder.embed_tokens.weight
        self.vocab = W.Vocabulary(embed, compute(decoder.embed_positions.weight),
                                  W.LayerNorm(compute(decoder.layer_norm.weight), compute(decoder.layer_norm.bias)),
                                  embed if tied else compute(proj_weight))
        self.final_graph = _mutable(self.vocab.final_ln)
        modules = tuple(decoder.layers)
        self.n_layers = len(modules)
        self._modules = modules
        self._layers: Optional[Tuple[W.DecoderLayer, ...]] = None
        self._layers_graph = None
        if self.model_dtype == ms.float32:
            self._build_layers()
        #: per decoder layer what the host steps read: the matrices as stored, the rest float32
        self.stored: Tuple[W.DecoderLayer, ...] = self._layers if self._layers is not None else tuple(
            W.decoder_layer(l, stored, compute) for l in modules)
        #: a half-precision model's vocabulary projection as stored (None: float32)
        self.proj_stored = None
        if self.model_dtype != ms.float32:
            self.proj_stored = (decoder.embed_tokens.weight if tied else proj_weight).detach()
        self.cross = tuple(W.cross_kv(l, compute) for l in modules)
        self.cross_graph = tuple(_mutable(c) for c in self.cross)
        self.cross_flat = ms.mutable(tuple(w for c in self.cross for w in W.as_tuple(c)))  # CrossKV's arguments
        self.max_positions = int(self.vocab.positions.shape[0])
        self.head_dim = int(embed.shape[1]) // self.heads
        self.vocab_size = int(self.vocab.proj.shape[0])

    def _build_layers(self):
        self._layers = tuple(W.decoder_layer(l, compute, compute) for l in self._modules)
        self._layers_graph = ms.mutable(tuple(_mutable(l) for l in self._layers))

    @property
    def layers(self) -> Tuple[W.DecoderLayer, ...]:
        """The step graphs' float32 weights; for a half-precision model built on first use (two
        threads racing here may each build it; one result is kept)."""
        if self._layers is None:
            self._build_layers()
        return self._layers

    @property
    def layers_graph(self) -> Any:
        """:attr:`layers` as the step graphs take them (built with them)."""
        if self._layers is None:
            self._build_layers()
        return self._layers_graph

    @property
    def copy_built(self) -> bool:
        """Whether the step graphs' float32 weights exist (always for a float32 model, whose
        are views; for a half-precision one only once a step graph has run)."""
        return self._layers is not None

    def matches(self, model) -> bool:
        return unchanged(self.fingerprint, decoder_params(model))
