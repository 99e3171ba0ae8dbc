"""Decoder attention masks with padding on the fast loops (issue #11 item 4).

Batched long-form with ``condition_on_prev_tokens=True`` left-pads each window's previous
tokens to the longest row and passes ``decoder_attention_mask = ids != pad``: stock embeds
positions ``cumsum(mask) - 1`` and masks the padded slots. The greedy and beam loops take it
(``whisper_accel.runtime.padding``) and must give stock's sequences and scores.
"""

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)

from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList  # noqa: E402

import whisper_accel  # noqa: E402
from conftest import build_model, features, mini_model, multilingual  # noqa: E402
from whisper_accel.runtime import calls, padding  # noqa: E402
from whisper_accel.runtime.padding import DecoderPadding  # noqa: E402

N_MELS, FRAMES = 16, 128


def _stock_positions(mask: np.ndarray, steps: int) -> np.ndarray:
    """What stock's ``prepare_inputs_for_generation`` embeds at every slot after ``steps``
    generated tokens (the mask grows by a 1 per step)."""
    full = np.concatenate([mask, np.ones((mask.shape[0], steps), mask.dtype)], 1)
    pos = full.cumsum(-1) - 1
    pos[full == 0] = 1
    return pos


@pytest.mark.parametrize("mask", [[[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]],
                                  [[1, 0, 1, 0, 1], [1, 1, 1, 1, 1]]], ids=["left", "left-both", "holes"])
def test_positions_and_keys_follow_stock(mask):
    mask = np.array(mask)
    pad = DecoderPadding(mask)
    want = _stock_positions(mask, 7)
    np.testing.assert_array_equal(pad.positions(0, 5), want[:, :5])  # the prefill
    for step in range(7):  # then one token per step
        np.testing.assert_array_equal(pad.positions(5 + step, 1), want[:, 5 + step:6 + step])
    keys = pad.keys(16)
    assert keys.shape == (2, 16) and keys.dtype == np.bool_
    np.testing.assert_array_equal(keys[:, :5], mask == 1)
    assert keys[:, 5:].all()


@pytest.fixture(scope="module")
def model():
    return mini_model(init_std=0.3, max_target_positions=64)


def _ids_and_mask():
    # rows: 2 pads then a 3-token prompt; no padding; 3 pads then 2 tokens
    ids = np.array([[0, 0, 1, 9, 17], [1, 4, 5, 6, 8], [0, 0, 0, 1, 21]], np.int64)
    return torch.tensor(ids), torch.tensor((ids != 0).astype(np.int64))


def _generate(model, **kw):
    """``GenerationMixin.generate`` (below Whisper's own, which builds masks only in long-form)
    with left-padded decoder ids and their mask."""
    ids, mask = _ids_and_mask()
    rng = np.random.default_rng(4)
    feats = torch.tensor((3 * rng.standard_normal((3, N_MELS, FRAMES))).astype(np.float32))
    with torch.no_grad():
        return GenerationMixin.generate(model, feats, decoder_input_ids=ids, decoder_attention_mask=mask,
                                        max_new_tokens=10, do_sample=False, **kw)


@pytest.mark.parametrize("beams", [1, 2, 4], ids=["greedy", "beam2", "beam4"])
def test_padded_mask_equals_stock_on_the_fast_loop(model, beams, monkeypatch):
    kw = dict(num_beams=beams, return_dict_in_generate=True, output_scores=True)
    stock = _generate(model, **kw)
    seen = []
    real = padding.from_kwargs
    monkeypatch.setattr(padding, "from_kwargs", lambda *a: seen.append(real(*a)) or seen[-1])
    calls.reset()
    with whisper_accel.patched():
        ours = _generate(model, **kw)
    loop = "beam search loop" if beams > 1 else "greedy loop"
    assert calls.snapshot()[loop] == {"fast": 1, "stock": 0, "reasons": {}}
    assert len(seen) == 1 and isinstance(seen[0], DecoderPadding)
    np.testing.assert_array_equal(ours.sequences.asnumpy(), stock.sequences.asnumpy())
    assert len(ours.scores) == len(stock.scores) == 10  # one per new token, none dropped
    for a, b in zip(ours.scores, stock.scores):
        a, b = a.asnumpy(), b.asnumpy()
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))  # the same tokens suppressed
        # measured spread on this model: max |ours - stock| 2.5e-5 (greedy), 3.2e-5 (beams 2, 4)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    if beams > 1:
        np.testing.assert_allclose(ours.sequences_scores.asnumpy(), stock.sequences_scores.asnumpy(), atol=1e-4)


def test_padding_changes_the_result(model):
    """The mask matters on this model: the same ids without it decode differently (so the test
    above would catch a loop that ignored it)."""
    ids, mask = _ids_and_mask()
    masked = _generate(model).asnumpy()
    rng = np.random.default_rng(4)
    feats = torch.tensor((3 * rng.standard_normal((3, N_MELS, FRAMES))).astype(np.float32))
    with torch.no_grad():
        plain = GenerationMixin.generate(model, feats, decoder_input_ids=ids, max_new_tokens=10,
                                         do_sample=False).asnumpy()
    assert (masked[[0, 2]] != plain[[0, 2]]).any()
    np.testing.assert_array_equal(masked[1], plain[1])  # the unpadded row is the same


def test_mask_of_another_shape_takes_the_stock_loop(model):
    ids, mask = _ids_and_mask()
    why = padding.usable(mask[:, 1:], ids)
    assert why is not None and "shape" in why
    assert "values" in padding.usable(mask * 2, ids)
    assert padding.usable(mask, ids) is None


class _EndSecondClipEarly(LogitsProcessor):
    """Ends the second clip's segments after 3 tokens (random weights never say EOS), so the
    clips' previous tokens differ in length and the next window's are left-padded."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] < 7:
            return scores
        out = scores.asnumpy().copy()
        half = out.shape[0] // 2
        out[half:] = -np.inf
        out[half:, 50257] = 0.0
        return torch.tensor(out)


@pytest.mark.slow
@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam2"])
def test_batched_long_form_conditioned_on_previous_tokens(beams, monkeypatch):
    """The user-level case: two clips of different length in one long-form batch with
    ``condition_on_prev_tokens=True``; the later windows carry left-padded previous tokens."""
    m = multilingual(build_model(init_std=0.05))
    feats = features(2, frames=6000, seed=11)
    att = np.ones((2, 6000), np.int64)
    att[1, 4400:] = 0
    kw = dict(attention_mask=torch.tensor(att), return_timestamps=True, condition_on_prev_tokens=True,
              language="en", max_new_tokens=10, num_beams=beams,
              logits_processor=LogitsProcessorList([_EndSecondClipEarly()]))
    with torch.no_grad():
        stock = m.generate(feats, **kw).asnumpy()
    seen = []
    real = padding.from_kwargs
    monkeypatch.setattr(padding, "from_kwargs", lambda *a: seen.append(real(*a)) or seen[-1])
    calls.reset()
    with whisper_accel.patched(), torch.no_grad():
        ours = m.generate(feats, **kw).asnumpy()
    np.testing.assert_array_equal(ours, stock)
    loop = "beam search loop" if beams > 1 else "greedy loop"
    counts = calls.snapshot()[loop]
    assert counts["fast"] >= 2 and counts["stock"] == 0, counts
    assert any(isinstance(p, DecoderPadding) for p in seen), "no window had padded previous tokens"
