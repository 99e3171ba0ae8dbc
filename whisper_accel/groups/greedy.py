"""The ``greedy`` group: Whisper's greedy decode loop driven from numpy around one graph per step.

Why: with the ``compiled`` group a warm decode step is ~17 ms of graph and ~50 ms of PyNative
glue in transformers' ``GenerationMixin._sample`` (``prepare_inputs_for_generation``,
``_update_model_kwargs_for_generation``, ``.to(copy=True)``, ``argmax``, ``cat``, the
processors and criteria; every mindtorch op costs ~1-5 ms on CPU). See
``benchmarks/PROFILE_NOTES.md`` section 10.

What: ``WhisperForConditionalGeneration._sample`` (inherited from ``GenerationMixin``; it is
what ``generate`` runs for greedy search) is replaced by a loop that, per step, launches one
graph (:meth:`CompiledWhisper.decode_next`: decoder layers, vocab projection of the last
position, the logits processors' -inf mask and the argmax) and reads back the B chosen ids.
Token ids, the stopping state and the step's processor mask live in numpy. The result is what
stock ``_sample`` returns: the ``input_ids`` tensor, or a ``GenerateEncoderDecoderOutput``
with ``scores`` / ``logits`` when asked, and ``past_key_values`` filled from the static cache.

Exactness: stock runs the same layers, sets the same ids to -inf, takes the first maximum and
applies ``next * unfinished + pad * (1 - unfinished)``. ``WhisperTimeStampLogitsProcessor``
(``return_timestamps=True``) runs in numpy on the step's logits (:mod:`.timestamps`; a step
whose timestamp-vs-text decision is a near-tie runs the stock list instead). Other logits
processors run as stock code on the step's logits, followed by mindtorch's ``argmax``; stopping
criteria other than ``MaxLengthCriteria`` / ``EosTokenCriteria`` run as stock code on the ids.

Streamers (``TextStreamer``, ``TextIteratorStreamer``, any ``BaseStreamer``): each step's (B,)
tokens are ``put()`` after they are appended and ``end()`` is called once after the loop, as stock
``_sample`` does (``generate`` put the prompt before). A ``StaticCache`` that ``generate`` passes
(``cache_implementation="static"``, or the user's) is filled in place at the end with what
stock's steps leave there, whether or not the output returns it.

Sampling (``do_sample``; Whisper samples when ``temperature`` > 0, e.g. in temperature
fallback) runs in the same loop: the temperature / top-k / top-p warpers in numpy, then one draw
per row from the processed scores (:mod:`whisper_accel.runtime.sampling`: same per-step
distributions as stock; seeded by ``transformers.set_seed`` / ``numpy.random.seed``).

Falls back to the original ``_sample`` (nothing skipped, nothing half-done) for:
``synced_gpus``, a streamer without ``put()``, ``output_attentions`` / ``output_hidden_states``, prefill
chunking, model kwargs other than ``encoder_outputs`` / ``past_key_values`` (empty or None) /
``use_cache`` / ``attention_mask`` (the encoder's, which Whisper's decoder does not read) /
``decoder_attention_mask`` (a padded one, as batched ``condition_on_prev_tokens`` passes, is
taken as stock does: :mod:`whisper_accel.runtime.padding`), training mode, weights or encoder output other than float32 / float16 / bfloat16 (half precision computes in float32, see the ``compiled`` group), or a
``max_length`` beyond the model's positions. An exception inside the loop (a graph that fails
to compile or launch) is a fault: one warning, the stock ``_sample`` runs the generation from
the start (nothing of the failed attempt is visible), and that model uses stock code from then on.
"""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from .._environment import Gates
from .._patcher import Patch
from ..runtime.binding import to_compute
from ..runtime.decode_state import DecodeState, has_static
from ..runtime.interop import adopt, as_tensor, import_whisper
from ..runtime.loops import (cross_attentions, fast_or_stock, for_stock, prepare, user_call, wants_cross,
                             why_stock)
from ..runtime.rules import Processors, criteria_np
from ..runtime.sampling import draw

GATES = Gates(backends=("CPU",))
SUMMARY = "greedy decode loop in numpy around one graph per step (argmax in-graph)"


ENTRY = "greedy loop"


def _why_stock(self, input_ids, stopping_criteria, gc, synced_gpus, streamer, kw) -> Optional[str]:
    if streamer is not None and not callable(getattr(streamer, "put", None)):
        return "a streamer without put()"
    why = why_stock(self, input_ids, stopping_criteria, gc, synced_gpus, kw)
    if why is None and any(hasattr(c, "eos_token_id") for c in stopping_criteria) and gc._pad_token_tensor is None:
        why = "an EOS criterion without a pad token id"
    return why


def make_sample(original):
    """Replacement ``_sample``: the numpy-driven greedy loop, or ``original`` when ineligible."""

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        sent = _Sent(streamer)

        def fast():
            why = _why_stock(self, input_ids, stopping_criteria, generation_config, synced_gpus, streamer,
                             model_kwargs)
            if why is not None:
                return why
            return _greedy(self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs,
                           sent)

        return fast_or_stock(self, ENTRY, fast, lambda: original(
            self, input_ids, logits_processor, stopping_criteria, for_stock(generation_config), synced_gpus=synced_gpus,
            streamer=sent.for_stock(), **model_kwargs))

    return _sample


class _Sent:
    """The streamer of one ``_sample`` call, and how many tokens the fast loop has put to it.

    Stock ``_sample`` puts each step's (B,) tokens after appending them (the prompt was put by
    ``generate`` before), and calls ``end()`` once after the loop; the fast loop does the same.
    Should the fast loop fault after some puts, the stock rerun (:func:`fast_or_stock`) gets a
    streamer that skips as many puts as were already made (the same tokens: the fast loop's are
    stock's), so the streamer sees each step once."""

    def __init__(self, streamer):
        self.streamer, self.count, self.ended = streamer, 0, False

    def put(self, value) -> None:
        if self.streamer is not None:
            self.count += 1
            user_call(self.streamer.put, value)

    def end(self) -> None:
        if self.streamer is not None:
            self.ended = True
            user_call(self.streamer.end)

    def for_stock(self):
        if self.streamer is None or self.count == 0:
            return self.streamer
        return _SkipPuts(self.streamer, self.count, self.ended)


class _SkipPuts:
    """A streamer wrapper for the stock rerun: drops the first ``n`` ``put`` calls (and ``end()``
    when the fast loop already called it)."""

    def __init__(self, streamer, n: int, ended: bool = False):
        self._streamer, self._skip, self._ended = streamer, n, ended

    def put(self, value):
        if self._skip > 0:
            self._skip -= 1
            return None
        return self._streamer.put(value)

    def end(self):
        if self._ended:
            return None
        return self._streamer.end()

    def __getattr__(self, name):
        return getattr(self._streamer, name)


def _greedy(self, input_ids, logits_processor, stopping_criteria, gc, kw, sent=None) -> Any:
    """The loop's result, or (before any step ran) a ``str``: why the original must run."""
    import torch

    sent = sent if sent is not None else _Sent(None)
    batch, cur_len = int(input_ids.shape[0]), int(input_ids.shape[1])
    got = prepare(self, kw, input_ids, stopping_criteria)
    if isinstance(got, str):
        return got
    cw, hidden, padding = got
    kx, vx = cw.cross_kv(to_compute(hidden))
    k, v = cw.new_cache(batch, cw.bucket_for(cur_len, cw.max_positions))

    sampling = bool(gc.do_sample)
    processors = Processors(logits_processor, int(cw.proj.shape[0]), need_scores=sampling)
    done_np = criteria_np(stopping_criteria)
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    pad = int(gc._pad_token_tensor.asnumpy()) if has_eos else 0
    want_scores = gc.return_dict_in_generate and gc.output_scores
    want_logits = gc.return_dict_in_generate and gc.output_logits
    cross = [] if wants_cross(gc) else None  # per step: per layer (B, H, T, S), for token timestamps
    scores = () if want_scores else None
    raw_logits = () if want_logits else None

    ids_np = input_ids.asnumpy().astype(np.int64)
    out_dtype = input_ids.dtype
    unfinished = np.ones(batch, dtype=np.int64)
    feed, fed = input_ids, 0

    def as_ids(arr):
        return as_tensor(arr, input_ids, out_dtype)

    while True:
        need = fed + int(feed.shape[1])
        if need > k[0].shape[2]:  # next bucket (64/128/256/448): one more graph shape
            k, v = cw.grow_cache(k, v, cw.bucket_for(need, cw.max_positions))
        nxt, step_scores, step_logits, k, v = cw.decode_next(
            feed, fed, k, v, kx, vx, processors.mask(cur_len), cross, padding)
        fed += int(feed.shape[1])
        host = None
        if processors.mode == "host":
            host = processors.host(ids_np, step_logits.asnumpy())
        if processors.mode == "graph":
            next_np = nxt.asnumpy().astype(np.int64)
            step_scores = adopt(step_scores, input_ids)
        elif host is not None:
            next_np = draw(host) if sampling else host.argmax(-1).astype(np.int64)
            step_scores = as_tensor(host, input_ids)
        else:  # stock processors on the step's logits, then mindtorch's argmax (or the draw)
            step_logits = adopt(step_logits, input_ids)
            step_scores = logits_processor(as_ids(ids_np), step_logits)
            next_np = (draw(step_scores.asnumpy()) if sampling
                       else torch.argmax(step_scores, dim=-1).asnumpy().astype(np.int64))
        if want_scores:
            scores += (step_scores,)
        if want_logits:
            raw_logits += (adopt(step_logits, input_ids),)
        if has_eos:
            next_np = next_np * unfinished + pad * (1 - unfinished)
        ids_np = np.concatenate([ids_np, next_np[:, None]], axis=1)
        if sent.streamer is not None:  # stock: put(next_tokens) after the cat, before the criteria
            sent.put(as_ids(next_np))
        cur_len += 1
        if done_np is not None:
            stop = done_np(ids_np)
        else:
            stop = stopping_criteria(as_ids(ids_np), scores).asnumpy().astype(bool)
        unfinished = unfinished & ~stop
        if unfinished.max() == 0:
            break
        feed = as_ids(next_np[:, None])

    sent.end()
    sequences = as_ids(ids_np)
    given = kw.get("past_key_values")
    if not gc.return_dict_in_generate:
        if has_static(given):  # stock's steps fill a StaticCache in place, returned or not
            state = DecodeState(cw, k, v, kx, vx, batch)
            state.length, state.like = fed, input_ids
            state.spill_for_output(given)
        return sequences
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    state = DecodeState(cw, k, v, kx, vx, batch)
    state.length, state.like = fed, input_ids
    return GenerateEncoderDecoderOutput(sequences=sequences, scores=scores, logits=raw_logits,
                                        cross_attentions=cross_attentions(cross, input_ids),
                                        past_key_values=state.spill_for_output(kw.get("past_key_values")))


def patches(env) -> List[Patch]:
    mw = import_whisper()
    return [Patch("greedy", mw.WhisperForConditionalGeneration, "_sample", make_sample,
                  "greedy decode loop in numpy around one graph per step (argmax in-graph)")]
