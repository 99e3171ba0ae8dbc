"""Audio files as users have them: mp3, flac, 24-bit and stereo WAV, a truncated WAV.

Made from tests/data/short_fox.wav (16-bit mono espeak-ng speech) with ffmpeg (installed by
``./dev setup``). Stock's decoder is transformers' ``ffmpeg_read`` (what the ASR pipeline runs on
a file); :func:`whisper_accel.models.read_audio` (the CLI, bench and examples) must give the same
samples, and the patched model the same tokens / text as stock on them.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import mindnlp  # noqa: F401  (first: torch -> mindtorch before transformers)
import numpy as np
import pytest

import whisper_accel
from conftest import build_model

DATA = Path(__file__).parent / "data"
SOURCE = DATA / "short_fox.wav"
TRANSCRIPTS_KEY = "short_fox.wav"

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (./dev setup)")


def _stock_groups():
    """Stock code but for the CPU fixes stock needs to run a pipeline at all (mindtorch has no
    stft for the feature extractor): the ``compat`` group alone."""
    from whisper_accel.groups import NAMES

    return {name: name == "compat" for name in NAMES}


def _ffmpeg(src, dst, *args):
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(src), *args, str(dst)],
                   check=True, timeout=60)
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    raw = SOURCE.read_bytes()
    header = 44  # short_fox.wav: a canonical 44-byte PCM header
    assert raw[36:40] == b"data"
    files = {
        "wav16": SOURCE,
        "mp3": _ffmpeg(SOURCE, d / "fox.mp3"),
        "flac": _ffmpeg(SOURCE, d / "fox.flac"),
        "wav24": _ffmpeg(SOURCE, d / "fox24.wav", "-c:a", "pcm_s24le"),
    }
    with wave.open(str(SOURCE), "rb") as w:  # the same speech on both channels, interleaved
        rate, mono = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
    with wave.open(str(d / "fox_stereo.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.repeat(mono, 2).astype("<i2").tobytes())
    files["stereo"] = d / "fox_stereo.wav"
    cut = header + 2 * ((len(raw) - header) // 4)  # half the samples, the header still says all
    (d / "fox_cut.wav").write_bytes(raw[:cut])
    (d / "fox_cut_mid_sample.wav").write_bytes(raw[:cut + 1])
    files["truncated"], files["truncated_mid_sample"] = d / "fox_cut.wav", d / "fox_cut_mid_sample.wav"
    return files


def _stock_decode(path):
    """What the ASR pipeline does with a file name: transformers' ffmpeg_read of its bytes."""
    from transformers.pipelines.audio_utils import ffmpeg_read

    return ffmpeg_read(Path(path).read_bytes(), 16000)


@pytest.fixture(scope="module")
def reference_samples():
    from whisper_accel import models

    return models.read_audio(str(SOURCE))


@pytest.mark.parametrize("kind", ["flac", "wav24", "stereo"])
def test_lossless_formats_decode_to_the_16bit_samples(clips, reference_samples, kind):
    """flac and 24-bit WAV hold the same speech: the same samples as the 16-bit mono file, and
    as stock's decoder (ffmpeg). A 2-channel WAV decodes as the pipeline decodes it (ffmpeg's
    downmix, (L + R) / sqrt(2), clipped: the same speech at another gain)."""
    from whisper_accel import models

    got = models.read_audio(str(clips[kind]))
    stock = _stock_decode(clips[kind])
    assert got.size == stock.size
    np.testing.assert_allclose(got, stock, atol=1.5 / 32768)
    if kind == "stereo":
        assert got.size == reference_samples.size and np.corrcoef(got, reference_samples)[0, 1] > 0.999
    else:
        np.testing.assert_array_equal(got, reference_samples)


def test_mp3_decodes_like_stock(clips, reference_samples):
    from whisper_accel import models

    got = models.read_audio(str(clips["mp3"]))
    stock = _stock_decode(clips["mp3"])
    assert abs(got.size - stock.size) <= 1152  # one mp3 frame of encoder padding, at most
    n = min(got.size, stock.size)
    np.testing.assert_allclose(got[:n], stock[:n], atol=1.5 / 32768)
    n = min(got.size, reference_samples.size)
    assert np.corrcoef(got[:n], reference_samples[:n])[0, 1] > 0.9  # still the same speech


def test_truncated_wav_gives_the_samples_present_as_stock(clips, reference_samples):
    """A WAV cut short (the header still claims every sample): what is there is decoded, as
    ffmpeg (stock's decoder) does, not an error and not garbage."""
    from whisper_accel import models

    got = models.read_audio(str(clips["truncated"]))
    assert 0 < got.size < reference_samples.size
    np.testing.assert_array_equal(got, reference_samples[:got.size])
    stock = _stock_decode(clips["truncated"])
    assert stock.size == got.size
    np.testing.assert_allclose(got, stock, atol=1.5 / 32768)


def test_wav_truncated_mid_sample_decodes_or_names_the_file(clips, reference_samples):
    from whisper_accel import models

    path = str(clips["truncated_mid_sample"])
    try:
        got = models.read_audio(path)
    except (RuntimeError, OSError) as exc:  # a clear error naming the file is acceptable
        assert path in str(exc)
        return
    stock = _stock_decode(path)
    assert got.size == stock.size
    np.testing.assert_array_equal(got, reference_samples[:got.size])


@pytest.fixture(scope="module")
def narrow_model():
    """Whisper's vocabulary and 80 mels, narrow layers: stock generate takes seconds."""
    return build_model(seed=3, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, init_std=0.1)


@pytest.mark.parametrize("kind", ["mp3", "stereo", "truncated"])
def test_patched_tokens_equal_stock_on_decoded_files(clips, narrow_model, kind):
    import torch

    from whisper_accel import bench, models

    feats = bench.log_mel(None, models.read_audio(str(clips[kind])))
    with torch.no_grad():
        stock = narrow_model.generate(feats, max_new_tokens=6, min_new_tokens=6).asnumpy()
        with whisper_accel.patched():
            fast = narrow_model.generate(feats, max_new_tokens=6, min_new_tokens=6).asnumpy()
    np.testing.assert_array_equal(fast, stock)


# ----------------------------------------------------------------------------- the ASR pipeline
def _pipeline(model_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    proc = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
    return pipeline("automatic-speech-recognition", model=model, tokenizer=proc.tokenizer,
                    feature_extractor=proc.feature_extractor)


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - compared with stock's below
        return ("error", type(exc).__name__, str(exc))


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(600)
def test_pipeline_on_files_patched_equals_stock(tiny_en_dir, clips):
    """Each file name given to the ASR pipeline (decoded by ffmpeg inside transformers): the
    patched text equals stock's (compat only); the lossless ones say what the 16-bit file says.
    A raw stereo array is refused by the pipeline the same way patched and stock."""
    import json

    import torch

    expected = json.loads((DATA / "transcripts.json").read_text())[TRANSCRIPTS_KEY]["tiny_en"]
    asr = _pipeline(tiny_en_dir)
    kinds = ["mp3", "flac", "wav24"]  # stereo and truncated files: the generate tests above
    gen = {"generate_kwargs": {"num_beams": 1}}
    stereo = np.stack([np.zeros(16000, np.float32), np.zeros(16000, np.float32)])
    with torch.no_grad():
        with whisper_accel.patched(**_stock_groups()):
            stock = {k: asr(str(clips[k]), **gen)["text"] for k in kinds}
            stock_raw = _outcome(lambda: asr({"raw": stereo, "sampling_rate": 16000}, **gen))
        with whisper_accel.patched():
            fast = {k: asr(str(clips[k]), **gen)["text"] for k in kinds}
            fast_raw = _outcome(lambda: asr({"raw": stereo, "sampling_rate": 16000}, **gen))
    assert fast == stock
    for k in ("flac", "wav24"):
        assert fast[k] == expected, k
    assert "quick" in fast["mp3"] and "lazy" in fast["mp3"]  # lossy: tiny.en hears "lazy nog"
    assert fast_raw == stock_raw
