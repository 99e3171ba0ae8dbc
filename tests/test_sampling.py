"""Sampling on the greedy group's fast loop (``temperature`` > 0, as temperature fallback runs it).

Samples are not comparable with stock's (mindtorch's ``torch.multinomial`` cannot be seeded on
CPU), so the check is the one that matters: under the same prefix, each step's distribution is
stock's. Stock's distributions are read by running stock ``generate`` with ``torch.multinomial``
replaced by a recorder that returns the patched run's token (a forced prefix) and keeps the
probabilities stock computed.
"""

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)
from transformers.generation import logits_process as lp  # noqa: E402

import whisper_accel  # noqa: E402
from conftest import mini_model  # noqa: E402
from whisper_accel.runtime import calls, sampling  # noqa: E402

N_MELS, SRC_POS = 16, 64


@pytest.fixture(scope="module")
def model():
    return mini_model(max_target_positions=96, suppress_tokens=[11, 12], init_std=0.3)


def _feats(batch=1, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor((3 * rng.standard_normal((batch, N_MELS, 2 * SRC_POS))).astype(np.float32))


def _scores(seed=0, shape=(3, 300)):
    return (4 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("warp", [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(top_k=50),
                                  lp.TopKLogitsWarper(top_k=5, min_tokens_to_keep=7),
                                  lp.TopPLogitsWarper(top_p=0.9), lp.TopPLogitsWarper(top_p=0.3, min_tokens_to_keep=2)],
                         ids=["temperature", "top_k", "top_k_min_keep", "top_p", "top_p_min_keep"])
def test_numpy_warpers_equal_stock(warp):
    s = _scores()
    ours = sampling.warper(warp)(s)
    stock = warp(torch.zeros((3, 4), dtype=torch.int64), torch.tensor(s)).asnumpy()
    np.testing.assert_array_equal(ours, stock)  # filtered entries included (mindtorch writes float32 min)
    assert (ours != s).any() or isinstance(warp, lp.TopPLogitsWarper)


def test_other_warpers_are_left_to_stock():
    assert sampling.warper(lp.MinPLogitsWarper(min_p=0.1)) is None
    assert sampling.warper(lp.TypicalLogitsWarper(mass=0.9)) is None

    class Sub(lp.TopKLogitsWarper):
        pass

    assert sampling.warper(Sub(top_k=3)) is None


def test_draw_follows_the_distribution_and_never_picks_filtered_ids():
    s = np.log(np.array([[0.5, 0.3, 0.2, 0.0, 0.0]], np.float32).clip(1e-30))
    s[0, 3:] = -np.inf
    np.random.seed(0)
    ids = np.concatenate([sampling.draw(np.repeat(s, 100, axis=0)) for _ in range(100)])
    freq = np.bincount(ids, minlength=5) / ids.size
    assert freq[3] == 0 and freq[4] == 0
    np.testing.assert_allclose(freq[:3], [0.5, 0.3, 0.2], atol=0.01)  # 10 000 draws: 3 sigma ~ 0.015/2


def test_draw_is_seeded_by_numpy():
    s = _scores(1)
    np.random.seed(5)
    a = [sampling.draw(s) for _ in range(4)]
    np.random.seed(5)
    b = [sampling.draw(s) for _ in range(4)]
    np.testing.assert_array_equal(a, b)


def _stock_distributions(model, feats, forced: np.ndarray, start: int, **kw):
    """Stock generate's per-step probabilities when each step's draw is forced to ``forced``."""
    seen, step = [], [0]
    original = torch.multinomial

    def recorder(probs, num_samples=1, **_):
        seen.append(probs.asnumpy().copy())
        t = forced[:, start + step[0]]
        step[0] += 1
        return torch.tensor(t[:, None].astype(np.int64))

    torch.multinomial = recorder
    try:
        with torch.no_grad():
            out = model.generate(feats, **kw)
    finally:
        torch.multinomial = original
    return out.sequences.asnumpy(), seen


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_p=0.9),
                                dict(temperature=0.5, top_k=5)], ids=["t0.7-top_k50", "t1.3-top_p", "t0.5-top_k5"])
def test_per_step_distributions_equal_stock_under_the_same_prefix(model, kw):
    from transformers import set_seed

    feats = _feats(2, seed=4)
    gen = dict(max_new_tokens=12, **kw)
    calls.reset()
    with whisper_accel.patched():
        set_seed(0)
        with torch.no_grad():
            seq = model.generate(feats, **gen).asnumpy()
        set_seed(0)
        with torch.no_grad():
            ours = model.generate(feats, return_dict_in_generate=True, output_scores=True, **gen)
    assert calls.snapshot()["greedy loop"] == {"fast": 2, "stock": 0, "reasons": {}}
    full = ours.sequences.asnumpy()  # with the start token and EOS (plain output drops and pads them)
    np.testing.assert_array_equal(seq[full[:, 1:] != 3], full[:, 1:][full[:, 1:] != 3])  # seeded: reproducible
    stock_seq, stock_probs = _stock_distributions(model, feats, full, 1, return_dict_in_generate=True, **gen)
    np.testing.assert_array_equal(stock_seq, full)  # the forced prefix is what stock produced
    assert len(stock_probs) == len(ours.scores)
    for got, ref in zip(ours.scores, stock_probs):
        p = sampling.softmax(got.asnumpy())
        assert np.abs(p - ref).sum(axis=-1).max() < 1e-4  # total variation per row
        np.testing.assert_array_equal(p == 0, ref == 0)  # the same ids are filtered


def test_other_seeds_draw_other_tokens(model):
    """(min_new_tokens: an immediate EOS leaves an empty transcript, on which Whisper's
    post-processing fails under mindtorch, stock and patched alike.)"""
    feats = _feats(1, seed=2)
    with whisper_accel.patched():
        runs = set()
        for seed in range(4):
            np.random.seed(seed)
            with torch.no_grad():
                out = model.generate(feats, max_new_tokens=10, min_new_tokens=3, temperature=1.5)
            runs.add(tuple(out.asnumpy().ravel()))
    assert len(runs) > 1
