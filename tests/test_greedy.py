"""The ``greedy`` group: the numpy-driven greedy loop must return exactly what stock ``_sample`` does.

A seeded random 2-layer Whisper with a 300-token vocabulary keeps compile + run time low and
makes EOS (id 3) and ties between rows likely enough to exercise the pad/finished logic.
Whether the fast loop ran is read from the compiled object's shape log (``"next"`` entries).
"""

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)

from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria,  # noqa: E402
                          StoppingCriteriaList)
from transformers.models.whisper import modeling_whisper as mw  # noqa: E402

import whisper_accel  # noqa: E402
from whisper_accel.runtime.binding import ATTR  # noqa: E402
from conftest import mini_model  # noqa: E402

N_MELS, SRC_POS = 16, 64
ONLY_GREEDY = dict(compat=False, attention=False, conv1d=False, compiled=False, generation=False)


@pytest.fixture(scope="module")
def model():
    # larger weights than the default init_std 0.02: varied tokens, natural EOS
    return mini_model(max_target_positions=96, begin_suppress_tokens=[5, 7], suppress_tokens=[11, 12],
                      init_std=0.3)


def _feats(batch=1, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor((3 * rng.standard_normal((batch, N_MELS, 2 * SRC_POS))).astype(np.float32))


def _gen(model, feats, **kw):
    with torch.no_grad():
        return model.generate(feats, do_sample=False, **kw)


def _ran_fast(model) -> bool:
    cw = model.__dict__.get(ATTR)
    return bool(cw) and any(key[0] == "next" for key in cw.compiled_shapes)


def _fresh(model):
    model.__dict__.pop(ATTR, None)


def _stock_and_patched(model, feats, groups=ONLY_GREEDY, **kw):
    _fresh(model)
    ref = _gen(model, feats, **kw)
    with whisper_accel.patched(**groups):
        _fresh(model)
        got = _gen(model, feats, **kw)
        fast = _ran_fast(model)
    return ref, got, fast


def _np(t):
    return t.asnumpy()


@pytest.mark.parametrize("groups", [ONLY_GREEDY, {}], ids=["greedy-only", "all-groups"])
def test_tokens_identical_long_run_with_bucket_growth(model, groups):
    # 70 tokens: the static cache grows 64 -> 128 slots mid-generation.
    ref, got, fast = _stock_and_patched(model, _feats(), groups, max_new_tokens=70, min_new_tokens=70)
    assert fast
    assert got.dtype == ref.dtype and got.shape == ref.shape and ref.shape[1] >= 70
    np.testing.assert_array_equal(_np(got), _np(ref))


def test_batch_with_early_eos_pads_finished_rows(model):
    # with these features rows 0 and 2 emit EOS (id 3) early and row 1 runs to the limit
    ref, got, fast = _stock_and_patched(model, _feats(3, seed=3), max_new_tokens=20)
    assert fast
    np.testing.assert_array_equal(_np(got), _np(ref))
    ref = _np(ref)
    assert (ref[:, -1] == 0).any() and (ref[:, -1] != 0).any(), "rows did not finish at different steps"


def test_return_dict_scores_logits_and_cache(model):
    kw = dict(max_new_tokens=12, min_new_tokens=4, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    ref, got, fast = _stock_and_patched(model, _feats(2, seed=3), **kw)
    assert fast
    np.testing.assert_array_equal(_np(got.sequences), _np(ref.sequences))
    assert len(got.scores) == len(ref.scores) and len(got.logits) == len(ref.logits)
    for a, b in zip(got.scores + got.logits, ref.scores + ref.logits):
        a, b = _np(a), _np(b)
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))  # same ids suppressed
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-4, atol=1e-4)
    rc, gc = ref.past_key_values, got.past_key_values
    assert rc.get_seq_length() == gc.get_seq_length() == ref.sequences.shape[1] - 1
    for layer in range(2):
        for cache in ("self_attention_cache", "cross_attention_cache"):
            r, g = getattr(rc, cache).layers[layer], getattr(gc, cache).layers[layer]
            np.testing.assert_allclose(_np(g.keys), _np(r.keys), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(_np(g.values), _np(r.values), rtol=1e-4, atol=1e-4)


class _BanEvenAfterFive(LogitsProcessor):
    """Token-dependent: not one of the masking processors, so it runs as stock code."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > 5:
            scores = scores.clone()
            scores[:, ::2] = -float("inf")
        return scores


class _StopOnRepeat(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == input_ids[:, -2]


def test_custom_processor_and_criterion_run_as_stock_code(model):
    kw = dict(max_new_tokens=24, logits_processor=LogitsProcessorList([_BanEvenAfterFive()]),
              stopping_criteria=StoppingCriteriaList([_StopOnRepeat()]))
    ref, got, fast = _stock_and_patched(model, _feats(2, seed=7), **kw)
    assert fast
    np.testing.assert_array_equal(_np(got), _np(ref))
    assert (_np(ref)[:, 6:] % 2 == 1).all()  # the custom processor did act


@pytest.mark.parametrize("kw", [
    dict(return_dict_in_generate=True, output_hidden_states=True),
    dict(use_cache=False),
], ids=["output_hidden_states", "no_cache"])
def test_unsupported_options_take_stock_loop(model, kw):
    feats = _feats()
    kw = dict(max_new_tokens=6, min_new_tokens=6, **kw)
    with torch.no_grad():
        ref = model.generate(feats, **kw)
    with whisper_accel.patched(**ONLY_GREEDY):
        _fresh(model)
        with torch.no_grad():
            got = model.generate(feats, **kw)
        assert not _ran_fast(model)
    seq = (lambda o: o if isinstance(o, torch.Tensor) else o.sequences)
    np.testing.assert_array_equal(_np(seq(got)), _np(seq(ref)))


def _streamed(model, patched):
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(_np(value).copy())

        def end(self):
            seen.append("end")

    _fresh(model)
    if patched:
        with whisper_accel.patched(**ONLY_GREEDY):
            out = _gen(model, _feats(), max_new_tokens=5, min_new_tokens=5, streamer=Streamer())
            fast = _ran_fast(model)
    else:
        out, fast = _gen(model, _feats(), max_new_tokens=5, min_new_tokens=5, streamer=Streamer()), None
    return _np(out), seen, fast


def test_streamer_runs_the_fast_loop(model):
    """A streamer runs on the fast greedy loop: it sees what it sees on stock (prompt, each
    token, end) and the result is stock's."""
    stock_out, stock_seen, _ = _streamed(model, patched=False)
    out, seen, fast = _streamed(model, patched=True)
    assert fast is True
    assert seen[-1] == "end" and len(seen) == len(stock_seen) == 1 + 5 + 1  # prompt, 5 tokens, end
    for a, b in zip(seen[:-1], stock_seen[:-1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out, stock_out)


def test_sampling_runs_the_fast_loop(model):
    """Whisper turns sampling on through ``temperature``. Stock's samples cannot be reproduced
    (its multinomial is unseeded under mindtorch), so: a seeded run repeats exactly, and every
    sampled token is a token stock's own distribution gives real probability to at that step
    (stock logits for the sampled prefix, temperature 0.7, suppressed tokens excluded);
    per-step distributions equal to stock's are checked in test_sampling.py."""
    feats, temperature = _feats(), 0.7

    def sample():
        np.random.seed(1234)
        with torch.no_grad():
            return _np(model.generate(feats, max_new_tokens=5, min_new_tokens=5, temperature=temperature))

    with whisper_accel.patched(**ONLY_GREEDY):
        _fresh(model)
        out = sample()
        assert _ran_fast(model)
        again = sample()
    np.testing.assert_array_equal(out, again)
    assert out.shape == (1, 5)
    start = model.generation_config.decoder_start_token_id
    prefix = torch.tensor(np.concatenate([[[start]], out[:, :-1]], axis=1).astype(np.int64))
    with torch.no_grad():
        logits = _np(model(feats, decoder_input_ids=prefix).logits)[0].astype(np.float64)  # stock forward
    z = logits / temperature
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for step, token in enumerate(out[0]):
        assert token not in (11, 12) and not (step == 0 and token in (5, 7)), (step, token)  # suppressed
        assert probs[step, token] > 1e-6, (step, token, probs[step, token])


def test_unpatch_restores_inherited_sample():
    assert "_sample" not in vars(mw.WhisperForConditionalGeneration)
    whisper_accel.patch(**ONLY_GREEDY)
    assert "_sample" in vars(mw.WhisperForConditionalGeneration)
    whisper_accel.unpatch()
    assert "_sample" not in vars(mw.WhisperForConditionalGeneration)
