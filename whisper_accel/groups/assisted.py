"""The ``assisted`` group: speculative (assisted) greedy decoding on the fast path.

Why: stock ``GenerationMixin._assisted_decoding`` (``generate(x, assistant_model=...)``) crops the
main model's cache every round and re-enters ``assistant_model.generate`` each round with a
reused cache, so with the ``greedy`` group both models' steps go stock after the first round.

What: ``WhisperForConditionalGeneration._assisted_decoding`` is replaced by a loop around the two
models' decoder engines (:class:`whisper_accel.runtime.decoder_engine.DecoderEngine`), whose
self-attention caches are static-shape: rolling a cache back is just a smaller length (the slots
past it are overwritten later). Per round:

1. the assistant proposes up to ``num_assistant_tokens`` greedy tokens with one-token
   ``decode_next`` steps (the main model's masking processors as its suppress mask), stopping
   early at EOS or when its top token's probability falls below
   ``assistant_confidence_threshold`` -- stock's ``AssistedCandidateGenerator`` schedule,
   including the ``heuristic`` update of ``num_assistant_tokens`` (written back to the
   assistant's generation config at the end, as stock does);
2. the main model verifies them in one ``decode_step`` of T = candidates + 1 tokens; the logits
   processors run on each verified position as stock does (in numpy for masking processors,
   else the stock list on mindtorch tensors);
3. stock's greedy acceptance rule: the longest prefix of candidates equal to the main model's
   argmax, then the main model's token (one fewer when the candidate sequence is done and all
   matched); both caches' lengths roll back to the accepted prefix.

Exactness: every emitted token is the main model's argmax of its processed logits on the
accepted prefix, as in stock's assisted decoding; the candidates only decide how many tokens one
verification step yields (the speed-up). One stock quirk is reproduced: a
``WhisperForConditionalGeneration`` assistant's ``generate`` (Whisper's) calls
``set_begin_index(len(input_ids))`` on every processor of the list it is handed, which is the
main model's own list; so each round's first verified position is begin-suppressed
(``SuppressTokensAtBeginLogitsProcessor``: the model's ``begin_suppress_tokens``, e.g. 220 and
EOS), and stock's assisted output differs from plain greedy search wherever plain greedy would
pick one of those tokens at a round's first position. The loop does the same (same rounds, same
``set_begin_index`` calls, same output as stock). A ``WhisperForCausalLM`` assistant runs
``GenerationMixin.generate``, which does not do this: output = plain greedy.

Assistants: a ``WhisperForConditionalGeneration`` (its own encoder runs on the input features,
as stock's candidate generator does) or a ``WhisperForCausalLM`` decoder-only assistant reading
the main encoder's outputs (distil-large-v3 style). Anything else runs stock's
``_assisted_decoding`` with a reason counted in :mod:`whisper_accel.runtime.calls` under
``"assisted loop"``: sampling, batch > 1 (stock raises), a streamer, output_attentions /
hidden states, early-exit / prompt-lookup / different-tokenizer candidate generators, static
caches (stock raises), ``MinLengthLogitsProcessor`` (stock raises), and the common checks of
:func:`whisper_accel.runtime.loops.why_stock`.

:data:`STATS` counts candidate tokens proposed and accepted (acceptance rate = accepted /
proposed) since import or the last :func:`reset_stats`; the same counts are reported in
``whisper_accel.status()["calls"]["assisted loop"]["counters"]``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from .._environment import Gates
from .._patcher import Patch
from ..runtime import calls
from ..runtime.binding import compiled_to_decode, to_compute
from ..runtime.decode_state import DecodeState
from ..runtime.interop import adopt, as_tensor, import_whisper
from ..runtime.loops import fast_or_stock, for_stock, prepare, why_stock
from ..runtime.masks import suppressed, vocab_mask
from ..runtime.rules import Processors, criteria_np, max_length

GATES = Gates(backends=("CPU",))
SUMMARY = "assisted (speculative) greedy decoding around both models' static-cache decoder engines"

ENTRY = "assisted loop"

#: Candidate tokens proposed by assistants and accepted by the main model on the fast path.
STATS: Dict[str, int] = {"proposed": 0, "accepted": 0, "rounds": 0}


def reset_stats() -> None:
    for key in STATS:
        STATS[key] = 0


def acceptance_rate() -> Optional[float]:
    return STATS["accepted"] / STATS["proposed"] if STATS["proposed"] else None


def _why_stock(self, input_ids, logits_processor, stopping_criteria, gc, synced_gpus, streamer, kw,
               assistant_model, assistant_tokenizer, tokenizer) -> Optional[str]:
    from transformers.generation.logits_process import MinLengthLogitsProcessor

    mw = import_whisper()
    if gc.do_sample:
        return "sampling with an assistant model"
    if streamer is not None:
        return "a streamer"
    if int(input_ids.shape[0]) != 1:
        return "batch size > 1 (stock assisted decoding takes one row)"
    if assistant_model is None:
        return "no assistant model"
    if getattr(gc, "assistant_early_exit", None) is not None:
        return "assistant_early_exit is set"
    if getattr(gc, "prompt_lookup_num_tokens", None) is not None:
        return "prompt_lookup_num_tokens is set"
    if assistant_tokenizer is not None and tokenizer is not None:
        return "different tokenizers for the assistant"
    if gc.cache_implementation in ("static", "hybrid", "sliding_window"):
        return "a static cache implementation (stock raises)"
    if any(isinstance(p, MinLengthLogitsProcessor) for p in logits_processor):
        return "a MinLengthLogitsProcessor (stock raises)"
    if type(assistant_model) not in (mw.WhisperForConditionalGeneration, mw.WhisperForCausalLM):
        return "the assistant is not a WhisperForConditionalGeneration / WhisperForCausalLM"
    if assistant_model.training:
        return "the assistant is in training mode"
    if int(assistant_model.config.vocab_size) != int(self.config.vocab_size):
        return "the assistant's vocabulary size differs"
    agc = assistant_model.generation_config
    if agc.num_assistant_tokens_schedule not in ("constant", "heuristic", "heuristic_transient"):
        return f"num_assistant_tokens_schedule {agc.num_assistant_tokens_schedule!r}"
    if any(hasattr(c, "eos_token_id") for c in stopping_criteria) and gc._pad_token_tensor is None:
        return "an EOS criterion without a pad token id"
    return why_stock(self, input_ids, stopping_criteria, gc, synced_gpus, kw)


def make_assisted(original):
    """Replacement ``_assisted_decoding``: the engines' loop, or ``original`` when ineligible."""

    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config,
                           synced_gpus=False, streamer=None, inputs_tensor=None, assistant_model=None,
                           assistant_tokenizer=None, tokenizer=None, **model_kwargs):
        def fast():
            why = _why_stock(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                             streamer, model_kwargs, assistant_model, assistant_tokenizer, tokenizer)
            if why is not None:
                return why
            return _assisted(self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs,
                             inputs_tensor, assistant_model)

        return fast_or_stock(self, ENTRY, fast, lambda: original(
            self, input_ids, logits_processor, stopping_criteria, for_stock(generation_config),
            synced_gpus=synced_gpus, streamer=streamer, inputs_tensor=inputs_tensor,
            assistant_model=assistant_model, assistant_tokenizer=assistant_tokenizer, tokenizer=tokenizer,
            **model_kwargs))

    return _assisted_decoding


def _assistant_states(assistant, hidden, inputs_tensor):
    """The encoder states the assistant decodes against, or a ``str``: why stock must run."""
    import torch

    mw = import_whisper()
    if type(assistant) is mw.WhisperForCausalLM:  # decoder-only: reads the main encoder's outputs
        if int(hidden.shape[-1]) != int(assistant.config.d_model):
            return "the decoder-only assistant's width differs from the main encoder's"
        return hidden
    if inputs_tensor is None:
        return "no input features for the assistant's encoder"
    with torch.no_grad():
        out = assistant.get_encoder()(inputs_tensor, return_dict=True)
    return out.last_hidden_state


def _np(t) -> np.ndarray:
    return t.asnumpy() if hasattr(t, "asnumpy") else np.asarray(t)


class _Cache:
    """One engine's static self-attention cache and how many positions of it are valid."""

    def __init__(self, cw, kx, vx, start: int):
        self.cw, self.kx, self.vx = cw, kx, vx
        self.k, self.v = cw.new_cache(1, cw.bucket_for(start, cw.max_positions))
        self.length = 0

    def room(self, need: int) -> None:
        if need > self.k[0].shape[2]:
            self.k, self.v = self.cw.grow_cache(self.k, self.v, self.cw.bucket_for(need, self.cw.max_positions))


def _assisted(self, input_ids, logits_processor, stopping_criteria, gc, kw, inputs_tensor, assistant) -> Any:
    """The loop's result, or (before any step ran) a ``str``: why the original must run."""
    import torch

    cur_len = int(input_ids.shape[1])
    got = prepare(self, kw, input_ids, stopping_criteria)
    if isinstance(got, str):
        return got
    cw, hidden, padding = got
    if padding is not None:
        return "a padded decoder attention mask"
    limit = max_length(stopping_criteria)
    # the model as its own assistant: the same encoder output (no second encoder run)
    a_hidden = hidden if assistant is self else _assistant_states(assistant, hidden, inputs_tensor)
    if isinstance(a_hidden, str):
        return a_hidden
    acw = compiled_to_decode(assistant, a_hidden, 1, limit)
    if isinstance(acw, str):
        return f"assistant: {acw}"

    agc = assistant.generation_config
    # stock's AssistedCandidateGenerator: the assistant stops at the main model's EOS
    agc.eos_token_id = gc.eos_token_id
    num_tokens = agc.num_assistant_tokens
    threshold = agc.assistant_confidence_threshold
    schedule = agc.num_assistant_tokens_schedule

    kx, vx = cw.cross_kv(to_compute(hidden))
    main = _Cache(cw, kx, vx, cur_len)
    akx, avx = (kx, vx) if acw is cw and a_hidden is hidden else acw.cross_kv(to_compute(a_hidden))
    helper = _Cache(acw, akx, avx, cur_len)

    vocab = int(cw.proj.shape[0])
    processors = Processors(logits_processor, vocab)
    graph_mode = processors.mode == "graph"
    no_mask = vocab_mask(vocab, np.empty(0, np.int64))
    # Stock quirk, reproduced: a WhisperForConditionalGeneration assistant's ``generate`` runs
    # Whisper's, which calls ``set_begin_index(len(decoder_input_ids))`` on every processor of the
    # list it is given -- the main model's own list -- so each round's first verified position
    # (and the assistant's first step) gets the begin-suppression (e.g. SuppressTokensAtBegin).
    rebegin = [p for p in logits_processor if hasattr(p, "set_begin_index")] \
        if type(assistant) is import_whisper().WhisperForConditionalGeneration else []

    def suppress_ids(length: int) -> np.ndarray:  # ids the (masking) processors set to -inf
        ids = [np.empty(0, np.int64)]
        for p, tokens in zip(processors.processors, processors.ids):
            got = suppressed(p, length, tokens)[0]
            if got is not None:
                ids.append(np.asarray(got, np.int64))
        ids = np.concatenate(ids)
        return ids[(ids >= 0) & (ids < vocab)]

    done_np = criteria_np(stopping_criteria)
    eos = None
    if gc._eos_token_tensor is not None:
        eos = np.atleast_1d(_np(gc._eos_token_tensor)).astype(np.int64)
    want_scores = gc.return_dict_in_generate and gc.output_scores
    want_logits = gc.return_dict_in_generate and gc.output_logits
    scores = () if want_scores else None
    raw_logits = () if want_logits else None

    ids_np = input_ids.asnumpy().astype(np.int64)
    out_dtype = input_ids.dtype

    def as_ids(arr):
        return as_tensor(arr, input_ids, out_dtype)

    def criteria(arr, sc):
        if done_np is not None:
            return bool(done_np(arr)[0])
        return bool(stopping_criteria(as_ids(arr), sc).asnumpy().astype(bool)[0])

    while True:
        cur_len = int(ids_np.shape[1])
        # 1. candidates: up to num_assistant_tokens greedy tokens of the assistant
        max_new = min(int(num_tokens), gc.max_length - cur_len - 1)
        cand: List[int] = []
        if max_new > 0:
            for p in rebegin:
                p.set_begin_index(cur_len)
            seq = ids_np
            while len(cand) < max_new:
                feed = seq[:, helper.length:]
                helper.room(helper.length + feed.shape[1])
                mask = vocab_mask(vocab, suppress_ids(int(seq.shape[1]))) if graph_mode else no_mask
                nxt, step_scores, _, helper.k, helper.v = acw.decode_next(
                    as_ids(feed), helper.length, helper.k, helper.v, akx, avx, mask)
                helper.length += int(feed.shape[1])
                tok = int(_np(nxt).reshape(-1)[0])
                cand.append(tok)
                seq = np.concatenate([seq, [[tok]]], axis=1)
                if eos is not None and tok in eos:
                    break
                if threshold:
                    s = _np(step_scores).reshape(-1).astype(np.float64)
                    p = np.exp(s - s.max())
                    if p[tok] / p.sum() < threshold:
                        break
        cand_len = len(cand)
        cand_ids = np.concatenate([ids_np, np.asarray([cand], np.int64).reshape(1, -1)], axis=1)
        is_done_candidate = criteria(cand_ids, None) if cand_len else criteria(ids_np, None)

        # 2. the main model verifies the candidates in one step of T = cand_len + 1 tokens
        feed = cand_ids[:, main.length:]
        main.room(main.length + feed.shape[1])
        logits, main.k, main.v = cw.decode_step(as_ids(feed), main.length, main.k, main.v, kx, vx)
        main.length += int(feed.shape[1])
        new_logits = _np(logits)[:, -cand_len - 1:, :].astype(np.float32)  # (1, T, V)
        processed = new_logits.copy()
        proc_tensors = None
        if len(logits_processor) > 0:
            if graph_mode:
                for i in range(cand_len + 1):
                    processed[0, i, suppress_ids(cur_len + i)] = -np.inf
            else:  # the stock list on each position, as stock does
                proc_tensors = []
                for i in range(cand_len + 1):
                    row = as_tensor(new_logits[:, i, :], input_ids)
                    out = logits_processor(as_ids(cand_ids[:, :cur_len + i]), row)
                    proc_tensors.append(out)
                    processed[:, i, :] = _np(out)
        if proc_tensors is not None:
            selected = np.asarray([int(torch.argmax(t, dim=-1).asnumpy().reshape(-1)[0]) for t in proc_tensors])
        else:
            selected = processed[0].argmax(-1).astype(np.int64)

        # 3. acceptance: longest matching prefix, then the main model's token
        n_matches = 0
        while n_matches < cand_len and cand[n_matches] == int(selected[n_matches]):
            n_matches += 1
        if is_done_candidate and n_matches == cand_len:
            n_matches -= 1
        valid = selected[: n_matches + 1].astype(np.int64)
        STATS["proposed"] += cand_len
        STATS["accepted"] += max(n_matches, 0)
        STATS["rounds"] += 1
        calls.count(ENTRY, proposed=cand_len, accepted=max(n_matches, 0), rounds=1)

        # 4. append; roll both caches back to the accepted prefix
        ids_np = np.concatenate([ids_np, valid[None, :]], axis=1)
        new_cur_len = int(ids_np.shape[1])
        main.length = new_cur_len - 1
        helper.length = min(helper.length, cur_len + max(n_matches, 0))

        # 5. stock's candidate-length schedule
        if schedule in ("heuristic", "heuristic_transient"):
            if n_matches == cand_len:
                num_tokens += 2.0
            else:
                num_tokens = max(1.0, num_tokens - 1.0)

        if gc.return_dict_in_generate:
            added = n_matches + 1
            if want_scores:
                if proc_tensors is not None:
                    scores += tuple(adopt(proc_tensors[i], input_ids) for i in range(added))
                else:
                    scores += tuple(as_tensor(processed[:, i, :], input_ids) for i in range(added))
            if want_logits:
                raw_logits += tuple(as_tensor(new_logits[:, i, :], input_ids) for i in range(added))

        if criteria(ids_np, scores):
            break

    if schedule == "heuristic":
        agc.num_assistant_tokens = num_tokens
    sequences = as_ids(ids_np)
    if not gc.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    state = DecodeState(cw, main.k, main.v, kx, vx, 1)
    state.length, state.like = main.length, input_ids
    return GenerateEncoderDecoderOutput(sequences=sequences, scores=scores, logits=raw_logits,
                                        past_key_values=state.spill_for_output(kw.get("past_key_values")))


def patches(env) -> List[Patch]:
    mw = import_whisper()
    return [Patch("assisted", mw.WhisperForConditionalGeneration, "_assisted_decoding", make_assisted,
                  "assisted (speculative) greedy decoding around both models' static-cache decoder engines")]
