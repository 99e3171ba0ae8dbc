"""The weight schema: one Whisper model's weights as named, frozen structures.

Pure Python (no MindSpore): the lowest layer, so the graphs, the runtime and the checks all
import it.

Every reader of the weights -- the ``mindspore.jit`` graphs (:mod:`whisper_accel.kernels.graphs`,
:mod:`whisper_accel.kernels.fused`), the host executors (:mod:`whisper_accel.runtime.host_encoder`,
:mod:`whisper_accel.runtime.host_step`), the kernel checks
(:mod:`whisper_accel.runtime.kernel_checks`) and the C++ kernels' argument lists -- goes through the names here, never through positions of its own:

* :class:`Stem`, :class:`EncoderLayer`, :class:`DecoderLayer`, :class:`CrossKV` (a decoder
  layer's cross-attention K/V projections), :class:`Vocabulary`; their parts
  :class:`LayerNorm`, :class:`SelfAttention`, :class:`CrossAttention`.
* A graph takes a structure as a plain tuple in field order (:func:`as_tuple`; a MindSpore
  graph cannot take a dataclass) and reads it with :func:`slots`' named indices, resolved
  when the graph is traced.
* :data:`DECODER_LAYER_ARGS` is the ``DecoderLayer`` kernel's argument order, by name;
  :func:`kernel_args` builds an argument list from it. ``fused.cc`` exports the same list
  (``ArgNames``) and :func:`whisper_accel.runtime.kernel_checks.check_signature` compares the
  two before the kernels are used.

A field marked ``matrix`` is a weight matrix: the host steps read a half-precision model's
matrices as stored (:func:`matrix_paths`), everything else in float32.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from types import SimpleNamespace
from typing import Any, Callable, Dict, Tuple

_M = {"matrix": True}


@dataclass(frozen=True)
class LayerNorm:
    weight: Any
    bias: Any


@dataclass(frozen=True)
class SelfAttention:
    """q = (x Wq^T + bq) * scaling, k = x Wk^T (no bias), v = x Wv^T + bv, out = o Wo^T + bo."""

    q_w: Any = field(metadata=_M)
    q_b: Any
    k_w: Any = field(metadata=_M)
    v_w: Any = field(metadata=_M)
    v_b: Any
    o_w: Any = field(metadata=_M)
    o_b: Any


@dataclass(frozen=True)
class CrossAttention:
    """The decoder's cross-attention less its K/V projections (:class:`CrossKV`)."""

    q_w: Any = field(metadata=_M)
    q_b: Any
    o_w: Any = field(metadata=_M)
    o_b: Any


@dataclass(frozen=True)
class CrossKV:
    """A decoder layer's cross-attention K (no bias) and V projections of the encoder output."""

    k_w: Any = field(metadata=_M)
    v_w: Any = field(metadata=_M)
    v_b: Any


@dataclass(frozen=True)
class Stem:
    """conv1 (kernel 3, stride 1) and conv2 (kernel 3, stride 2), GELU after each, then the
    positions added."""

    conv1_w: Any = field(metadata=_M)
    conv1_b: Any
    conv2_w: Any = field(metadata=_M)
    conv2_b: Any
    positions: Any


@dataclass(frozen=True)
class EncoderLayer:
    ln1: LayerNorm
    attn: SelfAttention
    ln2: LayerNorm
    fc1_w: Any = field(metadata=_M)
    fc1_b: Any
    fc2_w: Any = field(metadata=_M)
    fc2_b: Any


@dataclass(frozen=True)
class DecoderLayer:
    ln1: LayerNorm
    attn: SelfAttention
    ln2: LayerNorm
    cross: CrossAttention
    ln3: LayerNorm
    fc1_w: Any = field(metadata=_M)
    fc1_b: Any
    fc2_w: Any = field(metadata=_M)
    fc2_b: Any


@dataclass(frozen=True)
class Vocabulary:
    """Token embedding, decoder positions, the decoder's final norm and the vocabulary
    projection (the embedding itself when tied)."""

    embed: Any
    positions: Any
    final_ln: LayerNorm
    proj: Any


def as_tuple(obj) -> Tuple:
    """A structure as nested plain tuples in field order (what the graphs take)."""
    return tuple(as_tuple(v) if is_dataclass(v) else v for v in (getattr(obj, f.name) for f in fields(obj)))


def slots(cls) -> SimpleNamespace:
    """Field name -> index in :func:`as_tuple`'s order (nested structures: their own
    :func:`slots`)."""
    return SimpleNamespace(**{f.name: i for i, f in enumerate(fields(cls))})


@functools.lru_cache(maxsize=None)
def _names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@functools.lru_cache(maxsize=None)
def index_path(cls, path: str) -> Tuple[int, ...]:
    """``"attn.q_w"`` -> (1, 0) for :class:`DecoderLayer`: where a dotted field sits in the
    tuple form. (Cached: the host steps look up every kernel argument when they plan a step.)"""
    out = []
    for name in path.split("."):
        i = _names(cls).index(name)
        out.append(i)
        cls = _type_of(cls, name)
    return tuple(out)


def get(obj, cls, path: str):
    """The field at dotted ``path`` of ``obj``, a ``cls`` structure or its tuple form."""
    for i in index_path(cls, path):
        obj = obj[i] if isinstance(obj, tuple) else getattr(obj, _names(type(obj))[i])
    return obj


def leaf_paths(cls, prefix: str = "") -> Tuple[str, ...]:
    """Every leaf field as a dotted path, in tuple order."""
    out = []
    for f in fields(cls):
        sub = _type_of(cls, f.name)
        out.extend(leaf_paths(sub, prefix + f.name + ".") if sub is not None else (prefix + f.name,))
    return tuple(out)


def matrix_paths(cls) -> Tuple[str, ...]:
    """The dotted paths of the weight matrices (fields marked ``matrix``)."""
    out = []
    for f in fields(cls):
        sub = _type_of(cls, f.name)
        if sub is not None:
            out.extend(f"{f.name}.{p}" for p in matrix_paths(sub))
        elif f.metadata.get("matrix"):
            out.append(f.name)
    return tuple(out)


def mapped(obj, fn: Callable[[str, Any], Any], prefix: str = ""):
    """A copy of structure ``obj`` with every leaf ``v`` at dotted path ``p`` replaced by
    ``fn(p, v)``."""
    values = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        values[f.name] = mapped(v, fn, prefix + f.name + ".") if is_dataclass(v) else fn(prefix + f.name, v)
    return type(obj)(**values)


@functools.lru_cache(maxsize=None)
def _nested(cls) -> Dict[str, Any]:
    """Field name -> its structure class, for the fields that are structures (read from the
    annotations: the schema is written once, in the classes)."""
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if is_dataclass(hint)}


def _type_of(cls, name: str):
    return _nested(cls).get(name)


#: The ``DecoderLayer`` kernel's inputs, in order: names of :class:`DecoderLayer` fields
#: (dotted), or of the step's state: ``x`` (R, D) the rows' hidden states, ``k_cache`` /
#: ``v_cache`` (R, H, S, Dh), ``positions`` (1,) int32 the slot written, ``key_ok`` (1 or R, S)
#: float 1/0 the attendable slots, ``k_x`` (B, H, Dh, S_enc) / ``v_x`` (B, H, S_enc, Dh) the
#: cross K^T/V (R / B rows share one), ``scaling`` (1,) the attention scaling.
DECODER_LAYER_ARGS: Tuple[str, ...] = (
    "x", "ln1.weight", "ln1.bias", "attn.q_w", "attn.q_b", "attn.k_w", "attn.v_w", "attn.v_b", "attn.o_w", "attn.o_b",
    "k_cache", "v_cache", "positions", "key_ok", "ln2.weight", "ln2.bias", "cross.q_w", "cross.q_b", "cross.o_w",
    "cross.o_b", "k_x", "v_x", "ln3.weight", "ln3.bias", "fc1_w", "fc1_b", "fc2_w", "fc2_b", "scaling")
#: Its outputs: the rows' new hidden states (R, D) and this step's K and V (R, H, 1, Dh).
DECODER_LAYER_OUTS: Tuple[str, ...] = ("x_out", "k_new", "v_new")
#: The state arguments of :data:`DECODER_LAYER_ARGS` (the rest are weights).
DECODER_LAYER_STATE = frozenset({"x", "k_cache", "v_cache", "positions", "key_ok", "k_x", "v_x", "scaling"})


def kernel_args(layer, state: Dict[str, Any], names: Tuple[str, ...] = DECODER_LAYER_ARGS,
                cls=DecoderLayer) -> list:
    """The kernel's argument list: each name from ``state`` when it is a state argument, else
    the ``layer`` field (a ``cls`` structure or its tuple form) at that dotted path."""
    return [state[n] if n in state else get(layer, cls, n) for n in names]


def matrix_args(names: Tuple[str, ...] = DECODER_LAYER_ARGS, cls=DecoderLayer) -> Tuple[int, ...]:
    """Positions in ``names`` of the weight matrices (for checks that lower them to half)."""
    paths = set(matrix_paths(cls))
    return tuple(i for i, n in enumerate(names) if n in paths)


# ------------------------------------------------------------------ arranging a module's weights

def encoder_layer(layer, t) -> EncoderLayer:
    """A ``WhisperEncoderLayer``'s weights, each through ``t``."""
    a = layer.self_attn
    return EncoderLayer(LayerNorm(t(layer.self_attn_layer_norm.weight), t(layer.self_attn_layer_norm.bias)),
                        _self_attention(a, t, t),
                        LayerNorm(t(layer.final_layer_norm.weight), t(layer.final_layer_norm.bias)),
                        t(layer.fc1.weight), t(layer.fc1.bias), t(layer.fc2.weight), t(layer.fc2.bias))


def stem(encoder, t) -> Stem:
    return Stem(t(encoder.conv1.weight), t(encoder.conv1.bias), t(encoder.conv2.weight), t(encoder.conv2.bias),
                t(encoder.embed_positions.weight))


def decoder_layer(layer, matrix, vector) -> DecoderLayer:
    """A ``WhisperDecoderLayer``'s weights: the matrices through ``matrix``, the rest through
    ``vector``."""
    sa, ca = layer.self_attn, layer.encoder_attn
    ln = lambda m: LayerNorm(vector(m.weight), vector(m.bias))  # noqa: E731
    return DecoderLayer(ln(layer.self_attn_layer_norm), _self_attention(sa, matrix, vector),
                        ln(layer.encoder_attn_layer_norm),
                        CrossAttention(matrix(ca.q_proj.weight), vector(ca.q_proj.bias), matrix(ca.out_proj.weight),
                                       vector(ca.out_proj.bias)),
                        ln(layer.final_layer_norm), matrix(layer.fc1.weight), vector(layer.fc1.bias),
                        matrix(layer.fc2.weight), vector(layer.fc2.bias))


def cross_kv(layer, t) -> CrossKV:
    a = layer.encoder_attn
    return CrossKV(t(a.k_proj.weight), t(a.v_proj.weight), t(a.v_proj.bias))


def _self_attention(a, matrix, vector) -> SelfAttention:
    return SelfAttention(matrix(a.q_proj.weight), vector(a.q_proj.bias), matrix(a.k_proj.weight),
                         matrix(a.v_proj.weight), vector(a.v_proj.bias), matrix(a.out_proj.weight),
                         vector(a.out_proj.bias))
