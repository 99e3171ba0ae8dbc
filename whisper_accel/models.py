"""Models and inputs for benchmarks and examples, without network.

* :func:`random_model`: a seeded random-weight Whisper with the real dimensions of an OpenAI
  checkpoint (``tiny`` ... ``large-v3``, ``large-v3-turbo``, ``distil-large-v3``: :data:`CONFIGS`),
  for speed and equivalence measurements.
* :func:`load_model`: a local Hugging Face Whisper folder (``from_pretrained`` offline).
* :func:`float32_copy`: a float32 model with a half-precision model's weights (a reference).
* :func:`read_audio`: a WAV (standard library) or any format ffmpeg reads, as 16 kHz mono
  float32; :func:`synthetic_audio`: a seeded 30 s signal for the built-in default.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from typing import Dict, Optional

import numpy as np

SAMPLE_RATE = 16000

#: Dimensions of Whisper checkpoints: d_model, encoder/decoder layers, heads, ffn, mel bins,
#: vocabulary. ``large-v3-turbo`` (OpenAI) and ``distil-large-v3`` (Hugging Face distillation)
#: keep large-v3's 32-layer encoder and shrink the decoder to 4 and 2 layers.
CONFIGS: Dict[str, Dict[str, int]] = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, heads=6, ffn=1536, mels=80,
                 vocab=51865),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, heads=8, ffn=2048, mels=80,
                 vocab=51865),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, heads=12, ffn=3072, mels=80,
                  vocab=51865),
    "medium": dict(d_model=1024, encoder_layers=24, decoder_layers=24, heads=16, ffn=4096, mels=80,
                   vocab=51865),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, ffn=5120,
                     mels=128, vocab=51866),
    "large-v3-turbo": dict(d_model=1280, encoder_layers=32, decoder_layers=4, heads=20, ffn=5120,
                           mels=128, vocab=51866),
    "distil-large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=2, heads=20, ffn=5120,
                            mels=128, vocab=51866),
}


def whisper_config(name: str, **overrides):
    """A ``WhisperConfig`` with the dimensions of :data:`CONFIGS` ``[name]``; ``overrides`` are
    ``WhisperConfig`` fields that replace them (e.g. ``encoder_layers=1`` for a fast test
    model with the same mel bins, vocabulary and head size)."""
    import mindnlp  # noqa: F401  (torch -> mindtorch before transformers)
    from transformers import WhisperConfig

    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    c = CONFIGS[name]
    kw = dict(vocab_size=c["vocab"], d_model=c["d_model"], encoder_layers=c["encoder_layers"],
              decoder_layers=c["decoder_layers"], encoder_attention_heads=c["heads"],
              decoder_attention_heads=c["heads"], encoder_ffn_dim=c["ffn"],
              decoder_ffn_dim=c["ffn"], num_mel_bins=c["mels"], max_source_positions=1500,
              max_target_positions=448)
    kw.update(overrides)
    return WhisperConfig(**kw)


def random_model(name: str = "tiny", seed: int = 0, dtype: Optional[str] = None, **overrides):
    """A seeded random-weight WhisperForConditionalGeneration in eval mode: :data:`CONFIGS`
    ``[name]`` dimensions, ``overrides`` as in :func:`whisper_config`, cast to ``dtype``."""
    import torch
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(whisper_config(name, **overrides)).eval()
    if dtype and dtype != "float32":
        model = model.to(getattr(torch, dtype))
    return model


def float32_copy(model):
    """A float32 copy of a (float16/bfloat16) Whisper ``model`` holding its weights upcast --
    the same rounded values -- and its generation config: the reference a half-precision model
    is checked against where stock cannot run it (stock MindNLP cannot on CPU). Costs one
    float32 copy of the weights while it is kept."""
    import copy

    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover  (transformers moved it)
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():  # the weights are overwritten: skip the random initialisation
        ref = type(model)(copy.deepcopy(model.config)).eval()
    # state_dict + float(), not .to(float32): mindtorch's Module.to skips bfloat16 tensors
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref.generation_config = copy.deepcopy(model.generation_config)
    return ref


def load_model(path: str, dtype: Optional[str] = None):
    """A local Hugging Face Whisper folder, loaded offline. Clear errors for bad folders."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} is not a Hugging Face model folder (no config.json)")
    import mindnlp  # noqa: F401
    import torch
    from transformers import WhisperForConditionalGeneration

    kwargs = {"local_files_only": True}
    if dtype and dtype != "float32":
        kwargs["torch_dtype"] = getattr(torch, dtype)
    return WhisperForConditionalGeneration.from_pretrained(path, **kwargs).eval()


def synthetic_audio(seconds: float = 30.0, seed: int = 0) -> np.ndarray:
    """Seeded speech-band noise with a slow envelope: deterministic, 16 kHz float32."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t)
    tone = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 440.0, 880.0)) / 3
    return (0.1 * envelope * (tone + 0.3 * rng.standard_normal(n))).astype(np.float32)


def read_audio(path: str) -> np.ndarray:
    """Decode ``path`` to 16 kHz mono float32 in [-1, 1].

    16-bit mono PCM WAV is read with the standard library and resampled here (a file cut
    mid-frame: its whole frames); anything else, and several channels when ``ffmpeg`` is
    installed (its downmix is what transformers' pipeline reads), goes through ``ffmpeg``
    (Debian package ``ffmpeg``), which must then be installed.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file {path!r} does not exist")
    try:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                raise wave.Error("not 16-bit")
            rate, channels = w.getframerate(), w.getnchannels()
            if channels != 1 and shutil.which("ffmpeg") is not None:
                # ffmpeg's downmix, as transformers' pipeline decodes the same file
                raise wave.Error("several channels")
            raw = w.readframes(w.getnframes())
        raw = raw[: len(raw) // (2 * channels) * (2 * channels)]  # a file cut mid-frame: the whole frames
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32)
        audio = data.reshape(-1, channels).mean(axis=1) / 32768.0
        audio = resample(audio, rate, SAMPLE_RATE)
    except (wave.Error, EOFError):
        audio = _ffmpeg_decode(path)
    if audio.size == 0:
        raise ValueError(f"audio file {path!r} contains no samples")
    return audio.astype(np.float32)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by FFT (scipy when present, else linear interpolation)."""
    if rate == target or audio.size == 0:
        return audio
    n = int(round(audio.size * target / rate))
    try:
        from scipy.signal import resample_poly

        g = np.gcd(rate, target)
        return resample_poly(audio, target // g, rate // g).astype(np.float32)[:n]
    except ImportError:
        x = np.linspace(0, audio.size - 1, n)
        return np.interp(x, np.arange(audio.size), audio).astype(np.float32)


def _ffmpeg_decode(path: str) -> np.ndarray:
    if shutil.which("ffmpeg") is None:
        raise RuntimeError(f"cannot read {path!r}: not a 16-bit WAV and ffmpeg is not installed "
                           "(apt-get install ffmpeg)")
    # float32 out, as transformers' ffmpeg_read asks (the pipeline's decoder): the same samples,
    # and the same downmix of several channels (an integer format would rescale it)
    proc = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path, "-f", "f32le",
                           "-ac", "1", "-ar", str(SAMPLE_RATE), "-"], capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not decode {path!r}: {proc.stderr.decode().strip()}")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
