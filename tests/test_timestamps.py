"""``runtime/timestamps.py`` against transformers' own ``WhisperTimeStampLogitsProcessor``.

Small vocabulary: text ids 0..29, EOS 30, <|notimestamps|> 40, timestamps 41..63; prompts of
``begin_index`` = 3 tokens followed by random mixes of text and timestamp ids, so every rule of
the processor (pairs, monotonic timestamps, the first step, max_initial_timestamp, the
probability-mass rule) is hit. Each case must equal stock exactly, or be a declared near-tie.
"""

from types import SimpleNamespace

import mindnlp  # noqa: F401  (first: torch -> mindtorch)
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

from whisper_accel.runtime import timestamps as T

V, EOS, NO_TS, BEGIN = 64, 30, 40, 3


def _processor(max_initial=None, detect=True):
    cfg = SimpleNamespace(no_timestamps_token_id=NO_TS, eos_token_id=EOS, bos_token_id=EOS,
                          max_initial_timestamp_index=max_initial)
    return WhisperTimeStampLogitsProcessor(cfg, begin_index=BEGIN, _detect_timestamp_from_logprob=detect)


def _case(rng, batch, gen_len):
    prompt = np.tile(np.array([[50, 51, 52]]), (batch, 1))
    body = np.where(rng.random((batch, gen_len)) < 0.4, rng.integers(41, V, (batch, gen_len)),
                    rng.integers(0, 30, (batch, gen_len)))
    ids = np.concatenate([prompt, body], 1).astype(np.int64)
    scores = (rng.standard_normal((batch, V)) * rng.choice([0.5, 3.0, 8.0])).astype(np.float32)
    return ids, scores


@pytest.mark.parametrize("max_initial,detect", [(None, True), (5, True), (None, False)])
def test_numpy_processor_equals_stock(max_initial, detect):
    rng = np.random.default_rng(0)
    p = _processor(max_initial, detect)
    assert T.supported(p)
    decided = ties = 0
    for _ in range(150):
        ids, scores = _case(rng, batch=int(rng.integers(1, 4)), gen_len=int(rng.integers(0, 6)))
        want = p(torch.tensor(ids), torch.tensor(scores)).asnumpy()
        got = T.timestamp_scores(p, ids, scores)
        if got is None:
            ties += 1
            continue
        decided += 1
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)  # -inf pattern and values, exactly
    assert decided >= 140 and ties <= 10


def test_near_tie_is_left_to_stock():
    p = _processor()
    ids = np.array([[50, 51, 52, 5]], np.int64)
    scores = np.full((1, V), -30.0, np.float32)
    scores[0, 7] = 2.0  # best text token
    scores[0, 41] = 2.0 + T.TIE_GUARD / 4  # one timestamp carrying all but a hair of the mass
    assert T.timestamp_scores(p, ids, scores) is None
    scores[0, 41] = 2.5  # clearly above: decided here, as stock does
    got = T.timestamp_scores(p, ids, scores)
    want = p(torch.tensor(ids), torch.tensor(scores)).asnumpy()
    np.testing.assert_array_equal(got, want)
    assert (got[0, :41] == T.masked_value()).all()  # text suppressed, as stock writes it


def test_unsupported_attributes_fall_back():
    p = _processor()
    p.eos_token_id = [EOS, 31]  # a list: stock would slice with it; not ours to guess
    assert not T.supported(p)
