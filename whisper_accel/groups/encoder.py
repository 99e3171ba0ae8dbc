"""The ``encoder`` group: ``WhisperEncoder.forward`` runs on the model's encoder engine.

:func:`make_encoder_forward` replaces ``WhisperEncoder.forward`` (under the inference lock,
:func:`whisper_accel.runtime.binding.serialised`): conv stem, every layer and the final norm on
the :class:`~whisper_accel.runtime.encoder_engine.EncoderEngine` -- host, fused graphs or plain
graphs, whichever is configured or measured fastest here (``Config.encoder``).

Anything else takes the original code: training, head masks, output_attentions /
output_hidden_states, features that are not (batch, mels, 2 x positions), dtypes other than
float32/float16/bfloat16 (half-precision models compute in float32 on one kept float32 copy of
the weights; outputs come back in the model's dtype). Bad features get a clear error
(:func:`check_features`). An exception inside the fast path that no executor recovers from is
a fault: one warning, and that model runs stock code from then on
(:func:`whisper_accel.runtime.binding.fault`).

Part of the old ``compiled`` group (``patch(compiled=False)`` still turns this one and
``decoder`` off).
"""

from __future__ import annotations

from typing import List, Optional

from .._environment import Gates
from .._patcher import Patch
from ..runtime import calls
from ..runtime.binding import OFF_AFTER_FAULT, compiled_for, fault, graph_dtype, serialised, to_compute, to_model
from ..runtime.encoder_engine import EncoderEngine
from ..runtime.interop import adopt, import_whisper

GATES = Gates(backends=("CPU",))
SUMMARY = "encoder on the fastest executor here (host kernels, fused graphs or plain graphs)"


def patches(env) -> List[Patch]:
    mw = import_whisper()
    return [Patch("encoder", mw.WhisperEncoder, "forward", serialised(make_encoder_forward),
                  "encoder on its engine: host kernels, fused or plain mindspore.jit graphs")]


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


ENCODER = "encoder"


def _encoder_why_stock(self, input_features, head_mask, oa, oh, expected: int) -> Optional[str]:
    if self.training:
        return "the model is in training mode"
    if head_mask is not None:
        return "head_mask is set"
    if oa or oh:
        return "output_attentions / output_hidden_states"
    if getattr(input_features, "ndim", 0) != 3 or input_features.shape[-1] != expected:
        return f"input_features are not (batch, mels, {expected})"
    if not graph_dtype(input_features, self.conv1.weight):
        return "input_features / weights not float32/float16/bfloat16 of one dtype"
    return None


def make_encoder_forward(original):
    def new_forward(self, input_features, attention_mask=None, head_mask=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None):
        cfg = self.config
        oa = output_attentions if output_attentions is not None else cfg.output_attentions
        oh = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        expected = cfg.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        check_features(self, input_features, expected)

        def stock(why):
            calls.stock(ENCODER, why)
            return original(self, input_features, attention_mask, head_mask, output_attentions,
                            output_hidden_states, return_dict)

        why = _encoder_why_stock(self, input_features, head_mask, oa, oh, expected)
        if why is not None:
            return stock(why)
        cw = compiled_for(self, EncoderEngine)
        if cw is None:
            return stock(OFF_AFTER_FAULT)
        if cw.model_dtype != input_features.dtype:
            return stock("input_features not in the model's dtype")
        try:
            hidden = adopt(to_model(cw.encode(to_compute(input_features)), cw), input_features)
        except Exception as exc:  # noqa: BLE001  compile/launch fault: stock from now on
            return stock(fault(self, "the compiled encoder", exc))
        calls.fast(ENCODER)
        if not (return_dict if return_dict is not None else cfg.use_return_dict):
            return (hidden,)
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput(last_hidden_state=hidden)

    return new_forward
