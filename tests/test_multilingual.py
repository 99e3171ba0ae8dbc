"""Multilingual checkpoints (issue #11 items 4 and 5): language detection (``language=None``),
``task="translate"``, prompts; patched equals stock and every entry point stays on the fast path.

A random model with Whisper tiny's dimensions and a multilingual generation config
(conftest.multilingual): detection is the argmax over the language tokens of one decoder step on
the start token, which Whisper runs with ``use_cache=False``.
"""

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)

import whisper_accel  # noqa: E402
from conftest import LANGUAGES, build_model, features, multilingual  # noqa: E402
from whisper_accel.runtime import calls  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return multilingual(build_model(init_std=0.05))


CASES = {
    "detect": dict(),
    "detect-beam2": dict(num_beams=2),
    "detect-timestamps": dict(return_timestamps=True),
    "translate-de": dict(language="de", task="translate"),
    "prompt": dict(language="en", prompt_ids=np.array([50361, 400, 401, 402])),
    "prompt-all-segments": dict(language="en", prompt_ids=np.array([50361, 400, 401]),
                                prompt_condition_type="all-segments", condition_on_prev_tokens=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_stock_on_the_fast_path(model, case):
    kw = dict(CASES[case])
    if "prompt_ids" in kw:
        kw["prompt_ids"] = torch.tensor(kw["prompt_ids"])
    feats = features(1 if "prompt" in case else 2, seed=3)
    with torch.no_grad():
        stock = model.generate(feats, max_new_tokens=6, **kw).asnumpy()
        calls.reset()
        with whisper_accel.patched():
            ours = model.generate(feats, max_new_tokens=6, **kw).asnumpy()
    np.testing.assert_array_equal(ours, stock)
    counts = calls.snapshot()
    assert all(c["stock"] == 0 for c in counts.values()), counts
    loop = "beam search loop" if kw.get("num_beams", 1) > 1 else "greedy loop"
    assert counts[loop]["fast"] == 1


def test_detected_language_equals_stock(model):
    feats = features(2, seed=5)
    with torch.no_grad():
        stock = model.detect_language(feats).asnumpy()
        calls.reset()
        with whisper_accel.patched():
            ours = model.detect_language(feats).asnumpy()
    np.testing.assert_array_equal(ours, stock)
    assert set(int(i) for i in ours.ravel()) <= {50259 + i for i in range(len(LANGUAGES))}
    assert calls.snapshot()["decoder step"] == {"fast": 1, "stock": 0, "reasons": {}}


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam2"])
def test_long_form_conditioned_on_previous_tokens(model, beams):
    """Sequential long-form (> 30 s) with ``condition_on_prev_tokens=True``: each window after
    the first starts with the previous window's tokens, a multi-token prefill in one graph."""
    feats = features(1, frames=4600, seed=7)
    kw = dict(attention_mask=torch.tensor(np.ones((1, 4600), np.int64)), return_timestamps=True,
              condition_on_prev_tokens=True, language="en", max_new_tokens=8, num_beams=beams)
    with torch.no_grad():
        stock = model.generate(feats, **kw).asnumpy()
        calls.reset()
        with whisper_accel.patched():
            ours = model.generate(feats, **kw).asnumpy()
    np.testing.assert_array_equal(ours, stock)
    counts = calls.snapshot()
    loop = "beam search loop" if beams > 1 else "greedy loop"
    assert counts[loop]["fast"] >= 2 and counts[loop]["stock"] == 0, counts
