"""The ``compat`` group: what stock MindNLP 0.5.x lacks for the blog's Whisper script to run.

The seed script (``examples/seed_tutorial.py``) loads Whisper with
``ms_dtype=float16, attn_implementation="flash_attention_2"`` and runs the ASR pipeline on a
file. On CPU with stock MindNLP 0.5.1 / transformers 4.57 it stops, in this order, at:

1. ``PreTrainedModel._flash_attn_2_can_dispatch`` -- ``ImportError: ... the package flash_attn
   seems to be not installed`` (raised from ``WhisperForConditionalGeneration.__init__`` via
   ``_check_and_adjust_attn_implementation`` -> ``get_correct_attn_implementation``).
   Next in the same call, ``lazy_import_flash_attention(..., force_import=True)`` (bound *by
   value* into ``transformers.modeling_utils``) would import ``flash_attn`` too.
   The FA2 *kernel* is not this group's job: the ``attention`` group registers its own function
   under ``ALL_ATTENTION_FUNCTIONS["flash_attention_2"]``; here only the load-time checks pass.
2. ``WhisperFeatureExtractor._torch_extract_fbank_features`` -- ``torch.hann_window`` is missing
   from mindtorch (``mindtorch/ops/spectral.py`` exists but is not exported), and so is
   ``torch.stft``. We add ``mindtorch.hann_window`` (torch semantics) and route the fbank
   extraction to the numpy path transformers itself uses when torch is absent.
3. Without the ``attention`` group, the first encoder forward fails in transformers'
   ``flash_attention_forward`` (``_lazy_imports`` ValueError, "Could not find the currently
   requested flash attention implementation at `None`": no ``flash_attn``). Item 5 below computes
   that attention in mindtorch operators when the package is absent, so ``compat`` alone runs
   the seed script (at stock speed); the ``attention`` group replaces it with its kernel.
4. MindNLP's own Whisper examples write ``return_tensors="ms"`` (``processor.get_prompt_ids(prompt,
   return_tensors="ms")``), which transformers refuses ("ms is not a valid TensorType", stock
   MindNLP 0.5.1 too): ``"ms"`` / ``"mindspore"`` name ``TensorType.PYTORCH`` here, i.e.
   mindtorch tensors.

float16 on CPU needs nothing here: with the pipeline's ``ms_dtype=float16`` the features are cast
to float16 and the Conv2D+BiasAdd emulation of ``conv1d`` runs. Only float32 features fed to a
float16 model fail (``TypeError: For primitive[Conv2D], the input type must be same``) -- real
PyTorch refuses that too, so it is left alone. ``ffmpeg`` decoding of a file path works as is.

Each fix is a factory ``make_xxx(original) -> replacement`` (``original`` is ``None`` when the
attribute is added) and :func:`patches` lists them as :class:`~whisper_accel._patcher.Patch`.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, List, Optional

from .._environment import Gates
from .._patcher import ADD, Patch
from ..runtime.interop import as_tensor, import_whisper

GROUP = "compat"
GATES = Gates()
SUMMARY = ("flash_attention_2 loads and runs without the flash_attn package; torch.hann_window; "
           "log-mel features via transformers' numpy path; token timestamps without torch.unique; "
           "return_tensors='ms'")


def _flash_attn_installed() -> bool:
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# 1. attn_implementation="flash_attention_2" accepted without the flash_attn package
# --------------------------------------------------------------------------------------------


def make_flash_attn_2_can_dispatch(original):
    """``PreTrainedModel._flash_attn_2_can_dispatch``: skip the ``flash_attn`` package checks.

    Keeps the "model does not support FA2" error (``_supports_flash_attn``); when the real
    ``flash_attn`` package is importable, or for any model that is not Whisper, defers to the
    original unchanged (only Whisper's attention is served by whisper_accel).
    """

    def _flash_attn_2_can_dispatch(self, is_init_check: bool = False) -> bool:
        if _flash_attn_installed() or not _is_whisper(self):
            return original(self, is_init_check)  # other models: stock checks, stock errors
        if not (getattr(self, "_supports_flash_attn", False) or getattr(self, "_supports_flash_attn_2", False)):
            return original(self, is_init_check)  # raises the stock ValueError
        return True

    return _flash_attn_2_can_dispatch


def _is_whisper(model) -> bool:
    """Only Whisper gets whisper_accel's flash_attention_2; other models keep stock checks."""
    return type(model).__module__.startswith("transformers.models.whisper.")


def make_lazy_import_flash_attention(original):
    """``transformers.modeling_utils.lazy_import_flash_attention`` (imported by value there).

    ``_check_and_adjust_attn_implementation`` calls it with ``force_import=True`` right after the
    dispatch check, which would ``from flash_attn import ...``. Without the package, the
    ``flash_attention_2`` name is served by whatever is in ``ALL_ATTENTION_FUNCTIONS``, so there
    is nothing to preload.
    """

    def lazy_import_flash_attention(implementation=None, force_import=False):
        if implementation == "flash_attention_2" and not _flash_attn_installed():
            return (None, None, None, None), None
        return original(implementation, force_import)

    return lazy_import_flash_attention


# --------------------------------------------------------------------------------------------
# 2. WhisperFeatureExtractor on mindtorch: hann_window / stft
# --------------------------------------------------------------------------------------------


def hann_window_numpy(window_length: int, periodic: bool = True):
    """``torch.hann_window`` values as a float64 numpy array.

    ``w[n] = 0.5 - 0.5 cos(2 pi n / N)``, with ``N = window_length`` when periodic (the default)
    and ``window_length - 1`` when symmetric; length 1 gives ``[1.0]``, length 0 gives ``[]``.
    """
    import numpy as np

    if window_length < 0:
        raise RuntimeError(f"hann_window requires non-negative window_length, got window_length={window_length}")
    if window_length == 0:
        return np.zeros((0,), dtype=np.float64)
    if window_length == 1:
        return np.ones((1,), dtype=np.float64)
    n = window_length if periodic else window_length - 1
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(window_length, dtype=np.float64) / n)


def make_hann_window(original):
    """``mindtorch.hann_window`` (added): ``hann_window(window_length, periodic=True, *, dtype=None,
    layout=None, device=None, requires_grad=False)`` like torch, default dtype float32.

    ``original`` is ``None`` (the attribute is added); :func:`patches` leaves this patch out when
    mindtorch already exports one.
    """

    def hann_window(window_length, periodic=True, *, dtype=None, layout=None, device=None,
                    requires_grad=False, pin_memory=False):
        import mindtorch

        values = hann_window_numpy(int(window_length), bool(periodic)).astype("float32")
        out = mindtorch.from_numpy(values)
        if dtype is not None and dtype != out.dtype:
            out = out.to(dtype)
        if device is not None:
            out = out.to(device)
        if requires_grad:
            out.requires_grad_(True)
        return out

    return hann_window


def make_torch_extract_fbank_features(original):
    """``WhisperFeatureExtractor._torch_extract_fbank_features``: use the numpy path on CPU.

    transformers picks the torch path whenever ``is_torch_available()`` -- true under MindNLP --
    and that path needs ``torch.stft`` with complex output, which mindtorch lacks. The numpy
    path (``_np_extract_fbank_features``) is transformers' own, matching to ~1e-5.
    """

    def _torch_extract_fbank_features(self, waveform, device: str = "cpu"):
        import numpy as np

        if device not in (None, "cpu"):
            return original(self, waveform, device)
        batch = np.asarray(waveform, dtype=np.float32)
        single = batch.ndim == 1
        if single:
            batch = batch[None, :]
        out = self._np_extract_fbank_features(batch, "cpu").astype(np.float32)
        return out[0] if single else out

    return _torch_extract_fbank_features


# --------------------------------------------------------------------------------------------
# 3. token / word timestamps: mindtorch has no CPU ``unique``, no 3-D reflect pad
# --------------------------------------------------------------------------------------------


def make_extract_token_timestamps(original):
    """``WhisperGenerationMixin._extract_token_timestamps``: ``num_frames`` as numpy.

    With an ``attention_mask`` (the ASR pipeline always passes one), ``num_frames`` is a tensor
    and stock calls ``torch.unique`` on it, which mindtorch lacks on CPU ("No implementation for
    function: unique2 on cpu"), so ``return_token_timestamps=True`` and the pipeline's
    ``return_timestamps="word"`` fail. Stock treats a list / tuple / ndarray ``num_frames`` the
    same way as a tensor, through ``np.unique``: the values are handed over as an ndarray.
    """

    def _extract_token_timestamps(self, generate_outputs, alignment_heads, time_precision=0.02, num_frames=None,
                                  num_input_ids=None):
        import mindtorch
        import numpy as np

        if isinstance(num_frames, mindtorch.Tensor):
            num_frames = np.asarray(num_frames.asnumpy())
        return original(self, generate_outputs, alignment_heads, time_precision, num_frames, num_input_ids)

    return _extract_token_timestamps


def make_median_filter(original):
    """``generation_whisper._median_filter`` (module function) in numpy: stock reflect-pads a 3-D
    tensor, which mindtorch's CPU ``PadV3`` refuses ("the input dims when padding's size equal 4
    must be equal to 4, but got 3": every pipeline call with word timestamps). Same values:
    reflect padding and the middle of each sorted window are exact in any precision."""

    def _median_filter(inputs, filter_width: int):
        import numpy as np

        if filter_width <= 0 or filter_width % 2 != 1:
            raise ValueError("`filter_width` should be an odd number")
        pad_width = filter_width // 2
        if inputs.shape[-1] <= pad_width:
            return inputs
        x = inputs.asnumpy()
        padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad_width, pad_width)], mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, filter_width, axis=-1)
        out = np.sort(windows, axis=-1)[..., pad_width]
        return as_tensor(np.ascontiguousarray(out), inputs)

    return _median_filter


# --------------------------------------------------------------------------------------------
# 4. MindNLP's return_tensors="ms"
# --------------------------------------------------------------------------------------------

#: ``return_tensors`` values MindNLP's examples write for "mindtorch tensors" (``TensorType``
#: has no such member in transformers: ``"ms is not a valid TensorType"``).
MS_TENSOR_TYPES = ("ms", "mindspore")


def make_tensor_type_missing(original):
    """``transformers.utils.TensorType._missing_`` (inherited from ``ExplicitEnum``): ``"ms"`` /
    ``"mindspore"`` name ``TensorType.PYTORCH``, which under MindNLP builds mindtorch tensors (the
    tensors Whisper's ``generate`` takes). Every place that turns ``return_tensors`` into a
    ``TensorType`` goes through it: the tokenizer's ``get_prompt_ids`` and ``__call__``
    (``BatchEncoding.convert_to_tensors``), the feature extractor and the processor
    (``BatchFeature.convert_to_tensors``). Any other unknown value keeps stock's ValueError."""

    def _missing_(cls, value):
        if isinstance(value, str) and value.lower() in MS_TENSOR_TYPES:
            return cls.PYTORCH
        return original(value)

    return classmethod(_missing_)


# --------------------------------------------------------------------------------------------
# 5. flash_attention_2 runs without the flash_attn package (without the ``attention`` group)
# --------------------------------------------------------------------------------------------


def make_flash_attention_forward(original):
    """``transformers.integrations.flash_attention._flash_attention_forward`` (imported by value
    into that module; what the ``flash_attention_2`` registry entry calls).

    Item 1 lets a Whisper model *load* with ``attn_implementation="flash_attention_2"``; without
    the ``attention`` group its first forward then stops in ``lazy_import_flash_attention``
    ("Could not find the currently requested flash attention implementation at `None`"), since
    there is no ``flash_attn`` to call. Here, when the package is absent and no hub kernel was
    asked for (``implementation`` None), the attention is computed as FlashAttention-2 defines
    it, in mindtorch operators (float32): ``softmax(q k^T * scale + mask) v`` on its
    (batch, length, heads, head_dim) inputs, the padding mask (1 = token) on the keys and a
    bottom-right causal mask -- what ``sdpa`` computes, at stock speed. Anything else
    (dropout, sliding windows, softcapping, packed sequences, the package present) runs the
    original, which raises what it raises. Only Whisper reaches this without ``flash_attn``:
    item 1 relaxes the load check for Whisper classes only."""

    def _flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length,
                                 is_causal, dropout=0.0, position_ids=None, softmax_scale=None, sliding_window=None,
                                 use_top_left_mask=False, softcap=None, *args, **kwargs):
        plain = (not args and not dropout and sliding_window is None and softcap is None and position_ids is None
                 and kwargs.get("implementation") is None
                 and all(kwargs.get(k) is None for k in ("cu_seq_lens_q", "cu_seq_lens_k",
                                                         "max_length_q", "max_length_k")))
        if _flash_attn_installed() or not plain:
            return original(query_states, key_states, value_states, attention_mask, query_length, is_causal,
                            dropout, position_ids, softmax_scale, sliding_window, use_top_left_mask, softcap,
                            *args, **kwargs)
        return _reference_attention(query_states, key_states, value_states, attention_mask, bool(is_causal),
                                    softmax_scale)

    return _flash_attention_forward


def _reference_attention(q, k, v, attention_mask, is_causal: bool, scale):
    """FlashAttention-2's result for (B, L, H, D) q/k/v in mindtorch operators, float32 inside."""
    import torch

    dtype = q.dtype
    lq, lk, d = int(q.shape[1]), int(k.shape[1]), int(q.shape[-1])
    scale = d ** -0.5 if scale is None else float(scale)
    qt = q.float().transpose(1, 2)
    kt = k.float().transpose(1, 2)
    vt = v.float().transpose(1, 2)
    s = torch.matmul(qt, kt.transpose(-1, -2))
    if scale != 1.0:
        s = s * scale
    low = torch.finfo(torch.float32).min
    if attention_mask is not None:
        keep = attention_mask[:, -lk:].bool()[:, None, None, :]
        s = s.masked_fill(~keep, low)
    if is_causal and lq > 1:  # bottom-right aligned, as flash_attn >= 2.1
        keep = torch.ones((lq, lk), dtype=torch.bool).tril(diagonal=lk - lq)
        s = s.masked_fill(~keep, low)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vt).transpose(1, 2).to(dtype)


# --------------------------------------------------------------------------------------------
# the group
# --------------------------------------------------------------------------------------------


def patches(env: Optional[Any] = None) -> List[Patch]:
    """The compat patches for the installed MindNLP/transformers, in application order."""
    import_whisper()  # mindnlp first: torch -> mindtorch
    import mindtorch
    import transformers.modeling_utils as mu
    from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor
    from transformers.models.whisper import generation_whisper

    import transformers.integrations.flash_attention as fa
    from transformers.utils import TensorType

    out = [
        Patch(GROUP, mu.PreTrainedModel, "_flash_attn_2_can_dispatch", make_flash_attn_2_can_dispatch,
              "accept attn_implementation='flash_attention_2' without the flash_attn package"),
        Patch(GROUP, mu, "lazy_import_flash_attention", make_lazy_import_flash_attention,
              "do not import flash_attn when preloading flash_attention_2"),
        Patch(GROUP, WhisperFeatureExtractor, "_torch_extract_fbank_features", make_torch_extract_fbank_features,
              "log-mel features via transformers' numpy path (mindtorch has no stft)"),
        Patch(GROUP, generation_whisper.WhisperGenerationMixin, "_extract_token_timestamps",
              make_extract_token_timestamps,
              "token/word timestamps without torch.unique (missing on CPU in mindtorch)"),
        Patch(GROUP, generation_whisper, "_median_filter", make_median_filter,
              "timestamp median filter in numpy (mindtorch's CPU reflect pad refuses 3-D input)"),
        Patch(GROUP, TensorType, "_missing_", make_tensor_type_missing,
              "return_tensors='ms' (MindNLP's examples) builds mindtorch tensors, as 'pt'"),
        Patch(GROUP, fa, "_flash_attention_forward", make_flash_attention_forward,
              "flash_attention_2 without the flash_attn package computes attention in mindtorch"),
    ]
    if not hasattr(mindtorch, "hann_window"):
        out.insert(2, Patch(GROUP, mindtorch, "hann_window", make_hann_window,
                            "add torch.hann_window (periodic Hann window) to mindtorch", kind=ADD))
    return out
