"""The ``compiled`` group: route Whisper's encoder and per-token decoder through the compiled graphs.

Two replacement factories, each ``make_xxx_forward(original) -> new_forward`` with
``new_forward.__wrapped__ = original``:

* :func:`make_encoder_forward` replaces ``WhisperEncoder.forward``: conv stem, all layers and
  the final norm in one graph (:meth:`CompiledWhisper.encode`).
* :func:`whisper_accel.targets.decode_step.make_generation_forward` replaces ``WhisperForConditionalGeneration.forward`` (not
  ``WhisperDecoder.forward``: the 51865-wide vocab projection is the most expensive single op,
  so it belongs in the same graph). Decoder state lives in a static-shape KV cache (buckets of
  64/128/256/448 slots) attached to the ``EncoderDecoderCache`` object that ``generate`` threads
  through the steps; cross-attention K/V are computed once, on the first step.

Anything else takes the original code: training, labels, head masks, inputs_embeds,
position ids, a decoder attention mask, output_attentions / output_hidden_states,
use_cache=False, dtypes other than float32/float16/bfloat16 (half-precision models run the
graphs in float32 on upcast weight copies; outputs come back in the model's dtype), cache objects other than an (empty or ours)
``EncoderDecoderCache`` of ``DynamicCache``s, or a compile error (then the instance stops trying).
When code outside the forward needs the HF cache contents (``reorder_cache`` for beam search,
``crop``, ``batch_*``, ``to_legacy_cache``) the static cache is first *spilled* into the HF
cache, so the remaining steps run stock and stay correct.

The weight views are cached on the module instance (``_whisper_accel_compiled``). They are
detached views of the parameters; an in-place update (``load_state_dict``, ``param.add_``)
rebinds a parameter's buffer without changing its identity, which an identity/dtype check
cannot see. So with ``REFRESH_PER_CALL`` (default) the views are rebuilt at every encoder call
and at the first step of every generation (~10 ms for tiny, no recompilation: graphs are keyed
on shapes/dtypes); with it off they are rebuilt only when parameter identity/dtype changes.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Optional

import mindspore as ms
from mindspore import ops

from ..kernels.compiled import MODEL_DTYPES, CompiledWhisper
from .mindnlp05 import adopt

logger = logging.getLogger(__name__)

ATTR = "_whisper_accel_compiled"  # on the module: CompiledWhisper, or False after a failure
_build_lock = threading.Lock()
#: One process-wide re-entrant lock around every patched Whisper entry point (``generate``,
#: ``WhisperForConditionalGeneration.forward``, ``WhisperEncoder.forward``): MindSpore 2.7's
#: PyNative executor on CPU gives wrong results when several Python threads run operator
#: streams at once (seen up to 2.6e-4 relative on logits with 8 threads), so concurrent
#: inference is serialised rather than raced. Re-entrant: generate -> forward -> encoder.
INFERENCE_LOCK = threading.RLock()
REFRESH_PER_CALL = True


def _compiled_for(module, build) -> Optional[CompiledWhisper]:
    cw = module.__dict__.get(ATTR)
    if cw is False:
        return None
    if cw is None or REFRESH_PER_CALL or not cw.matches(module):
        with _build_lock:
            try:
                cw = build(module)
            except Exception as exc:  # unexpected module layout: stock from now on
                _disable(module, exc)
                return None
            module.__dict__[ATTR] = cw
    return cw


def _disable(module, exc) -> None:
    logger.warning("whisper_accel: compiled path disabled for this model: %s", exc)
    module.__dict__[ATTR] = False


def _graph_dtype(t, weight) -> bool:
    """``t`` may enter the graphs: float32/float16/bfloat16 and the dtype of the model's
    ``weight`` (a mismatch is left to stock code, which raises its own error)."""
    return getattr(t, "dtype", None) in MODEL_DTYPES and t.dtype == weight.dtype


def to_compute(t):
    """Input for the graphs: they compute in float32."""
    return t if t.dtype == ms.float32 else ops.cast(t, ms.float32)


def to_model(t, cw):
    """A graph output in the model's dtype, as stock code would return it."""
    return t if cw.model_dtype == ms.float32 else ops.cast(t, cw.model_dtype)


# ----------------------------------------------------------------------------------- encoder

def patches(env):
    """The ``compiled`` group's patches (CPU only: the graphs are validated there)."""
    from .._errors import Unsupported
    from .._patcher import Patch
    from .mindnlp05 import import_whisper

    if env.backend != "CPU":
        raise Unsupported(f"the compiled graphs are validated on CPU only, not {env.backend}")
    from .decode_step import make_generation_forward

    mw = import_whisper()
    return [
        Patch("compiled", mw.WhisperEncoder, "forward", serialised(make_encoder_forward),
              "whole encoder as one mindspore.jit graph"),
        Patch("compiled", mw.WhisperForConditionalGeneration, "forward",
              serialised(make_generation_forward),
              "decoder step + vocab projection as one graph on a static KV cache"),
        Patch("compiled", mw.WhisperForConditionalGeneration, "generate", serialised(None),
              "one inference at a time across threads (MindSpore CPU is not thread-safe)"),
    ]


def serialised(make):
    """A factory whose replacement holds :data:`INFERENCE_LOCK` around ``make(original)``
    (or around ``original`` itself when ``make`` is None)."""

    def factory(original):
        inner = original if make is None else make(original)

        @functools.wraps(original)
        def locked(*args, **kwargs):
            with INFERENCE_LOCK:
                return inner(*args, **kwargs)

        locked.__wrapped__ = original
        return locked

    return factory


def check_features(encoder, input_features, expected_frames: int) -> None:
    """Raise a clear error for features the encoder cannot take (stock raises MindSpore's
    operator errors, e.g. "For primitive[Conv2D], the x shape size must be equal to 4, but got
    3"). Same exception classes as stock for rank (ValueError) and dtype (TypeError); a wrong
    mel count, a RuntimeError in stock, is a ValueError here. The frame count is left to stock,
    whose message is already clear."""
    import mindspore

    if not isinstance(input_features, mindspore.Tensor):
        return
    mels, weight = int(encoder.conv1.in_channels), encoder.conv1.weight
    want = f"(batch, num_mel_bins={mels}, frames={expected_frames})"
    shape = tuple(input_features.shape)
    if len(shape) != 3:
        hint = " For one example, add the batch axis: features[None]." if len(shape) == 2 else ""
        raise ValueError(f"whisper_accel: Whisper input_features must be 3-D {want}; got shape {shape}.{hint}")
    if shape[1] != mels:
        raise ValueError(f"whisper_accel: Whisper input_features must be {want}; got {shape[1]} mel bins "
                         f"(shape {shape}). The feature extractor's feature_size must match the model's "
                         "num_mel_bins.")
    if input_features.dtype != weight.dtype:
        raise TypeError(f"whisper_accel: Whisper input_features must have the model's dtype {weight.dtype}; got "
                        f"{input_features.dtype}. Cast them: features.to(model.dtype).")


def make_encoder_forward(original):
    def new_forward(self, input_features, attention_mask=None, head_mask=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None):
        cfg = self.config
        oa = output_attentions if output_attentions is not None else cfg.output_attentions
        oh = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        expected = cfg.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        check_features(self, input_features, expected)
        if (self.training or head_mask is not None or oa or oh or getattr(input_features, "ndim", 0) != 3
                or input_features.shape[-1] != expected or not _graph_dtype(input_features, self.conv1.weight)):
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)
        cw = _compiled_for(self, CompiledWhisper.from_encoder)
        if cw is None or cw.model_dtype != input_features.dtype:
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)
        try:
            hidden = adopt(to_model(cw.encode(to_compute(input_features)), cw), input_features)
        except Exception as exc:  # compile/shape problem: stock from now on
            _disable(self, exc)
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)
        if not (return_dict if return_dict is not None else cfg.use_return_dict):
            return (hidden,)
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput(last_hidden_state=hidden)

    new_forward.__wrapped__ = original
    new_forward.__name__ = getattr(original, "__name__", "forward")
    new_forward.__doc__ = getattr(original, "__doc__", None)
    return new_forward
