"""Shared fixtures: seeded random-weight Whisper models with real tiny dimensions.

MindNLP is imported before transformers (it redirects ``torch`` to mindtorch). Every test
leaves whisper_accel unpatched, whatever it did.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
os.environ.pop("WHISPER_ACCEL", None)  # tests patch explicitly; never via the environment

import whisper_accel  # noqa: E402

TINY = dict(vocab_size=51865, d_model=384, encoder_layers=4, decoder_layers=4,
            encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
            decoder_ffn_dim=1536, num_mel_bins=80, max_source_positions=1500,
            max_target_positions=448)


def build_model(seed: int = 0, **overrides):
    import mindnlp  # noqa: F401
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(**{**TINY, **overrides})
    return WhisperForConditionalGeneration(cfg).eval()


#: A 2-layer, 300-token Whisper for the compiled/generation tests: compiles and runs in seconds.
MINI = dict(vocab_size=300, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_source_positions=64, max_target_positions=64, decoder_start_token_id=1,
            pad_token_id=0, bos_token_id=2, eos_token_id=3)


def mini_model(seed: int = 0, **overrides):
    """Seeded :data:`MINI` Whisper (``overrides`` replace config fields), in eval mode."""
    return build_model(seed, **{**MINI, **overrides})


def features(batch: int = 1, frames: int = 3000, seed: int = 1, mel: int = 80):
    import mindnlp  # noqa: F401
    import torch

    rng = np.random.default_rng(seed)
    return torch.tensor(rng.standard_normal((batch, mel, frames)).astype(np.float32))


def rel_diff(a, b) -> float:
    a = np.asarray(a.asnumpy() if hasattr(a, "asnumpy") else a, dtype=np.float64)
    b = np.asarray(b.asnumpy() if hasattr(b, "asnumpy") else b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def greedy(model, feats, tokens: int = 8):
    import torch

    with torch.no_grad():
        out = model.generate(feats, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out.asnumpy()


@pytest.fixture(scope="session")
def tiny_model():
    return build_model()


@pytest.fixture(scope="session")
def feats():
    return features()


@pytest.fixture(autouse=True)
def _always_unpatched():
    whisper_accel.unpatch()
    yield
    whisper_accel.unpatch()
