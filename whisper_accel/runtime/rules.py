"""The decode loops' per-step rules in numpy: logits processors and stopping criteria.

:class:`Processors` turns transformers' processor list into a cached -inf mask for the graph, a
numpy pipeline (with :mod:`.timestamps`), or the stock call; :func:`criteria_np` turns
``MaxLengthCriteria`` / ``EosTokenCriteria`` into a numpy check. Used by the ``greedy`` group.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import numpy as np

from .interop import ids_np
from .masks import processor_ids, suppressed, vocab_mask


class Processors:
    """The step's logits processors, in one of three modes:

    * ``graph``: all are known masking types -- a cached (V,) -inf mask, applied in the graph
      together with the argmax;
    * ``host``: known masking types plus ``WhisperTimeStampLogitsProcessor`` and the sampling
      warpers (:mod:`.sampling`) -- applied in list order in numpy on the step's logits
      (:mod:`.timestamps`), argmax or draw in numpy; a step whose timestamp decision is a
      near-tie runs the stock list instead. ``need_scores`` (sampling) turns graph mode into
      host mode: the draw needs the processed scores, not the in-graph argmax;
    * ``stock``: anything else -- the stock list on the step's logits, mindtorch's argmax.
    """

    def __init__(self, processors, vocab: int, need_scores: bool = False):
        from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

        from .sampling import warper
        from .timestamps import supported

        self.processors, self.vocab = processors, vocab
        self.ids = []  # per processor: its token ids (numpy, read once), "ts", or a numpy warper
        for p in processors:
            if type(p) is WhisperTimeStampLogitsProcessor and supported(p):
                self.ids.append("ts")
                continue
            warp = warper(p)
            if warp is not None:
                self.ids.append(warp)
                continue
            tokens = processor_ids(p)
            if tokens is None:
                break
            self.ids.append(tokens)
        if len(self.ids) != len(processors):
            self.mode = "stock"
        elif need_scores or any(isinstance(t, str) or callable(t) for t in self.ids):
            self.mode = "host"
        else:
            self.mode = "graph"
        self._by_len: Dict[int, Any] = {}

    def mask(self, cur_len: int):
        """(V,) bool Tensor for the graph: the ids to set to -inf at this length (graph mode;
        none in the other modes, where the graph's scores are the raw logits)."""
        m = self._by_len.get(cur_len)
        if m is None:
            ids = [np.empty(0, np.int64)]
            if self.mode == "graph":
                for p, tokens in zip(self.processors, self.ids):
                    got = suppressed(p, cur_len, tokens)[0]
                    if got is not None:
                        ids.append(got)
            m = self._by_len[cur_len] = vocab_mask(self.vocab, np.concatenate(ids))
        return m

    def host(self, ids: np.ndarray, logits_np: np.ndarray) -> Optional[np.ndarray]:
        """Host mode: the processed scores (B, V) float32, or None to run stock this step."""
        from .timestamps import timestamp_scores

        s = logits_np
        for p, tokens in zip(self.processors, self.ids):
            if isinstance(tokens, str):
                s = timestamp_scores(p, ids, s)
                if s is None:
                    return None
            elif callable(tokens):
                s = tokens(s)
            else:
                got = suppressed(p, ids.shape[1], tokens)[0]
                if got is not None:
                    # stock masks isin(arange(V), ids): ids outside [0, V) mask nothing
                    got = got[(got >= 0) & (got < s.shape[-1])]
                    s = s.copy() if s is logits_np else s
                    s[:, got] = -np.inf
        return s


def criteria_np(criteria):
    """A numpy function ``(ids (B, L)) -> done (B,)`` when every criterion is a plain
    ``MaxLengthCriteria`` / ``EosTokenCriteria``; else None (stock code runs them)."""
    import mindspore
    from transformers.generation import stopping_criteria as sc

    checks = []
    for c in criteria:
        if type(c) is sc.MaxLengthCriteria:
            checks.append(functools.partial(lambda ids, n: np.full(ids.shape[0], ids.shape[1] >= n), n=c.max_length))
        elif type(c) is sc.EosTokenCriteria and isinstance(c.eos_token_id, mindspore.Tensor):
            eos = ids_np(c.eos_token_id)
            if eos is None:
                return None
            checks.append(functools.partial(lambda ids, e: np.isin(ids[:, -1], e), e=eos))
        else:
            return None

    def done(ids):
        out = np.zeros(ids.shape[0], dtype=bool)
        for check in checks:
            out |= check(ids)
        return out

    return done


def max_length(criteria) -> Optional[int]:
    from transformers.generation import stopping_criteria as sc

    lengths = [c.max_length for c in criteria if isinstance(c, sc.MaxLengthCriteria)]
    return min(lengths) if lengths else None
