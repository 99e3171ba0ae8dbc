"""The ``generation`` group: cheaper per-step glue around ``generate``.

With the ``compiled`` group each decode step's forward is one graph, and the PyNative glue that
transformers runs around it (every mindtorch op costs ~1-5 ms of dispatch on CPU) becomes a
large share of the step. This group replaces the hot glue with implementations that give the
same values using fewer ops:

* ``SuppressTokensLogitsProcessor`` / ``SuppressTokensAtBeginLogitsProcessor`` /
  ``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor``: stock builds
  ``arange(V)``, runs ``isin`` and ``where`` (and a ``clone``) every step. Here the boolean
  vocabulary mask is built once in numpy and cached per (vocab size, token ids); the step is
  one ``mindspore.ops.masked_fill`` (or one copy when the processor is inactive).
* ``LogitsProcessorList.__call__``: when every processor is one of the four above (exact type),
  the active masks are OR-ed (cached) and applied with a single ``masked_fill``. Sequential
  ``where(mask_i, -inf, s)`` equals ``where(any mask_i, -inf, s)`` exactly.
* ``MaxLengthCriteria`` / ``EosTokenCriteria`` / ``StoppingCriteriaList.__call__``: the
  result is computed in numpy from ``input_ids`` (which ``_sample`` syncs on right afterwards
  anyway) and handed back as one bool tensor; the list ORs in numpy when every criterion is one
  of these two (exact type), else the stock loop runs.
* ``WhisperGenerationMixin._retrieve_segment`` (once per window and audio, after the decode):
  the split of a window's tokens into timestamped segments from one numpy copy of the ids
  (:mod:`whisper_accel.runtime.segments`) instead of ~15-40 mindtorch operators; the same
  segments, times (float64) and seek offset. Token timestamps run the stock function.
* ``GenerationMixin._prepare_special_tokens`` (once per ``generate`` call, so once per window in
  long-form): the same four special-token tensors, warnings and error, with its checks (pad id
  among the EOS ids, negative EOS ids) on Python ints instead of ``isin`` / ``any`` on tensors.
  Ids given as tensors run the stock function.

Every replacement falls back to the original for inputs it does not handle: non-mindspore
tensors, non-floating scores, scores that require grad, ``input_ids`` that are not 2-D,
subclasses, or any exception while building a mask. Values, dtypes, shapes and devices of
results are those of the originals; a processor that stock returns as a fresh tensor is a
fresh tensor here too.
"""

from __future__ import annotations

from typing import List

import numpy as np

from .._environment import Gates
from .._patcher import Patch
from ..runtime.interop import as_tensor, ids_np, import_whisper, is_tensor
from ..runtime.masks import FAIL, apply_processors, rules
from ..runtime import host_tensors, segments, windows

GATES = Gates(backends=("CPU",))
SUMMARY = ("masking logits processors and max-length/EOS criteria as one cached mask / numpy check; "
           "a window's timestamp segments and the special-token checks without per-id operators")

#: class -> the replacement ``__call__`` installed (to check a class is still ours).
_installed: dict = {}


def _ours(obj, classes) -> bool:
    t = type(obj)
    return t in classes and _installed.get(t) is t.__dict__.get("__call__")


# ------------------------------------------------------------------- logits processors

def make_processor_call(original):
    """Replacement ``__call__`` for one of the four masking processors."""
    def __call__(self, input_ids, scores):
        try:
            out = apply_processors((self,), input_ids, scores)
        except Exception:  # noqa: BLE001  anything unexpected: stock answers
            out = FAIL
        return original(self, input_ids, scores) if out is FAIL else out

    return __call__


def make_processor_list_call(original):
    """Replacement ``LogitsProcessorList.__call__``: all-known lists take one fused masked_fill."""
    def __call__(self, input_ids, scores, **kwargs):
        if len(self) and all(_ours(p, rules()) for p in self):
            try:
                out = apply_processors(self, input_ids, scores)
            except Exception:  # noqa: BLE001
                out = FAIL
            if out is not FAIL:
                return out
        return original(self, input_ids, scores, **kwargs)

    return __call__


# ------------------------------------------------------------------- stopping criteria

def _max_length_np(c, input_ids, batch):
    from transformers.generation import stopping_criteria as sc
    cur_len = input_ids.shape[1]
    is_done = cur_len >= c.max_length
    if c.max_position_embeddings is not None and not is_done and cur_len > c.max_position_embeddings:
        sc.logger.warning_once(
            "This is a friendly reminder - the current text generation call has exceeded the model's predefined "
            f"maximum length ({c.max_position_embeddings}). Depending on the model, you may observe "
            "exceptions, performance degradation, or nothing at all."
        )
    return np.full((batch,), bool(is_done), dtype=bool)


def _eos_np(c, input_ids, ids):
    if c.eos_token_id.device != input_ids.device:
        c.eos_token_id = c.eos_token_id.to(input_ids.device)
    eos = ids_np(c.eos_token_id)
    if eos is None:
        raise TypeError("eos ids")
    return np.isin(ids[:, -1], eos)


def _ids_ok(input_ids) -> bool:
    return is_tensor(input_ids) and input_ids.ndim == 2 and not input_ids.is_complex()


def _done(arr, like):
    return as_tensor(np.asarray(arr, dtype=bool), like)


def make_max_length_call(original):
    def __call__(self, input_ids, scores, **kwargs):
        if not _ids_ok(input_ids):
            return original(self, input_ids, scores, **kwargs)
        return _done(_max_length_np(self, input_ids, int(input_ids.shape[0])), input_ids)

    return __call__


def make_eos_call(original):
    def __call__(self, input_ids, scores, **kwargs):
        if not _ids_ok(input_ids) or not is_tensor(self.eos_token_id):
            return original(self, input_ids, scores, **kwargs)
        ids = input_ids.asnumpy()
        if ids.dtype.kind not in "iu":
            return original(self, input_ids, scores, **kwargs)
        return _done(_eos_np(self, input_ids, ids), input_ids)

    return __call__


def make_criteria_list_call(original):
    from transformers.generation import stopping_criteria as sc
    known = {sc.MaxLengthCriteria: "max", sc.EosTokenCriteria: "eos"}

    def __call__(self, input_ids, scores, **kwargs):
        if not (len(self) and _ids_ok(input_ids) and all(_ours(c, known) for c in self)
                and all(known[type(c)] == "max" or is_tensor(c.eos_token_id) for c in self)):
            return original(self, input_ids, scores, **kwargs)
        batch = int(input_ids.shape[0])
        ids = None
        done = np.zeros((batch,), dtype=bool)
        for c in self:
            if known[type(c)] == "max":
                done |= _max_length_np(c, input_ids, batch)
            else:
                if ids is None:
                    ids = input_ids.asnumpy()
                    if ids.dtype.kind not in "iu":
                        return original(self, input_ids, scores, **kwargs)
                done |= _eos_np(c, input_ids, ids)
        return _done(done, input_ids)

    return __call__


# ------------------------------------------------------------------- segments of a window

def make_retrieve_segment(original):
    """Replacement for the staticmethod ``_retrieve_segment`` (same arguments, same result)."""
    inner = original.__func__

    def _retrieve_segment(seek_sequence, seek_outputs, time_offset, timestamp_begin, seek_num_frames,
                          time_precision, time_precision_features, input_stride, prev_idx, idx,
                          return_token_timestamps, decoder_input_ids):
        if segments.handles(seek_sequence, time_offset, seek_num_frames, return_token_timestamps):
            try:
                return segments.split(seek_sequence, seek_outputs, time_offset, timestamp_begin, seek_num_frames,
                                      time_precision, time_precision_features, input_stride, prev_idx, idx,
                                      decoder_input_ids)
            except Exception:  # noqa: BLE001  anything unexpected: stock answers
                pass
        # stock may put the window's ids in the segments it returns: a plain tensor there
        return inner(host_tensors.plain(seek_sequence), seek_outputs, time_offset, timestamp_begin, seek_num_frames,
                     time_precision, time_precision_features, input_stride, prev_idx, idx, return_token_timestamps,
                     decoder_input_ids)

    return staticmethod(_retrieve_segment)


# ------------------------------------------------------------------- special tokens

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _id_list(token):
    """A special token as a list of Python ints (``[]``: not set), or ``None`` when it is
    anything else (a tensor, an empty or nested list, a bool): then stock code runs."""
    if token is None:
        return []
    if isinstance(token, int) and not isinstance(token, bool):
        return [token]
    if isinstance(token, list) and token and all(isinstance(t, int) and not isinstance(t, bool) for t in token):
        return list(token)
    return None


def make_prepare_special_tokens(original):
    """Replacement ``GenerationMixin._prepare_special_tokens``: the same four tensors on the
    generation config, the same warnings and error, with the checks on Python ints instead of
    ``isin`` / ``any`` / comparisons on tensors (each a mindtorch operator and a sync)."""
    def _prepare_special_tokens(self, generation_config, kwargs_has_attention_mask=None, device=None):
        lists = [_id_list(getattr(generation_config, name, None)) for name in _SPECIAL]
        if any(v is None for v in lists) or not self.config.is_encoder_decoder:
            return original(self, generation_config, kwargs_has_attention_mask, device=device)
        import torch
        from transformers.generation import utils as gu

        device = device if device is not None else self.device
        bos, pad, start = (None if v is None else torch.tensor(v, device=device, dtype=torch.long)
                           for v in (generation_config.bos_token_id, generation_config.pad_token_id,
                                     generation_config.decoder_start_token_id))
        start = start if start is not None else bos
        eos_ids, pad_ids = lists[1], lists[2]
        eos = torch.tensor(eos_ids, device=device, dtype=torch.long) if eos_ids else None  # 1-D, as stock's
        if pad is None and eos is not None:
            if kwargs_has_attention_mask is not None and not kwargs_has_attention_mask:
                gu.logger.warning(
                    "The attention mask and the pad token id were not set. As a consequence, you may observe "
                    "unexpected behavior. Please pass your input's `attention_mask` to obtain reliable results."
                )
            pad = torch.tensor(eos_ids[0], device=device, dtype=torch.long)
            pad_ids = [eos_ids[0]]
            gu.logger.warning(f"Setting `pad_token_id` to `eos_token_id`:{pad} for open-end generation.")
        if start is None:
            raise ValueError(
                "`decoder_start_token_id` or `bos_token_id` has to be defined for encoder-decoder generation."
            )
        if eos is not None and any(e in pad_ids for e in eos_ids):
            if kwargs_has_attention_mask is not None and not kwargs_has_attention_mask:
                gu.logger.warning_once(
                    "The attention mask is not set and cannot be inferred from input because pad token is same as "
                    "eos token. As a consequence, you may observe unexpected behavior. Please pass your input's "
                    "`attention_mask` to obtain reliable results."
                )
        if eos is not None and any(e < 0 for e in eos_ids):
            gu.logger.warning(
                f"`eos_token_id` should consist of positive integers, but is {eos}. Your generation "
                "will not stop until the maximum length is reached. Depending on other flags, it may even crash."
            )
        generation_config._bos_token_tensor = bos
        generation_config._eos_token_tensor = eos
        generation_config._pad_token_tensor = pad
        generation_config._decoder_start_token_tensor = start

    return _prepare_special_tokens


# ------------------------------------------------------------------- a window's bookkeeping

def _or_stock(compute, stock):
    """``compute()``'s result, or ``stock()`` when it declines (``None``) or fails."""
    try:
        out = compute()
    except Exception:  # noqa: BLE001  anything unexpected: stock answers
        out = None
    return stock() if out is None else out


def _host_first(name: str):
    """A factory for a replacement of a stock function, staticmethod or method whose arguments
    :mod:`..runtime.windows`'s function ``name`` takes alike: that function's result, or the
    stock one's when it declines or fails (looked up per call)."""
    def make(original):
        static = isinstance(original, staticmethod)
        inner = original.__func__ if static else original

        def replacement(*args, **kwargs):
            return _or_stock(lambda: getattr(windows, name)(*args, **kwargs), lambda: inner(*args, **kwargs))

        return staticmethod(replacement) if static else replacement

    return make


make_max_frames_and_seek = _host_first("max_frames_and_seek")
make_maybe_reduce_batch = _host_first("reduce_batch")
make_get_input_segment = _host_first("input_segment")
make_prepare_decoder_input_ids = _host_first("prepare_decoder_input_ids")
make_postprocess_outputs = _host_first("postprocess_outputs")
make_pad_to_max_length = _host_first("pad_to_max_length")


# ------------------------------------------------------------------- the group

def _register(cls, make):
    def build(original):
        fn = make(original)
        _installed[cls] = fn
        return fn
    return build


def patches(env) -> List[Patch]:
    """The ``generation`` group's patches."""
    import_whisper()  # mindnlp before transformers, and torch must be mindtorch
    from transformers.generation import logits_process as lp
    from transformers.generation import stopping_criteria as sc
    from transformers.generation.utils import GenerationMixin
    from transformers.models.whisper import generation_whisper as gw
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

    out = []
    for cls in (lp.SuppressTokensLogitsProcessor, lp.SuppressTokensAtBeginLogitsProcessor,
                lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor):
        out.append(Patch("generation", cls, "__call__", _register(cls, make_processor_call),
                         "cached vocab mask + one masked_fill instead of arange/isin/where"))
    out.append(Patch("generation", lp.LogitsProcessorList, "__call__", make_processor_list_call,
                     "known masking processors fused into one masked_fill"))
    out.append(Patch("generation", sc.MaxLengthCriteria, "__call__",
                     _register(sc.MaxLengthCriteria, make_max_length_call),
                     "max-length check in Python, one tensor out"))
    out.append(Patch("generation", sc.EosTokenCriteria, "__call__",
                     _register(sc.EosTokenCriteria, make_eos_call), "EOS check in numpy, one tensor out"))
    out.append(Patch("generation", GenerationMixin, "_prepare_special_tokens", make_prepare_special_tokens,
                     "special-token checks on Python ints instead of isin/any on tensors"))
    out.append(Patch("generation", WhisperGenerationMixin, "_retrieve_segment", make_retrieve_segment,
                     "a window's timestamp segments from one numpy copy of its ids"))
    out.append(Patch("generation", sc.StoppingCriteriaList, "__call__", make_criteria_list_call,
                     "known criteria OR-ed in numpy, one tensor out"))
    W = WhisperGenerationMixin
    for owner, name, make, what in (
            (W, "_retrieve_max_frames_and_seek", make_max_frames_and_seek,
             "a batch's frame counts and start positions made from numpy"),
            (W, "_maybe_reduce_batch", make_maybe_reduce_batch, "which audios still run, read once on the host"),
            (W, "_get_input_segment", make_get_input_segment,
             "a window's bounds read once on the host, then stock's slice/pad/cat"),
            (W, "_prepare_decoder_input_ids", make_prepare_decoder_input_ids,
             "a window's initial (and prompt) ids indexed in numpy"),
            (W, "_postprocess_outputs", make_postprocess_outputs, "a window's new ids cut in numpy"),
            (gw, "_pad_to_max_length", make_pad_to_max_length, "segments' tokens joined and padded in numpy")):
        out.append(Patch("generation", owner, name, make, what))
    return out
