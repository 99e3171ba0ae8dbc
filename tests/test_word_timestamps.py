"""Word-level timestamps (``return_token_timestamps=True``, pipeline ``return_timestamps="word"``).

Stock MindNLP fails them on CPU (mindtorch has no ``unique`` and refuses a 3-D reflect pad);
the ``compat`` group fixes both. The reference is real PyTorch + transformers on the same
weights and audio, in a separate process (tests/fixtures/pytorch_reference.py): same words,
times within one 20 ms frame.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")  # torch -> mindtorch before anything imports torch

import whisper_accel  # noqa: E402
from conftest import build_model, child_env, features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _median_filters():
    from transformers.models.whisper import generation_whisper as gw

    stock = gw._median_filter
    with whisper_accel.patched(compat=True):
        ours = gw._median_filter
    assert ours is not stock
    return stock, ours


@pytest.mark.parametrize("width", [1, 3, 7])
def test_median_filter_equals_stock_and_takes_3d(width):
    import torch

    stock, ours = _median_filters()
    x = np.random.default_rng(width).standard_normal((2, 3, 5, 40)).astype(np.float32)
    ref = stock(torch.tensor(x), width).asnumpy()  # stock runs on 4-D input
    np.testing.assert_array_equal(ours(torch.tensor(x), width).asnumpy(), ref)
    np.testing.assert_array_equal(ours(torch.tensor(x[0]), width).asnumpy(), ref[0])  # 3-D: stock fails
    with pytest.raises(ValueError, match="odd"):
        ours(torch.tensor(x), 4)
    short = torch.tensor(x[..., :1])
    assert ours(short, 7) is short  # shorter than the pad: unchanged, as stock


def _ts_model():
    """Whisper's vocabulary, 30 s of frames and 4 decoder layers (for the alignment heads), but
    narrow (d_model 64): stock's runs take seconds."""
    model = build_model(init_std=0.05, d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128)
    model.generation_config.alignment_heads = [[2, 2], [3, 0]]
    return model


def test_token_timestamps_with_an_attention_mask_work_patched():
    """An attention mask makes ``num_frames`` a tensor: stock calls ``torch.unique`` on it. With
    an all-ones mask the timestamps must be exactly those computed without a mask (an int
    ``num_frames``), and the tokens stock's own (plain ``generate`` runs on stock)."""
    import torch

    model = _ts_model()
    feats = features(2, seed=3)
    with torch.no_grad():
        stock_ids = model.generate(feats, max_new_tokens=5).asnumpy()  # unpatched
    mask = torch.tensor(np.ones((2, 3000), np.int64))
    with whisper_accel.patched(compat=True):
        with torch.no_grad():
            out = model.generate(feats, attention_mask=mask, max_new_tokens=5, return_token_timestamps=True)
            plain = model.generate(feats, max_new_tokens=5, return_token_timestamps=True)
    ts = out["token_timestamps"].asnumpy()
    np.testing.assert_array_equal(out["sequences"].asnumpy(), stock_ids)
    assert ts.shape == out["sequences"].shape and (np.diff(ts, axis=1) >= 0).all()
    np.testing.assert_array_equal(ts, plain["token_timestamps"].asnumpy())


def pytorch_generate(model, feats, tmp_path, **kwargs):
    """``model.generate(feats, **kwargs)`` on real PyTorch with the same weights
    (tests/fixtures/pytorch_generate.py): ``{"sequences", "token_timestamps"}`` as numpy."""
    model.save_pretrained(str(tmp_path / "model"))
    np.save(tmp_path / "feats.npy", feats.asnumpy())
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "pytorch_generate.py"),
                           str(tmp_path / "model"), str(tmp_path / "feats.npy"), json.dumps(kwargs)],
                          capture_output=True, text=True, timeout=180, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: np.asarray(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.subprocess
@pytest.mark.parametrize("groups", ["compat", "all"])
def test_token_timestamps_equal_pytorchs(tmp_path, groups):
    """Stock MindNLP cannot compute token timestamps on CPU: the reference is PyTorch +
    transformers on the same weights and features. Same tokens, times within one 20 ms frame,
    with the compat fixes alone (stock loops) and with every group (fast loops)."""
    import torch

    model = _ts_model()
    feats = features(2, seed=3)
    kw = dict(max_new_tokens=5, return_token_timestamps=True, return_dict_in_generate=True)
    ref = pytorch_generate(model, feats, tmp_path, attention_mask="ones", **kw)
    mask = torch.tensor(np.ones((2, 3000), np.int64))
    with whisper_accel.patched(**({"compat": True} if groups == "compat" else {})):
        with torch.no_grad():
            out = model.generate(feats, attention_mask=mask, **kw)
    np.testing.assert_array_equal(out["sequences"].asnumpy(), ref["sequences"])
    assert np.abs(out["token_timestamps"].asnumpy() - ref["token_timestamps"]).max() <= 0.02 + 1e-6


def pytorch_pipeline(model_dir, wav, pipeline_kwargs=None, call_kwargs=None):
    """The ASR pipeline's output on PyTorch + transformers (tests/fixtures/pytorch_reference.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "pytorch_reference.py"), model_dir,
                           str(DATA / wav), "--pipeline", json.dumps(pipeline_kwargs or {}),
                           "--call", json.dumps(call_kwargs or {})],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mindnlp_pipeline(model_dir, wav, pipeline_kwargs=None, call_kwargs=None, batches=None):
    """The pipeline's output here; ``batches`` (a list) receives each ``generate`` call's batch size."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    from fixtures.pytorch_reference import plain
    from whisper_accel import models

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    if batches is not None:
        generate = model.generate

        def spy(*args, **kwargs):  # on the instance: the class's (patched) method is left alone
            features = kwargs.get("input_features", args[0] if args else None)
            batches.append(int(features.shape[0]))
            return generate(*args, **kwargs)

        model.generate = spy
    proc = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=proc.tokenizer,
                   feature_extractor=proc.feature_extractor, **(pipeline_kwargs or {}))
    return plain(asr({"raw": models.read_audio(str(DATA / wav)), "sampling_rate": models.SAMPLE_RATE},
                     **(call_kwargs or {})))


def assert_same_words(got, ref):
    assert got["text"] == ref["text"]
    assert [c["text"] for c in got["chunks"]] == [c["text"] for c in ref["chunks"]]
    times = np.array([c["timestamp"] for c in got["chunks"]], dtype=np.float64)
    ref_times = np.array([c["timestamp"] for c in ref["chunks"]], dtype=np.float64)
    assert np.abs(times - ref_times).max() <= 0.02 + 1e-9  # one 20 ms frame


@pytest.mark.timeout(900)
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.network
@pytest.mark.parametrize("beams", [1, 5], ids=["greedy", "beam5-pipeline-default"])
def test_pipeline_word_timestamps_match_pytorch(tiny_en_dir, beams):
    from whisper_accel.runtime import calls

    call = {"return_timestamps": "word", "generate_kwargs": {"num_beams": beams}}
    ref = pytorch_pipeline(tiny_en_dir, "stella.wav", call_kwargs=call)
    calls.reset()
    with whisper_accel.patched():
        got = mindnlp_pipeline(tiny_en_dir, "stella.wav", call_kwargs=call)
    assert_same_words(got, ref)
    loop = "greedy loop" if beams == 1 else "beam search loop"
    assert calls.snapshot()[loop] == {"fast": 1, "stock": 0, "reasons": {}}  # on the fast path


@pytest.fixture(scope="module")
def aligned_model():
    model = build_model(init_std=0.05)
    model.generation_config.alignment_heads = [[2, 2], [3, 0], [3, 4]]
    return model


def _timestamps(model, feats, **kw):
    import torch

    with torch.no_grad():
        return model.generate(feats, attention_mask=torch.tensor(np.ones((feats.shape[0], 3000), np.int64)),
                              max_new_tokens=6, return_token_timestamps=True, return_dict_in_generate=True,
                              force_unique_generate_call=True, **kw)


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam2"])
def test_fast_loops_return_stocks_cross_attentions_and_timestamps(aligned_model, beams):
    """The loops' graphs return every step's per-layer cross-attentions: same structure and
    values as stock's (which computes them with output_attentions on), same token timestamps;
    the encoder and the loop stay on the fast path."""
    from whisper_accel.runtime import calls

    feats = features(2, seed=3)
    with whisper_accel.patched(compat=True, attention=False, compiled=False, generation=False, greedy=False,
                               beam=False, word_timestamps=False):
        stock = _timestamps(aligned_model, feats, num_beams=beams)
    calls.reset()
    with whisper_accel.patched():
        ours = _timestamps(aligned_model, feats, num_beams=beams)
    counts = calls.snapshot()
    loop = "greedy loop" if beams == 1 else "beam search loop"
    assert counts[loop] == {"fast": 1, "stock": 0, "reasons": {}}
    assert counts["encoder"]["stock"] == 0
    np.testing.assert_array_equal(ours["sequences"].asnumpy(), stock["sequences"].asnumpy())
    np.testing.assert_allclose(ours["token_timestamps"].asnumpy(), stock["token_timestamps"].asnumpy(), atol=1e-6)
    assert len(ours["cross_attentions"]) == len(stock["cross_attentions"])
    for ours_step, stock_step in zip(ours["cross_attentions"], stock["cross_attentions"]):
        assert len(ours_step) == len(stock_step) == aligned_model.config.decoder_layers
        for a, b in zip(ours_step, stock_step):
            assert a.shape == b.shape
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-6)
    assert ours.get("decoder_attentions") is None  # not asked for; stock returns them because it forces attentions on


def test_asking_for_attentions_keeps_stock(aligned_model):
    from whisper_accel.runtime import calls

    calls.reset()
    with whisper_accel.patched():
        out = _timestamps(aligned_model, features(1, seed=3), output_attentions=True)
    assert out.get("decoder_attentions") is not None
    reasons = calls.snapshot()["greedy loop"]["reasons"]
    assert list(reasons) and "output_attentions" in list(reasons)[0]


def test_without_the_loops_the_group_leaves_attentions_to_stock(aligned_model):
    """Without the greedy/beam loops, the stock loop computes attentions itself: its output has
    the decoder attentions, and tokens, timestamps and cross-attentions are those of the
    compat-only run (stock code throughout but for the CPU fixes: the reference used above)."""
    feats = features(1, seed=3)
    with whisper_accel.patched(compat=True, attention=False, compiled=False, generation=False, greedy=False,
                               beam=False, word_timestamps=False):
        stock = _timestamps(aligned_model, feats)
    with whisper_accel.patched(greedy=False, beam=False):
        out = _timestamps(aligned_model, feats)
    assert out.get("decoder_attentions") is not None
    assert len(out["decoder_attentions"]) == len(stock["decoder_attentions"])
    np.testing.assert_array_equal(out["sequences"].asnumpy(), stock["sequences"].asnumpy())
    np.testing.assert_allclose(out["token_timestamps"].asnumpy(), stock["token_timestamps"].asnumpy(), atol=1e-6)
    for ours_step, stock_step in zip(out["cross_attentions"], stock["cross_attentions"]):
        for a, b in zip(ours_step, stock_step):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(900)
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.network
def test_chunked_pipeline_with_a_partial_last_batch_matches_pytorch(tiny_en_dir):
    """``chunk_length_s`` with ``batch_size``: windows decoded as a batch of windows x 5 beams per
    graph launch; 32.7 s in 10 s chunks with ``batch_size=3`` leaves a smaller last batch. Stock
    takes minutes here: the reference is PyTorch (same text and chunk timestamps)."""
    from whisper_accel.runtime import calls

    pipe, call = {"chunk_length_s": 10, "batch_size": 3}, {"return_timestamps": True}
    ref = pytorch_pipeline(tiny_en_dir, "long_form.wav", pipe, call)
    calls.reset()
    batches = []
    with whisper_accel.patched():
        got = mindnlp_pipeline(tiny_en_dir, "long_form.wav", pipe, call, batches)
    assert got == ref
    assert len(batches) >= 2 and batches[:-1] == [3] * (len(batches) - 1) and 0 < batches[-1] < 3, batches
    counts = calls.snapshot()["beam search loop"]
    assert counts["stock"] == 0 and counts["fast"] >= len(batches), counts
