"""transformers 4.57.6 ``GenerationMixin._beam_search`` re-implemented in numpy around a step callable.

The model runs in ``step``; everything else (log-softmax, logits processors, beam scores, top-k,
finished-hypothesis bookkeeping, stopping) runs in numpy, mirroring stock's helpers one for one
(``_get_top_k_continuations``, ``_get_running_beams_for_next_iteration``,
``_update_finished_beams``, ``_check_early_stop_heuristic``,
``_beam_search_has_unfinished_sequences``) with the same float32 arithmetic in the same order,
and top-k in mindtorch's exact tie order (:mod:`.topk`). Stock code runs only for logits
processors without a numpy ``process`` and for stopping criteria other than
``MaxLengthCriteria`` / ``EosTokenCriteria``. Used by the ``beam`` group; its notes are in
``benchmarks/PROFILE_NOTES.md`` (section 14).

``step(feed_ids (N, T) int64, pos0, beam_idx (N,) int64 | None)`` returns the raw last-position
logits (N, V) float32, after reordering the model's KV cache by ``beam_idx``; it may instead return
``(logits, log_probs)`` with ``log_probs`` from MindSpore's own LogSoftmax kernel, which makes
the scores bit-identical to stock's (numpy's log-softmax differs from it by up to ~1e-5);
``logits`` may then be ``None`` when ``output_logits`` is off.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .rules import criteria_np
from .topk import topk

NEG = np.float32(-1.0e9)  # stock's "impossible" score


def unsupported(generation_config, synced_gpus: bool = False) -> Optional[str]:
    """Why this loop cannot stand in for stock's on this call (the caller then runs stock), or None.
    ``low_memory`` is absent on purpose: :func:`beam_search` raises stock's error for it."""
    gc = generation_config
    if synced_gpus:
        return "synced_gpus"
    if gc.do_sample:
        return "beam sampling (do_sample=True): torch.multinomial draws"
    if gc.return_dict_in_generate and (gc.output_attentions or gc.output_hidden_states):
        return "output_attentions / output_hidden_states need the model's per-step outputs"
    return None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (stock: MindSpore's kernel; differs by ~1e-6)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def beam_search(step: Callable, input_ids_np: np.ndarray, logits_processor, stopping_criteria,
                generation_config, *, process: Optional[Callable] = None, like=None,
                finish: Optional[Callable] = None):
    """What ``self._beam_search(input_ids, logits_processor, stopping_criteria, generation_config)``
    returns for an encoder-decoder model: the sequences (mindtorch int64, or ``like``'s dtype), or
    with ``return_dict_in_generate`` a ``GenerateBeamEncoderDecoderOutput``.

    ``process(ids (N, L) int64, log_probs (N, V) float32) -> processed | None`` is an optional
    numpy stand-in for ``logits_processor`` (None: run the stock list this step).
    ``finish(beam_idx)`` is called once with the last cache reorder index (stock reorders its
    cache by it after the last step) and returns the ``past_key_values`` of the output (called
    without ``return_dict_in_generate`` too when ``finish.always`` is true)."""
    gc = generation_config
    if gc.low_memory:  # stock's own error, raised at the same point
        raise ValueError(
            "`low_memory=True` is not supported after the beam search refactor. Please check the discussion in "
            "#35802 *after the PR got merged*, and add a comment there if your questions are not yet answered."
        )
    why = unsupported(gc)
    if why is not None:
        raise NotImplementedError(why)
    state = _BeamState(np.asarray(input_ids_np, dtype=np.int64), gc)
    rules = _Rules(logits_processor, stopping_criteria, process)
    want_scores = gc.return_dict_in_generate and gc.output_scores
    want_logits = gc.return_dict_in_generate and gc.output_logits
    scores, raw_logits = [], []

    feed, pos0, beam_idx = state.input_ids, 0, None
    while True:
        logits, log_probs = _split_step_output(step(feed, pos0, beam_idx))
        pos0 += feed.shape[1]
        ids = state.flat_running_ids()
        log_probs = rules.process(ids, log_probs)
        if want_logits:
            raw_logits.append(np.array(logits, dtype=np.float32))
        if want_scores:
            scores.append(np.array(log_probs, dtype=np.float32))
        beam_idx = state.advance(log_probs, rules, scores if want_scores else None)
        if state.done():
            break
        feed = state.last_tokens()
    # ``finish`` runs for the dict output, and always when it says so (``finish.always``: it fills
    # a StaticCache that ``generate`` passed, which stock's steps fill in place)
    cache = (finish(beam_idx) if finish is not None and (gc.return_dict_in_generate or getattr(finish, "always", False))
             else None)
    return _outputs(state, gc, scores if want_scores else None, raw_logits if want_logits else None, like,
                    cache)


def _split_step_output(out):
    """(logits, log_probs) from what ``step`` returned (log_probs computed here when absent)."""
    if isinstance(out, tuple):
        logits, log_probs = out
        return (None if logits is None else np.asarray(logits, np.float32)), np.asarray(log_probs, np.float32)
    logits = np.asarray(out, np.float32)
    return logits, log_softmax(logits)


class _Rules:
    """Logits processors and stopping criteria: numpy where possible, else the stock objects."""

    def __init__(self, logits_processor, stopping_criteria, process):
        self.logits_processor, self.stopping_criteria, self.fast = logits_processor, stopping_criteria, process
        self.criteria_np = criteria_np(stopping_criteria)

    def process(self, ids: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
        """The processed log-probs; stock gets (running ids without the new token, log-probs)."""
        if self.fast is not None:
            out = self.fast(ids, log_probs)
            if out is not None:
                return np.asarray(out, np.float32)
        if not self.logits_processor:
            return log_probs
        return _to_np(self.logits_processor(_to_torch(ids), _to_torch(log_probs)), np.float32)

    def hits(self, ids: np.ndarray, scores) -> np.ndarray:
        """(rows,) bool: which candidate sequences (with the new token) meet a stopping criterion."""
        if self.criteria_np is not None:
            return self.criteria_np(ids)
        scores_t = None if scores is None else tuple(_to_torch(s) for s in scores)
        return _to_np(self.stopping_criteria(_to_torch(ids), scores_t), bool)


class _BeamState:
    """Stock's static-shaped beam tensors as numpy arrays, (batch, beams, ...) like stock's."""

    def __init__(self, input_ids: np.ndarray, gc):
        self.input_ids = input_ids
        self.num_beams, self.max_length = int(gc.num_beams), int(gc.max_length)
        self.early_stopping, self.length_penalty = gc.early_stopping, gc.length_penalty
        n_rows, self.cur_len = input_ids.shape
        self.batch = n_rows // self.num_beams
        self.prompt_len = self.cur_len
        eos = None if gc._eos_token_tensor is None else _to_np(gc._eos_token_tensor, np.int64).reshape(-1)
        self.keep = max(2, 1 + (0 if eos is None else len(eos))) * self.num_beams
        self.top_num_beam_mask = np.arange(self.keep) < self.num_beams
        b, k = self.batch, self.num_beams
        self.running_sequences = np.full((b, k, self.max_length), _fill_value(gc, eos), np.int64)
        self.running_sequences[:, :, :self.cur_len] = input_ids.reshape(b, k, -1)
        self.sequences = self.running_sequences.copy()
        self.running_beam_scores = np.zeros((b, k), np.float32)
        self.running_beam_scores[:, 1:] = NEG
        self.beam_scores = np.full((b, k), NEG, np.float32)
        self.is_sent_finished = np.zeros((b, k), bool)
        self.heuristic_unsatisfied = np.ones((b, 1), bool)
        self.hits = np.zeros((b, k), bool)
        self.running_beam_indices = np.full((b, k, self.max_length - self.cur_len), -1, np.int32)
        self.beam_indices = self.running_beam_indices.copy()

    def flat_running_ids(self) -> np.ndarray:
        """(N, cur_len): what stock feeds the model and the logits processors this step."""
        return self.running_sequences[:, :, :self.cur_len].reshape(self.batch * self.num_beams, -1)

    def last_tokens(self) -> np.ndarray:
        """(N, 1): the tokens chosen last step, in the (reordered) running-beam order."""
        return self.running_sequences[:, :, self.cur_len - 1].reshape(-1, 1)

    def advance(self, log_probs: np.ndarray, rules: _Rules, scores) -> np.ndarray:
        """One step of stock's loop body after the processors (4.b-g); returns the (N,) int64
        cache reorder index (``running_beam_indices[..., cur_len - prompt_len]``)."""
        b, k = self.batch, self.num_beams
        vocab = log_probs.shape[-1]
        acc = (log_probs.reshape(b, k, vocab) + self.running_beam_scores[:, :, None]).reshape(b, k * vocab)
        top_lp, top_seq, top_bidx = self._top_k_continuations(acc, vocab)
        flat = top_seq[:, :, :self.cur_len + 1].reshape(b * self.keep, -1)
        self.hits = rules.hits(flat, scores).reshape(b, self.keep)
        self._running_for_next_iteration(top_lp, top_seq, top_bidx)
        self._update_finished(top_lp, top_seq, top_bidx)
        beam_idx = self.running_beam_indices[..., self.cur_len - self.prompt_len].reshape(-1).astype(np.int64)
        self.cur_len += 1
        self._check_early_stop_heuristic()
        return beam_idx

    def _top_k_continuations(self, acc, vocab):
        """stock ``_get_top_k_continuations`` (greedy branch)."""
        top_lp, top_idx = topk(acc, self.keep)
        beam = top_idx // vocab
        top_bidx = _gather(self.running_beam_indices, beam)
        top_seq = _gather(self.running_sequences, beam)
        top_seq[:, :, self.cur_len] = top_idx % vocab
        top_bidx[:, :, self.cur_len - self.prompt_len] = beam + np.arange(self.batch)[:, None] * self.num_beams
        return top_lp, top_seq, top_bidx

    def _running_for_next_iteration(self, top_lp, top_seq, top_bidx):
        """stock ``_get_running_beams_for_next_iteration``."""
        running_lp = top_lp + self.hits.astype(np.float32) * NEG
        nxt = topk(running_lp, self.num_beams)[1]
        self.running_sequences = _gather(top_seq, nxt)
        self.running_beam_scores = _gather(running_lp, nxt)
        self.running_beam_indices = _gather(top_bidx, nxt)

    def _update_finished(self, top_lp, top_seq, top_bidx):
        """stock ``_update_finished_beams``: the same float32 operations in the same order."""
        just_finished = self.hits & self.top_num_beam_mask[None, :]
        lp = top_lp / np.float32((self.cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = self.is_sent_finished.all(axis=-1, keepdims=True) & (self.early_stopping is True)
        lp = lp + full.astype(np.float32) * NEG
        lp = lp + (~self.heuristic_unsatisfied).astype(np.float32) * NEG
        lp = lp + (~just_finished).astype(np.float32) * NEG
        merged_scores = np.concatenate([self.beam_scores, lp], axis=1)
        best = topk(merged_scores, self.num_beams)[1]
        self.sequences = _gather(np.concatenate([self.sequences, top_seq], axis=1), best)
        self.beam_scores = _gather(merged_scores, best)
        self.beam_indices = _gather(np.concatenate([self.beam_indices, top_bidx], axis=1), best)
        self.is_sent_finished = _gather(np.concatenate([self.is_sent_finished, just_finished], axis=1), best)

    def _check_early_stop_heuristic(self):
        """stock ``_check_early_stop_heuristic`` (called with the incremented cur_len)."""
        lp = self.length_penalty
        if self.early_stopping == "never" and lp > 0.0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_running = self.running_beam_scores[:, :1] / np.float32(best_len ** lp)
        worst_finished = np.where(self.is_sent_finished, self.beam_scores.min(axis=1, keepdims=True), NEG)
        self.heuristic_unsatisfied &= (best_running > worst_finished).any(axis=-1, keepdims=True)

    def done(self) -> bool:
        """not stock ``_beam_search_has_unfinished_sequences``."""
        improvement_possible = self.heuristic_unsatisfied.any()
        exists_open_beam = not (self.is_sent_finished.all() and self.early_stopping is True)
        valid_continuations = not self.hits.all()
        return not (improvement_possible and exists_open_beam and valid_continuations)


def _fill_value(gc, eos: Optional[np.ndarray]) -> int:
    """stock's ``pad_token_id or eos_token_id[0] if eos_token_id is not None else -1``: a pad id
    of 0 is falsy there, so with pad 0 the unfilled positions hold the first EOS id."""
    if eos is None:
        return -1
    pad = gc._pad_token_tensor
    pad = None if pad is None else int(_to_np(pad, np.int64).reshape(-1)[0])
    return pad if pad else int(eos[0])


def _gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """stock ``_gather_beams``: arr[b, idx[b, j], ...]."""
    idx = idx.astype(np.int64)
    return np.take_along_axis(arr, idx.reshape(idx.shape + (1,) * (arr.ndim - 2)), axis=1)


def _outputs(state: _BeamState, gc, scores, raw_logits, like, cache=None):
    """stock's step 5: best ``num_return_sequences`` per item, cropped to the generated length."""
    nrs = int(gc.num_return_sequences)
    rows = state.batch * nrs
    sequences = state.sequences[:, :nrs].reshape(rows, -1)
    beam_scores = state.beam_scores[:, :nrs].reshape(rows)
    beam_indices = state.beam_indices[:, :nrs].reshape(rows, -1)
    generated = int((beam_indices != -1).sum(axis=1).max())
    sequences = sequences[:, :state.prompt_len + generated]
    beam_indices = beam_indices[:, :generated]

    ids = _to_torch(sequences)
    if like is not None and ids.dtype != like.dtype:
        ids = ids.to(like.dtype)
    if not gc.return_dict_in_generate:
        return ids
    from transformers.generation.utils import GenerateBeamEncoderDecoderOutput

    return GenerateBeamEncoderDecoderOutput(
        sequences=ids,
        sequences_scores=_to_torch(beam_scores) if gc.output_scores else None,
        scores=None if scores is None else tuple(_to_torch(s) for s in scores),
        logits=None if raw_logits is None else tuple(_to_torch(s) for s in raw_logits),
        beam_indices=_to_torch(beam_indices),
        past_key_values=cache,
    )


def _to_torch(arr: np.ndarray):
    """A mindtorch tensor holding a copy of ``arr`` (dtype kept)."""
    import torch  # mindtorch (mindnlp redirects it)

    return torch.tensor(np.ascontiguousarray(arr))


def _to_np(t, dtype) -> np.ndarray:
    """numpy copy of a mindtorch tensor (or array-like)."""
    arr = t.asnumpy() if hasattr(t, "asnumpy") else np.asarray(t)
    return np.asarray(arr, dtype=dtype)
