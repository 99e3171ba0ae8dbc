"""The ``beam`` group: Whisper's beam search (``num_beams`` > 1, the ASR pipeline's default)
driven from numpy around one graph launch per step for all beams.

What: ``WhisperForConditionalGeneration._beam_search`` (inherited from ``GenerationMixin``; what
``generate`` runs for ``num_beams > 1`` without sampling) is replaced by
:func:`whisper_accel.runtime.beam_search.beam_search`, transformers 4.57's algorithm in numpy
(log-probs, processors, top-k in the kernel's own tie order, finished hypotheses, length
penalty, ``early_stopping``, ``num_return_sequences``), around a step that launches one graph
(:meth:`CompiledWhisper.decode_beams`): the static self-attention KV cache of all N = batch x
beams rows is reordered by beam index inside the graph, and cross-attention K/V are computed
once per audio and shared by its beams (their queries are stacked; nothing is copied per beam).
The masking logits processors and ``WhisperTimeStampLogitsProcessor`` run in numpy
(:mod:`whisper_accel.runtime.rules`); others run as stock code on the step's log-probs.

Returns what stock returns: the sequences, or ``GenerateBeamEncoderDecoderOutput`` with
``sequences_scores``, ``scores``, ``logits``, ``beam_indices`` and ``past_key_values`` (the
static cache spilled in stock's final beam order).

The HF cache ``generate`` passes may hold ``DynamicCache``s or ``StaticCache``s
(``cache_implementation="static"``, or the user's ``EncoderDecoderCache(StaticCache, StaticCache)``):
a static one is filled in place at the end, with what stock's steps leave in it (in the final
beam order), whether or not the output returns it. A streamer with beam search is refused by
``generate`` itself before the search runs (stock's error, unchanged).

Falls back to the stock ``_beam_search`` for: beam sampling (``do_sample=True``), ``synced_gpus``,
``output_attentions`` / ``output_hidden_states``, prefill chunking, ``low_memory`` (stock raises
its own error), model kwargs other than ``encoder_outputs`` / ``past_key_values`` (empty) /
``use_cache`` / ``attention_mask`` / ``decoder_attention_mask`` (padded ones, as batched
``condition_on_prev_tokens`` passes, are taken as stock does), training mode, weights or encoder output other
than float32/float16/bfloat16, or a ``max_length`` beyond the model's positions.
An exception inside the loop is a fault: one warning, stock runs the search from the start.
"""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from .._environment import Gates
from .._patcher import Patch
from ..runtime.beam_search import beam_search, unsupported
from ..runtime.binding import to_compute
from ..runtime.decode_state import DecodeState, has_static
from ..runtime.host_step import on_device
from ..runtime.interop import import_whisper
from ..runtime.loops import cross_attentions, fast_or_stock, for_stock, prepare, wants_cross, why_stock
from ..runtime.rules import Processors

GATES = Gates(backends=("CPU",))
SUMMARY = "beam search in numpy around one graph per step for all beams (cache reordered in-graph)"


ENTRY = "beam search loop"


def _why_stock(self, input_ids, stopping_criteria, gc, synced_gpus, kw) -> Optional[str]:
    why = unsupported(gc)  # the search's own limits (beam sampling, per-step outputs)
    if why is not None:
        return why
    if getattr(gc, "low_memory", False):
        return "low_memory=True (stock raises its own error)"
    if int(input_ids.shape[0]) % int(gc.num_beams):
        return "the batch is not a multiple of num_beams"
    return why_stock(self, input_ids, stopping_criteria, gc, synced_gpus, kw)


def make_beam_search(original):
    """Replacement ``_beam_search``: the numpy-driven loop, or ``original`` when ineligible."""

    def _beam_search(self, input_ids, logits_processor, stopping_criteria, generation_config,
                     synced_gpus=False, **model_kwargs):
        def fast():
            why = _why_stock(self, input_ids, stopping_criteria, generation_config, synced_gpus, model_kwargs)
            if why is not None:
                return why
            return _beams(self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)

        return fast_or_stock(self, ENTRY, fast, lambda: original(
            self, input_ids, logits_processor, stopping_criteria, for_stock(generation_config), synced_gpus=synced_gpus,
            **model_kwargs))

    return _beam_search


def _shared_rows(hidden, beams: int):
    """Encoder states of one row per audio when each audio's ``beams`` rows are copies (as
    ``generate`` expands them), else None."""
    h = hidden.asnumpy()
    grouped = h.reshape((h.shape[0] // beams, beams) + h.shape[1:])
    if not (grouped == grouped[:, :1]).all():
        return None
    import mindspore

    return mindspore.Tensor(np.ascontiguousarray(grouped[:, 0]))


def _beams(self, input_ids, logits_processor, stopping_criteria, gc, kw) -> Any:
    """The search's result, or (before anything ran) a ``str``: why the original must run."""
    import mindspore
    from mindspore import ops

    n, cur_len = int(input_ids.shape[0]), int(input_ids.shape[1])
    beams = int(gc.num_beams)
    got = prepare(self, kw, input_ids, stopping_criteria)
    if isinstance(got, str):
        return got
    cw, hidden, padding = got
    per_audio = _shared_rows(hidden, beams)
    group = beams if per_audio is not None else 1
    kx, vx = cw.cross_kv(to_compute(per_audio if per_audio is not None else hidden))
    cache = {"k": None, "v": None}
    cache["k"], cache["v"] = cw.new_cache(n, cw.bucket_for(cur_len, cw.max_positions))
    identity = np.arange(n, dtype=np.int32)
    want_logits = gc.return_dict_in_generate and gc.output_logits
    cross = [] if wants_cross(gc) else None  # per step: per layer (N, H, T, S), for token timestamps

    def step(feed, pos0, beam_idx):
        k, v = cache["k"], cache["v"]
        need = pos0 + feed.shape[1]
        if need > k[0].shape[2]:
            k, v = cw.grow_cache(k, v, cw.bucket_for(need, cw.max_positions))
        order = identity if beam_idx is None else beam_idx.astype(np.int32)
        logits, logp, cache["k"], cache["v"] = cw.decode_beams(
            mindspore.Tensor(np.ascontiguousarray(feed), mindspore.int64), pos0, k, v,
            mindspore.Tensor(order), kx, vx, group, cross, padding)
        cache["fed"] = need
        return (logits.asnumpy() if want_logits else None), logp.asnumpy()

    processors = Processors(logits_processor, int(cw.proj.shape[0]))
    process = None if processors.mode == "stock" else processors.host

    def finish(beam_idx):
        """The HF cache stock returns: the static cache after the last step, in the last order."""
        idx = mindspore.Tensor(beam_idx.astype(np.int32))
        per_row = mindspore.Tensor((np.arange(n) // group).astype(np.int32))
        state = DecodeState(cw, tuple(ops.gather(c, idx, 0) for c in on_device(cache["k"])),
                            tuple(ops.gather(c, idx, 0) for c in on_device(cache["v"])),
                            tuple(ops.gather(c, per_row, 0) for c in kx),
                            tuple(ops.gather(c, per_row, 0) for c in vx), n)
        state.length, state.like = cache["fed"], input_ids
        return state.spill_for_output(kw.get("past_key_values"))

    # a StaticCache passed in (cache_implementation="static") is filled as stock's steps fill it,
    # whether or not the output returns it
    finish.always = has_static(kw.get("past_key_values"))

    out = beam_search(step, input_ids.asnumpy(), logits_processor, stopping_criteria, gc, process=process,
                      like=input_ids, finish=finish)
    if cross is not None:
        out["cross_attentions"] = cross_attentions(cross, input_ids)
    return out


def patches(env) -> List[Patch]:
    mw = import_whisper()
    return [Patch("beam", mw.WhisperForConditionalGeneration, "_beam_search", make_beam_search,
                  "beam search in numpy around one graph per step for all beams")]
