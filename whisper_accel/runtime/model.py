"""The compiled Whisper model: one model's weights arranged for the ``mindspore.jit`` graphs,
and the launches that use them.

Why: in PyNative every CPU op pays ~1-5 ms of dispatch, and ``linear`` against the
51865-row vocabulary matrix pays ~150 ms (it transposes the weight on every call). Inside one
``mindspore.jit`` graph the same ops cost ~0.1 ms each and ``MatMul(transpose_b=True)`` reads
the weight as stored. See ``benchmarks/PROFILE_NOTES.md`` for the numbers.

:class:`CompiledWhisper` holds detached *views* of a float32 model's weights (no copies) and
one float32 compute copy of a float16/bfloat16 model's. It is built once per module and kept
(:mod:`whisper_accel.runtime.binding`) while :meth:`CompiledWhisper.matches` holds: the same
parameter objects, dtypes and buffers. mindtorch's in-place updates (``param.add_``,
``copy_``, ``load_state_dict``) give a parameter a new buffer, so its ``data_ptr`` changes; the
captured views (or, for half precision, the kept detached originals) hold the old buffers alive,
so an address cannot come back while captured. It exposes:

* :meth:`encode` -- conv1/conv2/positions, every layer, final norm: with the fused kernels, as
  many layers per graph launch as :data:`GROUP_BYTES` allows (:func:`layers_per_launch`;
  the whole encoder in one graph up to base), else one launch per layer; one graph for all with
  :data:`WHOLE_ENCODER_GRAPH`. Where the fused graphs would take several launches, on the host
  instead (:mod:`.host_encoder`, :data:`HOST_ENCODER`).
* :meth:`cross_kv` -- cross-attention K/V of every decoder layer, once per encoder output.
* :meth:`new_cache` / :meth:`decode_step` -- all decoder layers + final norm + vocab
  projection on a static-shape self-attention KV cache of ``bucket`` positions;
  :meth:`decode_next` the same for greedy search, with the suppression mask and argmax in-graph;
  :meth:`decode_beams` for beam search. With the fused kernels, their one-token steps run on the
  host instead (:mod:`.host_step`, :data:`HOST_STEP`), the cache then in numpy.

The graphs themselves are in :mod:`whisper_accel.kernels.graphs`. MindSpore's jit cache keys
them on argument shapes/dtypes (one graph per (batch, tokens-per-step, bucket) for the decoder,
per (batch, frames) for the encoder); :attr:`CompiledWhisper.compiled_shapes` records the keys
seen, for reports.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Tuple

import mindspore as ms
import numpy as np
from mindspore import ops

from ..kernels import graphs as G
from . import host_encoder, host_step, native

#: Static self-attention cache sizes; a generation uses the smallest that fits.
BUCKETS = (64, 128, 256, 448)

#: One lock for all instances: graph launches from several threads are serialised (whether
#: concurrent launches of the same jit function are safe in MindSpore 2.7 is not established).
_GRAPH_LOCK = threading.Lock()
_COLS: Dict[int, Any] = {}  # bucket size -> arange(bucket) int32
_EVERY: Dict[int, Any] = {}  # bucket size -> (1, bucket) all-True bool: no padding

#: One-token greedy and beam steps on the host (:mod:`.host_step`: the fused kernels through
#: ctypes, no graph) where they can run; False: always the step graphs (benchmarks compare them).
HOST_STEP = True

#: The encoder on the host (:mod:`.host_encoder`: numpy's GEMM and the fused kernels through
#: ctypes, no graph). "auto" (default): where it can run and the fused graphs would split the
#: layers over several launches (:func:`layers_per_launch`; large-v3: 16 launches, the host
#: encoder measured 0.83x their time; tiny and base run as one graph, 1.17x / 1.06x on the host:
#: PROFILE_NOTES section 29). True: wherever it can run. False: always the graphs.
HOST_ENCODER = "auto"

#: Speed/memory trade-off of :meth:`CompiledWhisper.encode`'s graphs. True: the whole encoder in one
#: graph, whichever kernels run (with MindSpore's own attention that holds every layer's
#: (B, H, T, T) scores: tiny ~+380 MB resident). False (default): see GROUP_BYTES.
WHOLE_ENCODER_GRAPH = False

#: Resident memory the fused encoder may spend on holding more than one layer's intermediates
#: per graph launch (a MindSpore CPU graph keeps a buffer per intermediate tensor). Each launch
#: boundary costs ~15 ms on a 2-core CPU (MindSpore's dispatch thread spins meanwhile), so tiny
#: and base run as one graph (~+50 / +130 MB), large-v3 two layers a launch. 0: one layer a
#: launch. The plain graphs (no fused kernels: they write every layer's attention scores out)
#: always run one layer a launch. See benchmarks/PROFILE_NOTES.md section 19.
GROUP_BYTES = 256 << 20


def layers_per_launch(n_layers: int, layer_bytes: int, budget: int = None) -> int:
    """The largest divisor ``g`` of ``n_layers`` whose extra ``g - 1`` layers of intermediates,
    ``layer_bytes`` each, fit ``budget`` bytes (default :data:`GROUP_BYTES`)."""
    budget = GROUP_BYTES if budget is None else budget
    return max(g for g in range(1, n_layers + 1) if n_layers % g == 0 and (g - 1) * layer_bytes <= budget)


def encoder_layer_bytes(batch: int, frames: int, d_model: int, ffn: int) -> int:
    """Estimated intermediates of one fused encoder layer: float32 ``batch x frames x (6 d_model
    + 2 ffn)`` (measured: 0.6-0.8x of it on tiny and base)."""
    return 4 * batch * frames * (6 * d_model + 2 * ffn)


def _t(p):
    # Graph args must be plain tensors: a mindtorch Parameter fails with "Parameter[i] has no
    # default param". ``detach()`` shares the buffer (no copy) -- but an in-place update of the
    # parameter later gives the parameter a new buffer: ``matches`` sees that and the binding
    # rebuilds. float16/bfloat16 weights are copied to float32: the graphs compute in float32
    # (MindSpore CPU lacks bf16 Conv2D and mixes f16/f32 in Dense; see CompiledWhisper).
    t = p.detach()
    return t if t.dtype == ms.float32 else ops.cast(t, ms.float32)


def _lin(m, bias=True):
    return (_t(m.weight), _t(m.bias)) if bias else (_t(m.weight),)


def _ln_p(m):
    return (_t(m.weight), _t(m.bias))


#: Parameter dtypes the graphs accept. They always compute in float32: float16/bfloat16 weights
#: are upcast once per build (one float32 copy, kept while the weights do not change), inputs are
#: upcast and outputs cast back by the glue.
MODEL_DTYPES = (ms.float32, ms.float16, ms.bfloat16)


class CompiledWhisper:
    """Weights of one Whisper model arranged for the compiled graphs (references, not copies,
    for float32 models; float32 copies for float16/bfloat16 ones).

    Either half may be absent: ``encoder=None`` gives a decoder-only object and vice versa
    (:meth:`from_encoder` / :meth:`from_model`: the encoder and the decoder each have theirs, so
    no weight is arranged twice). :attr:`model_dtype` is the parameters' dtype; :attr:`dtype`
    (float32) the compute dtype.
    """

    def __init__(self, encoder=None, decoder=None, proj_weight=None, params=()):
        self.has_encoder, self.has_decoder = encoder is not None, decoder is not None
        first = (encoder if encoder is not None else decoder).embed_positions.weight
        self.model_dtype = first.dtype
        if self.model_dtype not in MODEL_DTYPES:
            raise TypeError(f"compiled graphs support {MODEL_DTYPES}, not {self.model_dtype}")
        if encoder is not None:
            cfg = encoder.config
            self.n_heads_enc = int(cfg.encoder_attention_heads)
            self.scaling_enc = float((cfg.d_model // self.n_heads_enc) ** -0.5)
            self.conv = ms.mutable((_t(encoder.conv1.weight), _t(encoder.conv1.bias),
                                    _t(encoder.conv2.weight), _t(encoder.conv2.bias)))
            self.enc_pos = _t(encoder.embed_positions.weight)
            # Tensors inside tuple args are graph *constants* unless marked mutable: without
            # it every weight is baked into the graph and re-validated on each call.
            self.enc_layers = tuple(ms.mutable(
                (_ln_p(l.self_attn_layer_norm), _attn(l.self_attn), _ln_p(l.final_layer_norm))
                + _lin(l.fc1) + _lin(l.fc2)) for l in encoder.layers)
            self.enc_ln = ms.mutable(_ln_p(encoder.layer_norm))
            self.enc_dims = (int(cfg.d_model), int(cfg.encoder_ffn_dim))
            self.dtype = self.enc_pos.dtype
        if decoder is not None:
            cfg = decoder.config
            self.n_heads_dec = int(cfg.decoder_attention_heads)
            self.scaling_dec = float((cfg.d_model // self.n_heads_dec) ** -0.5)
            self.embed = _t(decoder.embed_tokens.weight)
            tied = proj_weight is None or proj_weight is decoder.embed_tokens.weight
            self.proj = self.embed if tied else _t(proj_weight)
            self.dec_pos = _t(decoder.embed_positions.weight)
            layers = tuple(decoder.layers)
            self.n_dec_layers = len(layers)
            # The step graphs' weights: views of a float32 model's; for a float16/bfloat16 model a
            # float32 copy, built the first time a step graph needs it (:attr:`dec_layers`): the
            # host steps read its matrices as stored (:attr:`dec_host`), so while they run, the
            # copy (large-v3: 2.9 GB) is never made.
            self._arrange_dec = lambda: ms.mutable(tuple(_dec_layer(l, _t) for l in layers))
            self._dec_graph = self._arrange_dec() if self.model_dtype == ms.float32 else None
            #: per decoder layer, what the host steps read, in the graphs' order: the weight
            #: matrices as stored (a float32 model: :attr:`dec_layers` itself), the rest float32
            self.dec_host = self._dec_graph if self._dec_graph is not None else tuple(
                _dec_layer(l, _stored) for l in layers)
            self.xattn = tuple(ms.mutable(
                _lin(l.encoder_attn.k_proj, False) + _lin(l.encoder_attn.v_proj)) for l in decoder.layers)
            self.xattn_flat = ms.mutable(tuple(w for p in self.xattn for w in p))  # CrossKV's arguments
            self.dec_ln = ms.mutable(_ln_p(decoder.layer_norm))
            #: a half-precision model's vocabulary projection as stored (detached: no copy), for
            #: the host steps (None: float32)
            self.proj_half = None
            if self.model_dtype != ms.float32:
                self.proj_half = (decoder.embed_tokens.weight if tied else proj_weight).detach()
            self.max_positions = int(self.dec_pos.shape[0])
            self.head_dim = int(self.embed.shape[1]) // self.n_heads_dec
            self.dtype = self.embed.dtype
        params = tuple(params)
        self._fingerprint: Tuple = self.fingerprint(params)
        # Half precision: the compute copies do not hold the parameters' buffers; these views do,
        # so a buffer address seen in the fingerprint cannot be reused while this object lives.
        self._keep = tuple(p.detach() for p in params) if self.model_dtype != ms.float32 else ()
        self.compiled_shapes: List[Tuple] = []
        #: which encoder ran last: "host" (:mod:`.host_encoder`), "fused" (the graphs with
        #: :mod:`.native`'s kernels) or "mindspore"
        self.encoder_kernels = None
        self._host_enc = None  # the HostEncoder, once built (False: this model's weights cannot take it)
        #: how many encoder layers the last :meth:`encode` ran per graph launch
        self.encoder_layers_per_launch = None
        #: which step ran last: "host" (:mod:`.host_step`), "fused" (the graphs with the fused
        #: kernels) or "mindspore"
        self.decoder_kernels = None
        self._host = None  # the HostStep, once built (False: this model's weights cannot take it)
        #: which cross K/V ran last: "fused" (the ``CrossKV`` kernel) or "mindspore"
        self.cross_kernels = None
        self.lock = _GRAPH_LOCK

    @property
    def dec_layers(self):
        """Per decoder layer the step graphs' float32 weights (see :func:`_dec_layer`); for a
        half-precision model built on first use. Two threads racing here may each build it; one
        result is kept."""
        if self._dec_graph is None:
            self._dec_graph = self._arrange_dec()
        return self._dec_graph

    @property
    def decoder_copy_built(self) -> bool:
        """Whether the decoder's float32 weights for the step graphs exist (always for a float32
        model, whose are views; for a half-precision one only once a step graph has run)."""
        return self._dec_graph is not None

    @classmethod
    def from_model(cls, model) -> "CompiledWhisper":
        """WhisperForConditionalGeneration -> decoder + vocab projection (the encoder has its own)."""
        return cls(decoder=model.model.decoder, proj_weight=model.proj_out.weight,
                   params=decoder_params(model))

    @classmethod
    def from_encoder(cls, encoder) -> "CompiledWhisper":
        return cls(encoder=encoder, params=tuple(encoder.parameters()))

    @staticmethod
    def fingerprint(params) -> Tuple:
        """Identity, dtype and buffer address of every parameter: changes when weights are
        replaced, cast, or updated in place (mindtorch gives the parameter a new buffer).
        MindSpore's ``_data_ptr`` (~1 us), not mindtorch's ``data_ptr``, which first runs a
        ``dyn_shape`` operator (~0.2 ms a parameter, and a sync with pending work)."""
        return tuple((id(p), p.dtype, _buffer(p)) for p in params)

    def matches(self, module) -> bool:
        """True while ``module``'s weights are the very objects, dtypes and buffers captured."""
        params = decoder_params(module) if self.has_decoder else tuple(module.parameters())
        return self._fingerprint == self.fingerprint(params)

    def _note(self, key):
        if key not in self.compiled_shapes:
            self.compiled_shapes.append(key)

    def encode(self, input_features):
        """(B, n_mels, frames) -> (B, frames // 2, d_model). On the host (:mod:`.host_encoder`,
        :data:`HOST_ENCODER`) when the fused kernels are usable here and the weights can be read
        there, else the graphs with the fused element-wise kernels (:mod:`.native`); should
        either fail, the kernels are dropped for the process and the plain graphs run the call."""
        self._note(("encode",) + tuple(input_features.shape))
        with self.lock:
            out = self._host_encode(input_features)
            if out is not None:
                self.encoder_kernels = "host"
                return out
            self.encoder_kernels, out = _fused_or_plain(
                "encoder", lambda fused: self._encode(fused, input_features), lambda: self._encode(G, input_features))
        return out

    def _host_encode(self, input_features):
        """:meth:`encode` on the host, or None: off (:data:`HOST_ENCODER`), not usable here, or it
        failed (then the fused kernels are dropped for the process, as after a failing fused
        graph)."""
        if not HOST_ENCODER or native.fused_graphs() is None:
            return None
        if HOST_ENCODER == "auto" and self._layers_per_launch(input_features) == len(self.enc_layers):
            return None  # one graph launch for all layers: the graphs measured faster
        if self._host_enc is None:
            try:
                self._host_enc = host_encoder.for_model(self) or False
            except Exception:  # noqa: BLE001  (a weight it cannot read: the graphs)
                self._host_enc = False
        if self._host_enc is False or not self._host_enc.fits(tuple(input_features.shape)):
            return None
        try:
            return ms.Tensor(self._host_enc(input_features.asnumpy()))
        except Exception as exc:  # noqa: BLE001
            native.disable(f"a host encoder call failed: {exc!r}")
            return None

    def _layers_per_launch(self, input_features) -> int:
        """How many encoder layers one launch of the fused graphs takes for these features."""
        n = len(self.enc_layers)
        if WHOLE_ENCODER_GRAPH:
            return n
        batch, _, frames = input_features.shape
        return layers_per_launch(n, encoder_layer_bytes(int(batch), int(frames) // 2, *self.enc_dims))

    def _encode(self, graphs, input_features):
        n = len(self.enc_layers)
        if graphs is G and not WHOLE_ENCODER_GRAPH:  # MindSpore's attention writes each layer's scores out
            group = 1
        else:
            group = self._layers_per_launch(input_features)
        self.encoder_layers_per_launch = group
        if group == n:
            return graphs.encode_whole(input_features, self.conv, self.enc_pos, ms.mutable(self.enc_layers),
                                       self.enc_ln, self.n_heads_enc, self.scaling_enc)
        x = graphs.enc_stem(input_features, self.conv, self.enc_pos)
        for i in range(0, n, group):
            if group == 1:
                x = graphs.enc_layer(x, self.enc_layers[i], self.n_heads_enc, self.scaling_enc)
            else:
                x = graphs.enc_layers(x, ms.mutable(self.enc_layers[i:i + group]), self.n_heads_enc, self.scaling_enc)
        return graphs.enc_final(x, self.enc_ln)

    def cross_kv(self, encoder_hidden_states):
        """-> (K^T, V): per-layer tuples of (B, H, Dh, S_enc) and (B, H, S_enc, Dh). (Tuples, not one stacked tensor:
        indexing a stacked (L, ...) tensor inside the graph copies it, ~20 ms per layer.) With the fused kernels,
        every layer in one ``CrossKV`` launch (PROFILE_NOTES section 23); else one graph launch per layer: all
        layers in one MindSpore graph measured slower (section 19)."""
        with self.lock:
            self.cross_kernels, (ks, vs) = _fused_or_plain(
                "cross K/V", lambda fused: fused.cross_kv(encoder_hidden_states, self.xattn_flat, self.n_heads_dec),
                lambda: self._cross_kv(encoder_hidden_states))
        return ms.mutable(tuple(ks)), ms.mutable(tuple(vs))

    def _cross_kv(self, encoder_hidden_states):
        ks, vs = [], []
        for p in self.xattn:
            k, v = G.cross_kv(encoder_hidden_states, p, self.n_heads_dec)
            ks.append(k)
            vs.append(v)
        return ks, vs

    @staticmethod
    def bucket_for(length: int, max_positions: int = 448) -> int:
        for b in BUCKETS:
            if length <= b <= max_positions:
                return b
        return max_positions

    def new_cache(self, batch: int, bucket: int):
        """Empty self-attention cache: per-layer tuples of (B, H, bucket, Dh) zeros."""
        shape = (batch, self.n_heads_dec, bucket, self.head_dim)
        zeros = tuple(ops.zeros(shape, self.dtype) for _ in range(2 * self.n_dec_layers))
        return ms.mutable(zeros[::2]), ms.mutable(zeros[1::2])

    def grow_cache(self, k_cache, v_cache, bucket: int):
        """Zero-pad per-layer caches along the position axis to ``bucket`` slots."""
        if isinstance(k_cache, host_step.HostCache):
            return host_step.grow(k_cache, bucket), host_step.grow(v_cache, bucket)

        def pad(c):
            b, h, s, d = c.shape
            return ops.concat((c, ops.zeros((b, h, bucket - s, d), c.dtype)), 2)
        return ms.mutable(tuple(pad(c) for c in k_cache)), ms.mutable(tuple(pad(c) for c in v_cache))

    def decode_step(self, ids, pos0: int, k_cache, v_cache, k_x, v_x):
        """Run tokens ``ids`` (B, T) at positions pos0..pos0+T-1. Returns (logits (B,T,V), k_cache, v_cache)."""
        t, s = int(ids.shape[1]), int(k_cache[0].shape[2])
        self._note(("decode",) + tuple(ids.shape) + (s,))
        pos, cols, pos_ids, key_ok = self._positions(pos0, t, s)
        with self.lock:
            logits, k, v = G.decode(ids, pos, cols, k_cache, v_cache, k_x, v_x, self.embed, self.proj,
                                   self.dec_pos, self.dec_layers, self.dec_ln, self.n_heads_dec, self.scaling_dec,
                                   pos_ids, key_ok)
        return logits, ms.mutable(tuple(k)), ms.mutable(tuple(v))

    def decode_next(self, ids, pos0: int, k_cache, v_cache, k_x, v_x, suppress, cross=None, padding=None):
        """Greedy step for tokens ``ids`` (B, T) at pos0..: ``suppress`` is a (V,) bool Tensor of
        ids to set to -inf. Returns (next ids (B,), scores (B,V), logits (B,V), k_cache, v_cache).
        ``cross``: a list that receives this step's per-layer cross-attention probabilities.
        ``padding``: a :class:`whisper_accel.runtime.padding.DecoderPadding` (a decoder attention
        mask with padding), else None."""
        t, s = int(ids.shape[1]), int(k_cache[0].shape[2])
        self._note(("next",) + tuple(ids.shape) + (s,))
        out = self._try_host(ids, cross, padding, lambda: self._host_next(ids, pos0, k_cache, v_cache, k_x, v_x,
                                                                          suppress, padding))
        if out is not None:
            return out
        k_cache, v_cache = host_step.on_device(k_cache), host_step.on_device(v_cache)
        pos, cols, pos_ids, key_ok = self._positions(pos0, t, s, padding)
        args = (ids, pos, cols, k_cache, v_cache, k_x, v_x, self.embed, self.proj, self.dec_pos,
                self.dec_layers, self.dec_ln, self.n_heads_dec, self.scaling_dec, suppress, pos_ids, key_ok)
        with self.lock:
            if cross is None:
                nxt, scores, logits, k, v = self._step("decode_next", args)
            else:
                nxt, scores, logits, k, v, probs = self._step("decode_next_attn", args)
                cross.append(tuple(probs))
        return nxt, scores, logits, ms.mutable(tuple(k)), ms.mutable(tuple(v))

    def decode_beams(self, ids, pos0: int, k_cache, v_cache, beam_idx, k_x, v_x, beams: int, cross=None,
                     padding=None):
        """Beam step: reorder the caches by ``beam_idx`` (N,) int32, run ``ids`` (N, T) at
        pos0.., cross K/V shared by each audio's ``beams`` rows. Returns (logits (N,V) of the
        last position, their log-softmax, k_cache, v_cache). ``cross``: a list that receives
        this step's per-layer cross-attention probabilities (N,H,T,S). ``padding``: as for
        :meth:`decode_next` (beams of one audio share their padding, so reordering keeps it)."""
        t, s = int(ids.shape[1]), int(k_cache[0].shape[2])
        self._note(("beams",) + tuple(ids.shape) + (s, beams))
        out = self._try_host(ids, cross, padding, lambda: self._host_beams(ids, pos0, k_cache, v_cache, beam_idx,
                                                                           k_x, v_x, padding))
        if out is not None:
            return out
        k_cache, v_cache = host_step.on_device(k_cache), host_step.on_device(v_cache)
        pos, cols, pos_ids, key_ok = self._positions(pos0, t, s, padding)
        args = (ids, pos, cols, k_cache, v_cache, beam_idx, k_x, v_x, self.embed, self.proj, self.dec_pos,
                self.dec_layers, self.dec_ln, self.n_heads_dec, self.scaling_dec, beams, pos_ids, key_ok)
        with self.lock:
            if cross is None:
                logits, logp, k, v = self._step("decode_beams", args)
            else:
                logits, logp, k, v, probs = self._step("decode_beams_attn", args)
                cross.append(tuple(probs))
        return logits, logp, ms.mutable(tuple(k)), ms.mutable(tuple(v))

    def _try_host(self, ids, cross, padding, step):
        """``step()`` under the lock when this step may run on the host (at most
        ``host_step.MAX_TOKENS`` tokens and ``host_step.MAX_ROWS`` rows, no cross-attention
        probabilities asked, a prompt without padding), else None. A padded prompt's padding
        tokens attend to nothing: the graph computes their cache slots as stock does, a host
        step would not (never read, but returned with the cache)."""
        t = int(ids.shape[1])
        if (t > host_step.MAX_TOKENS or (t > 1 and padding is not None) or cross is not None or not HOST_STEP
                or int(ids.shape[0]) > host_step.MAX_ROWS):
            return None
        with self.lock:
            return step()

    def _host_ready(self) -> bool:
        if native.fused_graphs() is None:
            return False
        if self._host is None:
            try:
                self._host = host_step.for_model(self) or False
            except Exception:  # noqa: BLE001  (a weight it cannot read: the step graphs)
                self._host = False
        return self._host is not False

    def _host_run(self, run, ids, pos0, k_cache, v_cache, padding, order=None):
        """``run(ids (R, T), k, v, pos_ids, key_ok)`` on the host caches (rows reordered by
        ``order`` first, for beam search), or None: the host step is not usable here, or it
        failed (then the fused kernels are dropped for the process, as after a failing fused
        graph, and the graphs run the step)."""
        if not self._host_ready():
            return None
        try:
            k, v = host_step.on_host(k_cache), host_step.on_host(v_cache)
            if order is not None:
                k, v = host_step.reordered(k, order), host_step.reordered(v, order)
            s = int(k[0].shape[2])
            rows = ids.asnumpy().astype(np.int64)
            out = run(rows, k, v, None if padding is None else padding.positions(pos0, rows.shape[1]),
                      None if padding is None else padding.keys(s))
        except Exception as exc:  # noqa: BLE001
            native.disable(f"a host decoder step failed: {exc!r}")
            return None
        self.decoder_kernels = "host"
        return out + (k, v)

    def _host_next(self, ids, pos0, k_cache, v_cache, k_x, v_x, suppress, padding):
        """:meth:`decode_next` as a host step (None: the graphs run it)."""
        def run(rows, k, v, pos_ids, key_ok):
            nxt, scores, logits = self._host.next(rows, pos0, k, v, k_x, v_x, suppress, pos_ids, key_ok)
            return ms.Tensor(nxt), ms.Tensor(scores), ms.Tensor(logits)
        return self._host_run(run, ids, pos0, k_cache, v_cache, padding)

    def _host_beams(self, ids, pos0, k_cache, v_cache, beam_idx, k_x, v_x, padding):
        """:meth:`decode_beams` as a host step (None: the graphs run it). The log-softmax is
        MindSpore's, as in the graph (what stock beam search applies)."""
        order = beam_idx.asnumpy().astype(np.int64)

        def run(rows, k, v, pos_ids, key_ok):
            logits = ms.Tensor(self._host.logits(rows, pos0, k, v, k_x, v_x, pos_ids, key_ok))
            return logits, ops.log_softmax(logits, -1)
        return self._host_run(run, ids, pos0, k_cache, v_cache, padding, order)

    def _step(self, name: str, args):
        """Launch step graph ``name`` with the fused projection kernel when usable."""
        self.decoder_kernels, out = _fused_or_plain(
            "decoder", lambda fused: getattr(fused.DECODER, name)(*args), lambda: getattr(G.PLAIN, name)(*args))
        return out

    @staticmethod
    def _positions(pos0: int, t: int, s: int, padding=None):
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


def _fused_or_plain(what: str, fused_run, plain_run) -> Tuple[str, Any]:
    """``("fused", fused_run(kernels module))`` when the fused kernels are usable here
    (:mod:`.native`), else ``("mindspore", plain_run())``; should the fused graph fail, the
    kernels are dropped for the process and the plain one runs the call."""
    fused = native.fused_graphs()
    if fused is not None:
        try:
            return "fused", fused_run(fused)
        except Exception as exc:  # noqa: BLE001
            native.disable(f"a fused {what} graph failed: {exc!r}")
    return "mindspore", plain_run()


def _buffer(p) -> int:
    raw = getattr(p, "_data_ptr", None)
    return raw() if raw is not None else p.data_ptr()


def decoder_params(model) -> Tuple:
    """What the decoder graphs read of a WhisperForConditionalGeneration: the decoder's
    parameters and the vocabulary projection."""
    return tuple(model.model.decoder.parameters()) + (model.proj_out.weight,)


def _stored(p):
    """A weight as stored, detached (no copy; the host steps read half precision as it is)."""
    return p.detach()


def _dec_layer(l, matrix) -> Tuple:
    """One decoder layer's weights in the steps' order: (ln1, self-attention (q_w, q_b, k_w, v_w,
    v_b, o_w, o_b), ln2, cross-attention (q_w, q_b, o_w, o_b), ln3, fc1_w, fc1_b, fc2_w, fc2_b),
    the eight weight matrices through ``matrix``, the rest float32."""
    sa, ca = l.self_attn, l.encoder_attn
    return (_ln_p(l.self_attn_layer_norm),
            (matrix(sa.q_proj.weight), _t(sa.q_proj.bias), matrix(sa.k_proj.weight), matrix(sa.v_proj.weight),
             _t(sa.v_proj.bias), matrix(sa.out_proj.weight), _t(sa.out_proj.bias)),
            _ln_p(l.encoder_attn_layer_norm),
            (matrix(ca.q_proj.weight), _t(ca.q_proj.bias), matrix(ca.out_proj.weight), _t(ca.out_proj.bias)),
            _ln_p(l.final_layer_norm), matrix(l.fc1.weight), _t(l.fc1.bias), matrix(l.fc2.weight), _t(l.fc2.bias))


def _attn(a) -> Tuple:
    return _lin(a.q_proj) + _lin(a.k_proj, False) + _lin(a.v_proj) + _lin(a.out_proj)
