"""Bad input gets a clear error naming the problem, and nothing is left half-patched."""

from __future__ import annotations

import os
import wave

import mindnlp  # noqa: F401  (first: torch -> mindtorch before transformers)
import numpy as np
import pytest

import whisper_accel
from whisper_accel import auto, models
from conftest import build_model, features, rel_diff

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SMALL = dict(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
             max_source_positions=50)


def _t(a):
    import torch

    return torch.tensor(a)


@pytest.fixture(scope="module")
def model():
    return build_model(seed=4, **SMALL)


def _still_fully_patched():
    from transformers.models.whisper import modeling_whisper as mw
    from whisper_accel._patcher import wrapper_depth

    assert whisper_accel.is_patched()
    assert wrapper_depth(mw.ALL_ATTENTION_FUNCTIONS) == 1


# ----------------------------------------------------------------------------- model input
SHAPE = "(batch, num_mel_bins=80, frames=100)"


@pytest.mark.parametrize("case,exc,needles", [
    ("rank2", ValueError, [f"input_features must be 3-D {SHAPE}; got shape (80, 100)", "features[None]"]),
    ("rank4", ValueError, [f"input_features must be 3-D {SHAPE}; got shape (1, 1, 80, 100)"]),
    ("int32", TypeError, ["must have the model's dtype mindspore.float32; got mindspore.int32", "features.to(model.dtype)"]),
    ("float64", TypeError, ["must have the model's dtype mindspore.float32; got mindspore.float64"]),
    ("float16", TypeError, ["must have the model's dtype mindspore.float32; got mindspore.float16"]),
    ("frames", ValueError, ["expects the mel input features to be of length 100", "found 99"]),
    ("mels", ValueError, [f"must be {SHAPE}; got 40 mel bins (shape (1, 40, 100))", "num_mel_bins"]),
])
def test_bad_features_into_patched_model(model, case, exc, needles):
    """Stock fails in MindSpore's conv operators with their own texts ("Conv2D ... shape size
    must be equal to 4, but got 3"); patched, the error names the expected shape/dtype and the
    fix, with the same exception class (a wrong mel count: ValueError, stock RuntimeError), and
    the model and patch stay usable afterwards."""
    import torch

    good = features(frames=100)
    bad = {"rank2": lambda: good[0], "rank4": lambda: good[None],
           "int32": lambda: good.to(torch.int32), "float64": lambda: good.double(),
           "float16": lambda: good.to(torch.float16),
           "frames": lambda: features(frames=99), "mels": lambda: features(frames=100, mel=40)}[case]()
    whisper_accel.patch()
    with torch.no_grad():
        with pytest.raises(exc) as info:
            model.model.encoder(bad).last_hidden_state.asnumpy()
        for needle in needles:
            assert needle in str(info.value)
        _still_fully_patched()
        fast = model.model.encoder(good).last_hidden_state.asnumpy()
    whisper_accel.unpatch()
    with torch.no_grad():
        stock = model.model.encoder(good).last_hidden_state.asnumpy()
    assert rel_diff(fast, stock) < 1e-4


# ----------------------------------------------------------------------------- adapter input
def _qkv(b=2, h=3, lq=4, lk=6, d=8):
    rng = np.random.default_rng(0)
    return [_t(rng.standard_normal(s).astype(np.float32))
            for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d))]


class _M:
    is_causal = False
    training = False


def _call(q, k, v, mask, impl="sdpa"):
    from whisper_accel.groups.attention import flash_attention_forward

    def stock(*a, **kw):
        raise AssertionError("bad input must not be handed to stock silently")

    return flash_attention_forward(_M(), q, k, v, mask, stock=stock, implementation=impl,
                                   scaling=None, is_causal=False)


@pytest.mark.parametrize("mask_shape,needle", [
    ((2, 5), "2-D padding mask must be (batch, key_length) = (2, 6), got (2, 5)"),
    ((3, 6), "2-D padding mask must be (batch, key_length) = (2, 6), got (3, 6)"),
    ((2, 1, 4, 5), "covers fewer keys than the 6 given"),
    ((3, 1, 4, 6), "does not broadcast to (batch, heads, query_length, key_length) = (2, 3, 4, 6)"),
    ((2, 2, 4, 6), "does not broadcast"),
    ((2, 1, 3, 6), "does not broadcast"),
    ((2, 4, 6), "must be 2-D or 4-D, got (2, 4, 6)"),
    ((6,), "must be 2-D or 4-D"),
])
def test_adapter_mask_of_wrong_shape(mask_shape, needle):
    q, k, v = _qkv()
    mask = _t(np.zeros(mask_shape, np.float32))
    with pytest.raises(ValueError) as info:
        _call(q, k, v, mask, impl="flash_attention_2" if len(mask_shape) == 2 else "sdpa")
    assert needle in str(info.value)


@pytest.mark.parametrize("change,needle", [
    ("rank3", "expects 4-D (batch, heads, length, head_dim)"),
    ("kv_mismatch", "key and value must be equal"),
    ("heads", "batch, heads and head_dim must agree"),
    ("dtype", "dtypes differ"),
    ("int", "must be floating point"),
])
def test_adapter_bad_qkv(change, needle):
    import torch

    q, k, v = _qkv()
    if change == "rank3":
        q = q[0]
    elif change == "kv_mismatch":
        v = _qkv(lk=5)[2]
    elif change == "heads":
        k, v = _qkv(h=2)[1:]
    elif change == "dtype":
        k = k.to(torch.float16)
    elif change == "int":
        q, k, v = (x.to(torch.int32) for x in (q, k, v))
    with pytest.raises(ValueError, match=None) as info:
        _call(q, k, v, None)
    assert needle in str(info.value)


# ----------------------------------------------------------------------------- audio
def _write_wav(path, samples, rate=16000, width=2, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, "<i2").tobytes())


def test_empty_audio_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.wav"
    _write_wav(path, [])
    with pytest.raises(ValueError, match="contains no samples"):
        models.read_audio(str(path))


def test_missing_and_garbage_audio(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.read_audio(str(tmp_path / "nope.wav"))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(RuntimeError, match="could not decode|ffmpeg is not installed"):
        models.read_audio(str(junk))


@pytest.mark.parametrize("name,rate", [("speech_8k.wav", 8000), ("speech_44k.wav", 44100)])
def test_non_16k_audio_is_resampled(name, rate):
    path = os.path.join(DATA, name)
    with wave.open(path, "rb") as w:
        assert w.getframerate() == rate  # the fixture really is non-16 kHz
        seconds = w.getnframes() / rate
    audio = models.read_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - seconds * 16000) <= 2
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.01


def test_resampling_keeps_a_tone(tmp_path):
    rate = 8000
    t = np.arange(rate) / rate
    _write_wav(tmp_path / "tone.wav", (0.5 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2"), rate)
    audio = models.read_audio(str(tmp_path / "tone.wav"))
    assert audio.size == 16000
    peak = np.argmax(np.abs(np.fft.rfft(audio))) * 16000 / audio.size
    assert abs(peak - 440) < 2


# ----------------------------------------------------------------------------- model folders
def test_unreadable_model_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(str(empty))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(str(a_file))


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def test_model_folder_with_bad_config_or_no_weights(tmp_path):
    """A folder with a broken config.json or without weights: ``models.load_model`` raises what
    transformers' own ``from_pretrained`` raises (class and message), patched or not, and the
    message names the problem."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from conftest import TINY

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    WhisperConfig(**TINY).save_pretrained(str(no_weights))
    for folder, needle in ((broken, "config.json' is not a valid JSON file"),
                           (no_weights, "model.safetensors")):
        stock = _raised(lambda: WhisperForConditionalGeneration.from_pretrained(str(folder), local_files_only=True))
        ours = _raised(lambda: models.load_model(str(folder)))
        assert type(ours) is type(stock) is OSError
        assert str(ours) == str(stock) and needle in str(ours) and str(folder) in str(ours)
        with whisper_accel.patched():
            patched = _raised(lambda: models.load_model(str(folder)))
        assert type(patched) is OSError and str(patched) == str(stock)
    assert not whisper_accel.is_patched()


# ----------------------------------------------------------------------------- WHISPER_ACCEL
@pytest.mark.parametrize("value", ["attention;conv1d", "attention,,bogus", "2", "flash", ","])
def test_bad_whisper_accel_values_name_the_valid_ones(value):
    with pytest.raises(ValueError) as info:
        auto.parse(value)
    text = str(info.value)
    assert repr(value) in text and "1/true/all" in text and "attention" in text


@pytest.mark.parametrize("value,expected", [(" ALL ", {}), ("Attention", {"attention": True, "conv1d": False}),
                                            (" attention , conv1d ", {"attention": True, "conv1d": True})])
def test_whisper_accel_values_are_forgiving_about_case_and_spaces(value, expected):
    parsed = auto.parse(value)
    assert {k: parsed[k] for k in expected} == expected
    assert not any(v for k, v in parsed.items() if k not in expected)


def test_bad_value_install_warns_and_patches_nothing(monkeypatch):
    monkeypatch.setenv(auto.ENV, "atention")
    monkeypatch.delenv(auto.ENV_STRICT, raising=False)
    with pytest.warns(whisper_accel.WhisperAccelWarning, match="stays off"):
        assert auto.install() is False
    assert not whisper_accel.is_patched()
    monkeypatch.setenv(auto.ENV_STRICT, "1")
    with pytest.raises(SystemExit, match="atention"):
        auto.install()
    assert not whisper_accel.is_patched()
