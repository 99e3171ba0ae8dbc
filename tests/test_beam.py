"""The ``beam`` group against stock ``model.generate(..., num_beams=K)`` on a tiny random Whisper.

Two layers, both through Whisper's generate() front-end:
* ``both()``: stock vs the real patched path (all groups: the beam loop around the compiled
  step graph, cache reordered in-graph, cross K/V shared per audio, processors in numpy);
* ``our_loop(stock_step=True)`` / ``direct()``: the numpy loop (:mod:`whisper_accel.runtime.beam_search`)
  driven by the *stock* model step, to test the bookkeeping alone (bit-identical scores when the
  step hands over MindSpore's own log-softmax).
Sequences and beam indices must be identical; scores within 1e-4.
"""

import contextlib
import os

import numpy as np
import pytest

import mindnlp  # noqa: F401  (redirects `import torch` to mindtorch)
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

import whisper_accel
from whisper_accel.groups import beam as beam_group
from whisper_accel.runtime import beam_search as beam_loop
from whisper_accel.runtime.topk import topk

from conftest import MINI, rel_diff

ORIGINAL = WhisperForConditionalGeneration._beam_search
CALLS = {"ours": 0, "stock_processors": 0}
MAX_DIFF = {}


def build_model(seed=0, timestamps=False):
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**MINI, init_std=0.3)).eval()
    if timestamps:
        model.generation_config.no_timestamps_token_id = 200  # timestamps: ids 201..299
    return model


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def ts_model():
    return build_model(timestamps=True)


def features(batch, frames=128, seed=1):
    return torch.tensor(np.random.default_rng(seed).standard_normal((batch, 16, frames)).astype(np.float32))


# --- our loop behind generate() ------------------------------------------------------------------


def make_step(model, encoder_outputs, exact_log_probs=False):
    """The ``step`` contract with the stock model: reorder the cache, feed, return last logits."""
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    def step(feed, pos0, beam_idx):
        assert pos0 == cache.get_seq_length()
        assert (beam_idx is None) == (pos0 == 0)
        if beam_idx is not None:
            cache.reorder_cache(torch.tensor(beam_idx))
        out = model(decoder_input_ids=torch.tensor(feed), encoder_outputs=encoder_outputs,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].to(torch.float32)
        if exact_log_probs:
            return logits.asnumpy(), torch.nn.functional.log_softmax(logits, dim=-1).asnumpy()
        return logits.asnumpy()

    return step


def numpy_process(logits_processor, vocab):
    """A numpy ``process`` for Whisper's token-suppressing processors; None (stock) otherwise."""
    plans = []
    for p in logits_processor:
        if type(p) is SuppressTokensAtBeginLogitsProcessor:
            plans.append((p, p.begin_suppress_tokens.asnumpy()))
        elif type(p) is SuppressTokensLogitsProcessor:
            plans.append((p, p.suppress_tokens.asnumpy()))
        else:
            return None
    plans = [(p, ids[(ids >= 0) & (ids < vocab)]) for p, ids in plans]

    def process(ids, scores):
        out = scores.copy()
        for p, tokens in plans:
            if not hasattr(p, "begin_index") or ids.shape[1] == p.begin_index:
                out[:, tokens] = -np.inf
        return out

    return process


@contextlib.contextmanager
def our_loop(stock_step=False, exact_log_probs=False, use_process=False, process_always_none=False):
    """Run generate() on our loop: the patched install (default), or, with ``stock_step``, the
    numpy loop alone around the stock model's step."""
    if not stock_step:
        real = beam_group.beam_search

        def counting(*a, **k):
            CALLS["ours"] += 1
            return real(*a, **k)

        beam_group.beam_search = counting
        try:
            with whisper_accel.patched():
                yield
        finally:
            beam_group.beam_search = real
        return

    def _beam_search(self, input_ids, logits_processor, stopping_criteria, generation_config,
                     synced_gpus=False, **model_kwargs):
        if beam_loop.unsupported(generation_config, synced_gpus):
            return ORIGINAL(self, input_ids, logits_processor, stopping_criteria, generation_config,
                            synced_gpus, **model_kwargs)
        CALLS["ours"] += 1
        step = make_step(self, model_kwargs["encoder_outputs"], exact_log_probs)
        process = None
        if use_process:
            process = numpy_process(logits_processor, self.config.vocab_size)
            assert process is not None, [type(p).__name__ for p in logits_processor]
        if process_always_none:
            def process(ids, scores):
                CALLS["stock_processors"] += 1
                return None
        return beam_loop.beam_search(step, input_ids.asnumpy(), logits_processor, stopping_criteria,
                                     generation_config, process=process, like=input_ids)

    WhisperForConditionalGeneration._beam_search = _beam_search
    try:
        yield
    finally:
        WhisperForConditionalGeneration._beam_search = ORIGINAL


def both(model, *args, loop_kwargs=None, **kwargs):
    """(stock, ours) results of ``model.generate(*args, **kwargs)``; asserts our loop ran."""
    stock = model.generate(*args, **kwargs)
    before = CALLS["ours"]
    with our_loop(**(loop_kwargs or {})):
        ours = model.generate(*args, **kwargs)
    assert CALLS["ours"] > before, "our loop did not run"
    return stock, ours


# --- comparison ---------------------------------------------------------------------------------


def assert_same(stock, ours, atol=1e-4, path="out"):
    """Same structure; integer tensors identical (dtype too); float tensors within ``atol``.
    ``past_key_values`` is compared by :func:`test_past_key_values_equal_stock`."""
    if isinstance(stock, dict):  # dicts and ModelOutputs (which hold only the non-None fields)
        skeys = [k for k in stock.keys() if k != "past_key_values"]
        okeys = [k for k in ours.keys() if k != "past_key_values"]
        assert skeys == okeys, (path, skeys, okeys)
        assert type(stock) is type(ours), (path, type(stock), type(ours))
        for k in skeys:
            assert_same(stock[k], ours[k], atol, f"{path}.{k}")
    elif isinstance(stock, (list, tuple)):
        assert type(stock) is type(ours) and len(stock) == len(ours), (path, len(stock), len(ours))
        for i, (s, o) in enumerate(zip(stock, ours)):
            assert_same(s, o, atol, f"{path}[{i}]")
    elif hasattr(stock, "asnumpy"):
        s, o = stock.asnumpy(), ours.asnumpy()
        assert s.dtype == o.dtype and s.shape == o.shape, (path, s.dtype, o.dtype, s.shape, o.shape)
        if np.issubdtype(s.dtype, np.floating):
            np.testing.assert_allclose(o, s, rtol=1e-6 if atol else 0.0, atol=atol, err_msg=path)
            finite = np.isfinite(s) & np.isfinite(o)
            if finite.any():
                field = path.split(".")[-1].split("[")[0]
                worst = float(np.abs(s[finite] - o[finite]).max())
                if worst > MAX_DIFF.get(field, (0.0, ""))[0]:
                    MAX_DIFF[field] = (worst, os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1])
        else:
            np.testing.assert_array_equal(o, s, err_msg=path)
    else:
        assert stock == ours, (path, stock, ours)


DICT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


# --- tests: options -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [2, 3, 5, 8])
def test_num_beams_batch3_scores_logits(model, num_beams):
    stock, ours = both(model, features(3), num_beams=num_beams, max_new_tokens=12, **DICT)
    assert_same(stock, ours)
    assert stock.sequences_scores is not None and stock.beam_indices.dtype == ours.beam_indices.dtype


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [0.5, 2.0])
def test_length_penalty_early_stopping(model, length_penalty, early_stopping):
    stock, ours = both(model, features(3, seed=3), num_beams=3, max_new_tokens=16,
                       length_penalty=length_penalty, early_stopping=early_stopping, **DICT)
    assert_same(stock, ours)


def test_negative_length_penalty(model):
    stock, ours = both(model, features(2, seed=4), num_beams=4, max_new_tokens=14, length_penalty=-1.0, **DICT)
    assert_same(stock, ours)


def test_num_return_sequences_through_whisper(model):
    """Whisper's generate() repeats each input num_return_sequences times and runs the loop with
    num_return_sequences=1 (so n identical copies come back, in stock too)."""
    stock, ours = both(model, features(2, seed=5), num_beams=4, num_return_sequences=4, max_new_tokens=10, **DICT)
    assert stock.sequences.shape[0] == 8
    assert_same(stock, ours)


def test_plain_sequences_batch1(model):
    stock, ours = both(model, features(1, seed=6), num_beams=3, max_new_tokens=20)
    assert not isinstance(stock, dict)
    assert_same(stock, ours)


def test_up_to_model_limit(model):
    """max_length = max_target_positions (64): the loop ends on MaxLengthCriteria."""
    stock, ours = both(model, features(1, seed=7), num_beams=5, max_new_tokens=63, length_penalty=2.0,
                       early_stopping="never", **DICT)
    assert stock.sequences.shape[1] == 64
    assert_same(stock, ours)


def test_rows_finish_at_different_steps(model):
    """EOS inside beams and items of the batch ending at different lengths (padded with EOS)."""
    stock, ours = both(model, features(3), num_beams=3, max_new_tokens=20, **DICT)
    bidx = stock.beam_indices.asnumpy()
    lengths = (bidx != -1).sum(axis=1)
    assert len(set(lengths.tolist())) > 1, lengths  # the test data does exercise early finishing
    assert_same(stock, ours)


def test_sequences_scores_only(model):
    stock, ours = both(model, features(2, seed=8), num_beams=3, max_new_tokens=12,
                       return_dict_in_generate=True, output_scores=True)
    assert stock.logits is None and ours.logits is None
    assert_same(stock, ours)


def test_dict_without_scores(model):
    stock, ours = both(model, features(2, seed=8), num_beams=3, max_new_tokens=12, return_dict_in_generate=True)
    assert stock.sequences_scores is None and ours.sequences_scores is None
    assert_same(stock, ours)


class BoostToken(LogitsProcessor):
    """A custom processor (runs as stock code): adds ``bias`` to one token's log-prob."""

    def __init__(self, token, bias):
        self.token, self.bias = token, bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] += self.bias
        return scores


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [2.0, 0.0])
def test_frequent_eos_stopping_rules(model, early_stopping, length_penalty):
    """EOS boosted: every beam slot fills early, so when the loop stops (and what it keeps)
    depends on early_stopping, the length penalty and the finished-beam bookkeeping."""
    stock, ours = both(model, features(3, seed=12), num_beams=4, max_new_tokens=24,
                       early_stopping=early_stopping, length_penalty=length_penalty,
                       logits_processor=LogitsProcessorList([BoostToken(3, 3.0)]), **DICT)
    assert_same(stock, ours)


# --- tests: the loop called directly (Whisper's generate() turns num_return_sequences=n into n
# copies of each input with num_return_sequences=1, and it cannot take a list of EOS ids) ---------


def direct(model, batch, num_beams, max_new_tokens, eos=(3,), prompt=(1,), processors=(), seed=1, **gc_kwargs):
    """(stock, ours): GenerationMixin._beam_search and beam_search on the same prepared inputs."""
    from transformers import GenerationConfig
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
    from transformers.modeling_outputs import BaseModelOutput

    hidden = model.model.encoder(features(batch, seed=seed)).last_hidden_state
    encoder_outputs = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(num_beams, dim=0))
    input_ids = torch.tensor(np.tile(np.array(prompt, np.int64), (batch * num_beams, 1)))
    max_length = len(prompt) + max_new_tokens
    results = []
    for run_ours in (False, True):
        gc = GenerationConfig(num_beams=num_beams, max_length=max_length, eos_token_id=list(eos) or None,
                              pad_token_id=0, decoder_start_token_id=1, **gc_kwargs)
        model._prepare_special_tokens(gc, device=input_ids.device)
        lp = LogitsProcessorList(list(processors))
        sc = StoppingCriteriaList([MaxLengthCriteria(max_length)])
        if eos:
            sc.append(EosTokenCriteria(gc._eos_token_tensor))
        if run_ours:
            results.append(beam_loop.beam_search(make_step(model, encoder_outputs), input_ids.asnumpy(), lp, sc,
                                                 gc, like=input_ids))
        else:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            results.append(ORIGINAL(model, input_ids, lp, sc, gc, encoder_outputs=encoder_outputs,
                                    past_key_values=cache, use_cache=True))
    return results


@pytest.mark.parametrize("num_beams,nrs", [(3, 2), (4, 4)])
def test_direct_num_return_sequences(model, num_beams, nrs):
    stock, ours = direct(model, 2, num_beams, 14, num_return_sequences=nrs, length_penalty=0.7,
                         return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert stock.sequences.shape[0] == 2 * nrs
    assert_same(stock, ours)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_direct_several_eos_ids(model, early_stopping):
    """Three EOS ids: beams_to_keep = (1 + 3) * num_beams candidates per step."""
    stock, ours = direct(model, 3, 3, 16, eos=(3, 13, 95), num_return_sequences=3, early_stopping=early_stopping,
                         length_penalty=1.5, return_dict_in_generate=True, output_scores=True)
    assert_same(stock, ours)


def test_direct_no_eos_two_token_prompt(model):
    """No EOS id: unfilled positions hold -1 in stock's buffers, only MaxLengthCriteria stops."""
    stock, ours = direct(model, 2, 3, 10, eos=(), prompt=(1, 7), num_return_sequences=2,
                         return_dict_in_generate=True, output_scores=True)
    assert_same(stock, ours)


# --- tests: numerics, processors, criteria ------------------------------------------------------


def test_exact_log_probs_bit_identical(model):
    """With log-probs from MindSpore's kernel (step returns them), scores match bit for bit."""
    stock, ours = both(model, features(3), num_beams=4, max_new_tokens=12, **DICT,
                       loop_kwargs=dict(stock_step=True, exact_log_probs=True))
    assert_same(stock, ours, atol=0.0)


def test_numpy_process_fast_path(model):
    stock, ours = both(model, features(2, seed=9), num_beams=3, max_new_tokens=12,
                       begin_suppress_tokens=[5, 13, 57, 400], suppress_tokens=[7, 95, 151], **DICT,
                       loop_kwargs=dict(stock_step=True, use_process=True))
    assert_same(stock, ours)
    steps = ours.scores
    assert np.isneginf(steps[0].asnumpy()[:, [5, 13, 57]]).all()  # the suppression did apply
    assert np.isneginf(np.stack([s.asnumpy()[:, [7, 95, 151]] for s in steps])).all()


def test_process_none_falls_back_to_stock(model):
    CALLS["stock_processors"] = 0
    stock, ours = both(model, features(2, seed=9), num_beams=3, max_new_tokens=8, suppress_tokens=[7, 95],
                       **DICT, loop_kwargs=dict(stock_step=True, process_always_none=True))
    assert CALLS["stock_processors"] > 0
    assert_same(stock, ours)


class StopAfterToken(StoppingCriteria):
    """A custom criterion (runs as stock code): stop a candidate once its last token is ``token``;
    reads ``scores`` to check what the loop passes."""

    def __init__(self, token):
        self.token, self.seen_scores = token, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen_scores.append(None if scores is None else len(scores))
        return input_ids[:, -1] == self.token


def test_custom_stopping_criterion(model):
    crit = StopAfterToken(13)
    stock, ours = both(model, features(3), num_beams=3, max_new_tokens=14, **DICT,
                       stopping_criteria=StoppingCriteriaList([crit]))
    n = len(crit.seen_scores) // 2
    assert crit.seen_scores[:n] == crit.seen_scores[n:]  # same `scores` tuple lengths as stock
    assert_same(stock, ours)


# --- tests: Whisper front-end: prompt > 1 token, timestamps, long-form ---------------------------


def test_two_token_prompt(ts_model):
    """no_timestamps_token_id set, return_timestamps off: prompt [1, 200] (first step feeds T=2)."""
    stock, ours = both(ts_model, features(2, seed=10), num_beams=3, max_new_tokens=12, **DICT)
    assert stock.sequences.asnumpy()[0, 1] == 200
    assert_same(stock, ours)


def test_timestamps_short_form(ts_model):
    stock, ours = both(ts_model, features(2, seed=11), num_beams=3, max_new_tokens=20, return_timestamps=True,
                       return_dict_in_generate=True, output_scores=True)
    assert_same(stock, ours)
    assert any(s for s in stock["segments"])


def test_long_form_sequential_with_logprob_threshold(ts_model):
    """> 128 frames: Whisper's sequential long-form loop; logprob_threshold makes Whisper read
    scores through beam_indices (avg log-prob in _need_fallback)."""
    feats = features(2, frames=300, seed=2)
    mask = torch.ones((2, 300), dtype=torch.int64)
    stock, ours = both(ts_model, feats, attention_mask=mask, num_beams=3, max_new_tokens=20,
                       return_timestamps=True, return_segments=True, logprob_threshold=-1.0, temperature=(0.0,))
    assert len(stock["segments"][0]) > 1
    assert_same(stock, ours)


# --- tests: errors stay stock's -----------------------------------------------------------------


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def test_bad_num_return_sequences_keeps_stock_error(model):
    call = lambda: model.generate(features(1), num_beams=2, num_return_sequences=3, max_new_tokens=4)  # noqa: E731
    stock = _error(call)
    with our_loop():
        ours = _error(call)
    assert stock == ours and stock[0] is ValueError


def test_low_memory_keeps_stock_error(model):
    call = lambda: model.generate(features(1), num_beams=2, max_new_tokens=4, low_memory=True)  # noqa: E731
    stock = _error(call)
    with our_loop():
        ours = _error(call)
    assert stock == ours and "low_memory" in stock[1]


def test_unsupported_reasons():
    from transformers import GenerationConfig

    assert beam_loop.unsupported(GenerationConfig(num_beams=2)) is None
    assert beam_loop.unsupported(GenerationConfig(num_beams=2, do_sample=True))
    assert beam_loop.unsupported(GenerationConfig(num_beams=2, return_dict_in_generate=True,
                                                  output_attentions=True))
    assert beam_loop.unsupported(GenerationConfig(num_beams=2), synced_gpus=True)


# --- tests: top-k tie order, log-softmax --------------------------------------------------------


def test_topk_matches_mindtorch_on_ties():
    rng = np.random.default_rng(0)
    pool = np.array([-np.inf, -1e9, -1e9 - 64, 0.0, -0.0, -1.5, -2.25, 3.0, 0.3, -0.7], np.float32)
    for _ in range(400):
        n = int(rng.integers(1, 60))
        x = rng.choice(pool[: int(rng.integers(2, 11))], size=(int(rng.integers(1, 4)), n)).astype(np.float32)
        k = int(rng.integers(1, n + 1))
        v, i = torch.topk(torch.tensor(x), k=k)
        mv, mi = topk(x, k)
        np.testing.assert_array_equal(mi, i.asnumpy())
        np.testing.assert_array_equal(mv, v.asnumpy())
        assert mi.dtype == i.asnumpy().dtype


def test_topk_long_rows():
    rng = np.random.default_rng(1)
    for trial in range(6):
        x = (rng.standard_normal((2, 5 * 51865)) * 3).astype(np.float32)
        if trial % 2:
            x[:, rng.integers(0, x.shape[1], 4)] = x.max()  # ties inside the top k: mindtorch decides
        np.testing.assert_array_equal(topk(x, 10)[1], torch.topk(torch.tensor(x), k=10)[1].asnumpy())


def test_log_softmax_close_to_mindspore():
    x = (np.random.default_rng(2).standard_normal((5, 51865)) * 3).astype(np.float32)
    stock = torch.nn.functional.log_softmax(torch.tensor(x), dim=-1).asnumpy()
    assert np.abs(beam_loop.log_softmax(x) - stock).max() < 2e-5


def teardown_module():
    """Shown with -s: the largest float difference any comparison met."""
    print("\nmax |float diff| vs stock:", MAX_DIFF)


# --- tests: the patched path only ---------------------------------------------------------------


def test_past_key_values_equal_stock(model):
    """The returned cache: the static cache spilled in stock's final beam order. Compared by the
    relative norm of the difference: the fused ``DecoderLayer`` kernel sums in another order
    than MindSpore's operators (float32 noise; ~2e-6 relative by this random model's second
    layer, a few 1e-5 absolute on single elements)."""
    stock, ours = both(model, features(2, seed=13), num_beams=3, max_new_tokens=9, return_dict_in_generate=True)
    for attr in ("self_attention_cache", "cross_attention_cache"):
        s, o = getattr(stock.past_key_values, attr), getattr(ours.past_key_values, attr)
        assert len(s.layers) == len(o.layers)
        for ls, lo in zip(s.layers, o.layers):
            for name in ("keys", "values"):
                a, b = getattr(ls, name).asnumpy(), getattr(lo, name).asnumpy()
                assert a.shape == b.shape, (attr, name, a.shape, b.shape)
                assert rel_diff(b, a) < 1e-5, (attr, name)


def test_cross_attention_is_shared_per_audio(model, monkeypatch):
    """One cross-K/V row per audio, not per beam: the graph gets B rows and groups the beams."""
    from whisper_accel.runtime.decoder_engine import DecoderEngine

    seen = []
    real = DecoderEngine.decode_beams

    def spy(self, ids, pos0, k, v, beam_idx, kx, vx, beams, cross=None, padding=None):
        seen.append((int(ids.shape[0]), int(kx[0].shape[0]), beams))
        return real(self, ids, pos0, k, v, beam_idx, kx, vx, beams, cross, padding)

    monkeypatch.setattr(DecoderEngine, "decode_beams", spy)
    stock, ours = both(model, features(2, seed=14), num_beams=4, max_new_tokens=6)
    assert seen and all(s == (8, 2, 4) for s in seen)
    assert_same(stock, ours)


def test_hidden_states_run_the_stock_loop(model):
    before = CALLS["ours"]
    kwargs = dict(num_beams=2, max_new_tokens=5, return_dict_in_generate=True, output_hidden_states=True)
    with our_loop():
        ours = model.generate(features(1, seed=15), **kwargs)
    stock = model.generate(features(1, seed=15), **kwargs)
    assert CALLS["ours"] == before  # the numpy loop did not run
    np.testing.assert_array_equal(ours.sequences.asnumpy(), stock.sequences.asnumpy())
    assert ours.decoder_hidden_states is not None


def test_beam_sampling_runs_the_stock_loop(model):
    """Beam sampling draws with torch.multinomial: left to stock (sampled tokens are not
    compared: logits that differ in the last ulp may draw differently). Whisper samples when
    ``temperature`` > 0 (its generate sets ``do_sample`` from the temperature)."""
    before = CALLS["ours"]
    with our_loop():
        out = model.generate(features(1, seed=15), num_beams=2, max_new_tokens=5, temperature=0.7)
    assert CALLS["ours"] == before and out.shape[0] == 1


@pytest.mark.slow
def test_real_tiny_dimensions_beam5():
    """Whisper tiny dimensions (vocabulary 51865, 1500 encoder frames): beams 5, as the ASR
    pipeline decodes by default."""
    from conftest import build_model as tiny
    from conftest import features as tiny_features

    m = tiny()
    f = tiny_features(1, 3000)
    stock, ours = both(m, f, num_beams=5, max_new_tokens=10, return_dict_in_generate=True, output_scores=True)
    assert_same(stock, ours)
