"""A window's bookkeeping in transformers' Whisper ``generate``, on host copies of small tensors.

Around every 30 s window, ``WhisperGenerationMixin.generate`` works out which audios still
run, where the window starts, which tokens open its prompt and, at the end, pads the decoded
tokens into one tensor. Stock does that with tensor operators on a handful of integers: each
reads an element of ``seek`` (a sync) or indexes, concatenates and pads a few dozen token ids.
On MindNLP every mindtorch operator goes through MindSpore's asynchronous pipeline (worker
threads that spin while they wait), and every value read back waits for it: ~0.3-1 ms each on a
2-core CPU, where PyTorch takes microseconds (PROFILE_NOTES section 44).

The functions here read those small tensors once into numpy and compute the same integers
and id arrays there. Integer indexing, concatenation and padding are exact, so the results hold
stock's values, in tensors of stock's dtypes and devices; the one large operation, cutting a
window out of the input features, runs as stock's own operators with the bounds read on the
host. The public functions take the stock functions' own arguments (names included: stock
passes them by keyword) and return ``None`` for an input they do not handle (not MindSpore
tensors, other dtypes or shapes, a batch that shrinks, token timestamps): the ``generation``
group then runs the stock function. ``seek``, ``max_frames`` and a window's new ids are
:mod:`host tensors <.host_tensors>`, so that what ``generate`` does with them inline, in its own
loop, runs in numpy as well.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .host_tensors import host_tensor
from .interop import as_tensor, is_tensor


def host_ints(t) -> Optional[np.ndarray]:
    """A 1-D integer MindSpore tensor's values in numpy (``None``: anything else)."""
    if not is_tensor(t) or t.ndim != 1:
        return None
    a = t.asnumpy()
    return a if a.dtype.kind in "iu" else None


def _rows(batch_idx_map, cur_bsz) -> list:
    """The batch map's first ``cur_bsz`` entries, as stock reads them (an IndexError alike)."""
    return [batch_idx_map[i] for i in range(cur_bsz)]


def max_frames_and_seek(batch_size, attention_mask, total_input_frames, is_shortform):
    """``(max_frames, seek)`` int64 :mod:`host tensors <.host_tensors>` holding stock's values:
    every audio ``total_input_frames`` long (batched long-form: its attention mask's sum, an
    integer or boolean mask read once), starting at 0. ``generate``'s loop then compares,
    subtracts and advances them in numpy. ``None`` for a float mask, no mask where stock asks
    for one, and a batch size or frame count that is not an int."""
    if type(batch_size) is not int:
        return None
    if batch_size > 1 and not is_shortform:
        if not is_tensor(attention_mask) or attention_mask.ndim != 2:
            return None  # stock raises its error for a missing mask
        mask = attention_mask.asnumpy()
        if mask.dtype.kind not in "biu":
            return None
        frames = mask.sum(-1, dtype=np.int64)
    elif type(total_input_frames) is int:
        frames = np.full((batch_size,), total_input_frames, np.int64)
    else:
        return None
    return host_tensor(frames), host_tensor(np.zeros((batch_size,), np.int64))


def reduce_batch(input_features, seek, max_frames, cur_bsz, batch_idx_map):
    """Stock ``_maybe_reduce_batch``'s result when no audio of the batch has finished (the
    features and size unchanged, the map's first ``cur_bsz`` entries); ``None`` otherwise."""
    s, m = host_ints(seek), host_ints(max_frames)
    if s is None or m is None:
        return None
    rows = _rows(batch_idx_map, cur_bsz)
    if any(int(s[p]) >= int(m[p]) for p in rows):
        return None
    return input_features, cur_bsz, rows


def input_segment(input_features, seek, seek_num_frames, num_segment_frames, cur_bsz, batch_idx_map):
    """Each row's window of the features, zero-padded to ``num_segment_frames`` and concatenated:
    stock's slice, pad and concatenation, with the window's bounds read on the host."""
    if not is_tensor(input_features) or type(num_segment_frames) is not int:
        return None
    s, n = host_ints(seek), host_ints(seek_num_frames)
    if s is None or n is None:
        return None
    import torch
    from torch.nn import functional as F

    parts = []
    for i, p in enumerate(_rows(batch_idx_map, cur_bsz)):
        start = int(s[p])
        piece = input_features[i : i + 1, :, start : start + int(n[p])]
        if piece.shape[-1] < num_segment_frames:
            piece = F.pad(piece, pad=(0, num_segment_frames - piece.shape[-1]))
        parts.append(piece)
    # one row: its (padded) slice, the values stock's concatenation of one tensor copies
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def prepare_decoder_input_ids(cur_bsz, init_tokens, current_segments, batch_idx_map, do_condition_on_prev_tokens,
                              prompt_ids, generation_config, config, device, suppress_tokens, timestamp_begin,
                              kwargs):
    """Stock ``_prepare_decoder_input_ids`` for a window that is not conditioned on earlier
    windows' text (the default): ``(ids, kwargs)`` with ``decoder_attention_mask`` dropped from
    ``kwargs``, as stock does. ``None`` when ids are passed in or the window is conditioned."""
    if "decoder_input_ids" in kwargs or (any(do_condition_on_prev_tokens) and len(current_segments[0]) > 0):
        return None
    ids = decoder_input_ids(init_tokens, batch_idx_map, prompt_ids)
    if ids is None:
        return None
    kwargs.pop("decoder_attention_mask", None)  # as stock: not passed to forward
    return ids, kwargs


def decoder_input_ids(init_tokens, batch_idx_map, prompt_ids):
    """A window's decoder input ids when it is not conditioned on earlier windows' text: each
    row's initial tokens (``init_tokens[batch_idx_map]``), after the prompt ids when given."""
    if not is_tensor(init_tokens) or init_tokens.ndim != 2:
        return None
    init = init_tokens.asnumpy()
    if init.dtype.kind not in "iu":
        return None
    ids = init[list(batch_idx_map)]
    if prompt_ids is not None:
        if not is_tensor(prompt_ids) or prompt_ids.ndim != 1 or prompt_ids.dtype != init_tokens.dtype:
            return None
        ids = np.concatenate([np.repeat(prompt_ids.asnumpy()[None], ids.shape[0], axis=0), ids], axis=-1)
    return as_tensor(ids, init_tokens)


def postprocess_outputs(model, seek_outputs, decoder_input_ids, return_token_timestamps, generation_config,
                        is_shortform, seek, batch_idx_map):
    """Stock ``_postprocess_outputs`` (a method: ``model`` is its ``self``) when ``generate``
    returned a tensor: ``(seek_outputs[:, prompt length:] as a fresh tensor, seek_outputs)``."""
    if not is_tensor(seek_outputs):
        return None
    ids = new_tokens(seek_outputs, decoder_input_ids.shape[-1])
    return None if ids is None else (ids, seek_outputs)


def new_tokens(seek_outputs, start: int):
    """A window's generated ids, ``seek_outputs[:, start:]``, as a fresh tensor."""
    if not is_tensor(seek_outputs) or seek_outputs.ndim != 2 or type(start) is not int:
        return None
    return host_tensor(seek_outputs.asnumpy()[:, start:], seek_outputs)


def _joined(tokens: Sequence[np.ndarray], skip_ending_double_timestamps: bool, timestamp_begin,
            cut_off_length: Optional[int], bos: Optional[np.ndarray]) -> np.ndarray:
    """One audio's segments' tokens as one row, as stock joins them: a segment ending in two
    timestamps loses the last one (when asked), the row keeps its last ``cut_off_length`` ids,
    and ``bos`` goes first."""
    parts = [t[:-1] if skip_ending_double_timestamps and len(t) > 2 and t[-2] >= timestamp_begin else t
             for t in tokens]
    row = np.concatenate(parts)
    if cut_off_length is not None:
        row = row[-cut_off_length:]
    if bos is not None:
        row = np.concatenate([bos, row])
    return row


def _padded(rows: Sequence[np.ndarray], pad_token_id: int, side: str, length: int) -> Optional[np.ndarray]:
    """The rows padded with ``pad_token_id`` to ``length`` on ``side`` and stacked; ``None``
    when a row is longer (stock's pad would crop it)."""
    if any(len(r) > length for r in rows):
        return None
    out = np.full((len(rows), length), pad_token_id, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if len(r):
            if side == "right":
                out[i, :len(r)] = r
            else:
                out[i, length - len(r):] = r
    return out


def pad_to_max_length(current_segments, pad_token_id, device, padding_side="right", padding="longest",
                      bos_token_tensor=None, cut_off_length=None, return_token_timestamps=False,
                      force_unique_generate_call=False, skip_ending_double_timestamps=False,
                      timestamp_begin=None):
    """Stock ``_pad_to_max_length`` without token timestamps: every audio's segments' tokens
    joined, padded with ``pad_token_id`` and stacked (or, for one ``generate`` call, its
    sequences stacked). ``None`` for what it leaves to stock: token timestamps, arguments stock
    rejects, an audio with no segment and no ``bos_token_tensor`` (stock gives it a float row),
    mixed dtypes, rows that a ``max_length`` pad would crop."""
    if (return_token_timestamps or padding_side not in ("right", "left") or padding not in ("longest", "max_length")
            or (padding == "max_length" and cut_off_length is None) or type(pad_token_id) is not int
            or (skip_ending_double_timestamps and timestamp_begin is None) or not current_segments):
        return None
    if force_unique_generate_call:
        seqs = []
        for segments in current_segments:
            result = segments[0]["result"]
            seqs.append(result if is_tensor(result) else result["sequences"])
        if not all(is_tensor(s) for s in seqs):
            return None
        arrays = [s.asnumpy() for s in seqs]
        if len({(a.dtype, a.shape) for a in arrays}) != 1:
            return None
        return as_tensor(np.stack(arrays), seqs[0])
    bos = None
    if bos_token_tensor is not None:
        bos = host_ints(bos_token_tensor)
        if bos is None:
            return None
    tokens, like = [], None
    for segments in current_segments:
        if segments is not None and len(segments) > 0:
            tokens.append([host_ints(d["tokens"]) for d in segments])
            like = like if like is not None else segments[0]["tokens"]
        elif bos is not None:
            tokens.append(None)
            like = like if like is not None else bos_token_tensor
        else:
            return None
    arrays = [t for ts in tokens if ts is not None for t in ts] + ([bos] if bos is not None else [])
    if any(a is None for a in arrays) or len({a.dtype for a in arrays}) != 1:
        return None  # not 1-D integer ids, or dtypes that torch.cat would promote
    rows = [bos if ts is None else _joined(ts, skip_ending_double_timestamps, timestamp_begin, cut_off_length, bos)
            for ts in tokens]
    length = cut_off_length + 1 if padding == "max_length" else max(len(r) for r in rows)
    out = _padded(rows, pad_token_id, padding_side, length)
    return None if out is None else as_tensor(out, like)
