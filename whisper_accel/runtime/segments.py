"""One decoded window split into timestamped segments from a numpy copy of its ids (Whisper's
``_retrieve_segment``).

After every 30 s window, transformers' ``WhisperGenerationMixin.generate`` calls the staticmethod
``_retrieve_segment`` once per audio: it finds the pairs of timestamp tokens in the window's
tokens, cuts the tokens into segments with their start and end times, and says how far the
window's seek moves. Stock does that with ~15-40 mindtorch operators on a few dozen ids, each
paying PyNative's dispatch cost on CPU. :func:`split` computes the same segments from one
numpy copy of the ids and builds the result tensors from numpy:

* the same dict keys, in the same order; ``tokens`` int tensors holding the same ids (fresh
  tensors rather than views of the window's ids; nothing writes to either);
* ``start`` / ``end`` float64 0-d tensors holding stock's values: ``offset + position *
  time_precision``. The products are mindtorch's own, one operator for all of a window's
  positions: mindtorch multiplies a float64 tensor by a Python float rounded to float32 first
  (150 * 0.02 gives 2.99999993), which numpy would not reproduce. The sums are float64 on
  both sides (IEEE rounding, the same in numpy);
* the seek offset of the same kind as stock's: the window's frame count as an int 0-d tensor,
  or a Python int.

Where stock adds Python floats to tensors (the window's end when it holds no usable timestamp:
``offset + int(frames * time_precision_features / time_precision) * time_precision``), the
result depends on the same promotion; :func:`split` runs that expression as stock code.

Those operators are the same for every window of the same length and position, so their results
are kept (:func:`_stock`): each product, frame position and end is computed by mindtorch once per
process and distinct inputs, then read from a dict. A window then runs no operator here.

:func:`handles` says which calls :func:`split` takes: MindSpore tensors (the ``generation`` group
runs on CPU only), 1-D integer ids, float64 offsets, and no token timestamps (those slice
another tensor per segment; stock runs).
"""

from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np

from .host_tensors import plain
from .interop import as_tensor, dtype_name, is_tensor
from .kept import Kept


#: stock's scalar expressions already computed: key (what they read, exactly) -> value
_KEPT = Kept(1 << 16)


def _stock(key: tuple, compute):
    """``compute()`` (stock's tensor expression) once per distinct ``key``, then the kept value.
    Keys hold Python numbers only; anything else computes each time."""
    if not all(isinstance(k, (str, int, float)) for k in key):
        return compute()
    return _KEPT.get(key, compute)


def _products(positions, time_precision, like) -> List[float]:
    """``position * time_precision`` for each position, as mindtorch multiplies a float64 tensor
    by a Python float; one operator for the positions not seen before with this precision."""
    if not isinstance(time_precision, (int, float)):
        return (as_tensor(np.array(positions, dtype=np.float64), like) * time_precision).asnumpy().tolist()
    known = {p: _KEPT.peek(("x", p, time_precision)) for p in positions}
    new = sorted(p for p, v in known.items() if v is None)
    if new:
        values = (as_tensor(np.array(new, dtype=np.float64), like) * time_precision).asnumpy().tolist()
        for p, v in zip(new, values):
            known[p] = _stock(("x", p, time_precision), lambda v=v: v)
    return [known[p] for p in positions]


def handles(seek_sequence, time_offset, seek_num_frames, return_token_timestamps) -> bool:
    """Whether :func:`split` computes this call (else the stock function runs)."""
    if return_token_timestamps:
        return False
    if not (is_tensor(seek_sequence) and is_tensor(time_offset) and is_tensor(seek_num_frames)):
        return False
    if seek_sequence.ndim != 1 or time_offset.ndim != 1 or seek_num_frames.ndim != 1:
        return False
    return (dtype_name(seek_sequence) in ("int64", "int32") and dtype_name(time_offset) == "float64"
            and dtype_name(seek_num_frames) in ("int64", "int32"))


def split(seek_sequence, seek_outputs, time_offset, timestamp_begin, seek_num_frames, time_precision,
          time_precision_features, input_stride, prev_idx, idx, decoder_input_ids) -> Tuple[List[dict], Any]:
    """``(segments, segment_offset)`` as stock ``_retrieve_segment`` returns them (without token
    timestamps; see :func:`handles`)."""
    seq = seek_sequence.asnumpy()
    offset = np.float64(time_offset.asnumpy()[prev_idx])
    frames = seek_num_frames.asnumpy()[prev_idx]
    is_ts = seq >= timestamp_begin
    single_timestamp_ending = is_ts[-2:].tolist() == [False, True]
    cuts = (np.nonzero(is_ts[:-1] & is_ts[1:])[0] + 1).tolist()
    idx_offset = decoder_input_ids.shape[-1]

    def seconds(positions):
        """``offset + position * time_precision`` for each position, as stock computes it."""
        scaled = _products(positions, time_precision, time_offset)
        return [as_tensor(offset + x, time_offset) for x in scaled]

    if cuts:
        if single_timestamp_ending:
            cuts.append(len(seq))
        else:
            cuts[-1] += 1
        starts = [0] + cuts[:-1]
        ends = [-1] * (len(cuts) - 1) + [-1 if single_timestamp_ending else -2]
        times = seconds([int(seq[a]) - timestamp_begin for a in starts]
                        + [int(seq[a:b][e]) - timestamp_begin for a, b, e in zip(starts, cuts, ends)])
        n = len(cuts)
        segments = [{
            "start": times[i],
            "end": times[n + i],
            "tokens": as_tensor(seq[a:b].copy(), seek_sequence),
            "idxs": (idx_offset + a, idx_offset + b),
            "result": seek_outputs[idx],
        } for i, (a, b) in enumerate(zip(starts, cuts))]
        last = cuts[-1]
        if single_timestamp_ending:
            segment_offset = as_tensor(frames, seek_num_frames)
        else:
            segment_offset = (int(seq[last - 2]) - timestamp_begin) * input_stride
        return segments, segment_offset

    stamps = seq[is_ts]
    if stamps.size > 0 and int(stamps[-1]) != timestamp_begin:
        end = seconds([int(stamps[-1]) - timestamp_begin])[0]
    else:
        # stock's expressions (tensors and Python floats: mindtorch's promotion), as stock runs them
        def last_pos():
            return int(as_tensor(np.asarray(frames), seek_num_frames) * time_precision_features / time_precision)

        pos = _stock(("pos", dtype_name(seek_num_frames), int(frames), time_precision_features, time_precision),
                     last_pos)
        end = as_tensor(np.float64(_stock(("end", float(offset), pos, time_precision),
                                          lambda: (as_tensor(offset, time_offset) + pos * time_precision).item())),
                        time_offset)
    segments = [{
        "start": as_tensor(offset, time_offset),
        "end": end,
        "tokens": plain(seek_sequence),  # stock's own ids; a host tensor's plain copy
        "idxs": (idx_offset, idx_offset + len(seq)),
        "result": seek_outputs[idx],
    }]
    return segments, as_tensor(frames, seek_num_frames)
