"""Shared fixtures: seeded random-weight Whisper models with real tiny dimensions.

MindNLP is imported before transformers (it redirects ``torch`` to mindtorch). Every test
leaves whisper_accel unpatched, whatever it did.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
os.environ.pop("WHISPER_ACCEL", None)  # tests patch explicitly; never via the environment
os.environ.pop("WHISPER_ACCEL_PROBE_CACHE", None)
# The probe cache of this session (and of its subprocesses): empty at start, never the user's.
_CACHE_DIR = tempfile.mkdtemp(prefix="whisper_accel_test_cache_")
os.environ["WHISPER_ACCEL_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, True)

import whisper_accel  # noqa: E402

TINY = dict(vocab_size=51865, d_model=384, encoder_layers=4, decoder_layers=4,
            encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
            decoder_ffn_dim=1536, num_mel_bins=80, max_source_positions=1500,
            max_target_positions=448)


def child_env(**extra: str) -> dict:
    """Environment for a child Python: none of the ``WHISPER_ACCEL*`` activation variables of
    this process, but this session's probe cache directory (not the user's), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_ACCEL")}
    env["WHISPER_ACCEL_CACHE_DIR"] = _CACHE_DIR
    env.update(extra)
    return env


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


def greedy(model, feats, tokens: int = 8, **kwargs):
    """Token ids of ``model.generate`` forced to exactly ``tokens`` new tokens, no sampling;
    ``kwargs`` go to ``generate`` (``num_beams=2`` for beam search)."""
    import torch

    with torch.no_grad():
        out = model.generate(feats, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             **kwargs)
    return out.asnumpy()


@pytest.fixture(scope="session")
def tiny_model():
    return build_model()


@pytest.fixture(scope="session")
def feats():
    return features()


_STACK = {}


def stack():
    """The installed stack, as tests must expect it (never hard-coded): versions from
    distribution metadata, the MindSpore backend, and whether the native conv1d probe passes."""
    if not _STACK:
        import importlib.metadata as md

        from whisper_accel import _environment

        _STACK.update({p: md.version(p) for p in ("mindspore", "mindnlp", "transformers")})
        _STACK["backend"] = _environment.device_target()
        _STACK["native_conv1d"] = _environment.has_native_conv1d()
    return _STACK


def register_group(monkeypatch, name, build, *, first=False, gates=None):
    """Put a fake group module ``name`` (``patches = build``) into the registry for one test,
    before or after the real groups."""
    import types

    from whisper_accel import _api
    from whisper_accel._environment import Gates

    module = types.SimpleNamespace(GATES=gates or Gates(), SUMMARY="test group", patches=build)
    real_load = _api.load
    monkeypatch.setattr(_api, "NAMES", (name,) + _api.NAMES if first else _api.NAMES + (name,))
    monkeypatch.setattr(_api, "load", lambda n: module if n == name else real_load(n))
    return module


_TARGETS = []


def patch_targets():
    """``(owner, attribute)`` of every patch every group that applies here would make (read
    once per session, so a test that breaks detection still compares against the real list)."""
    from whisper_accel import _api, _environment
    from whisper_accel._errors import Unsupported
    from whisper_accel.groups import NAMES

    if not _TARGETS:
        env = _environment.detect()
        for name in NAMES:
            try:
                _TARGETS.extend((p.owner, p.attribute) for p in _api.group_patches(name, env))
            except Unsupported:
                continue
    return list(_TARGETS)


def stock_snapshot():
    """What each patch target holds now (own attribute, or MISSING): compare before/after."""
    from whisper_accel._patcher import MISSING

    return {(id(o), a): (o, a, vars(o).get(a, MISSING)) for o, a in patch_targets()}


def assert_same_snapshot(before):
    after = stock_snapshot()
    assert after.keys() == before.keys()
    for key, (owner, attribute, obj) in before.items():
        assert after[key][2] is obj, f"{owner}.{attribute} changed"


@pytest.fixture(autouse=True)
def _always_unpatched():
    from whisper_accel import _errors

    whisper_accel.unpatch()
    _errors.forget_warnings()
    yield
    whisper_accel.unpatch()
    _errors.set_strict(False)
    _errors.forget_warnings()


@pytest.fixture(scope="session")
def tiny_en_dir(tmp_path_factory):
    """Real Whisper tiny.en weights as a Hugging Face folder (tests/fixtures/ct2_to_hf.py)."""
    from fixtures.ct2_to_hf import convert

    return convert(str(tmp_path_factory.mktemp("whisper-tiny.en")))


#: Languages of the multilingual generation config below (ids as in OpenAI's multilingual vocabulary).
LANGUAGES = ("en", "zh", "de", "es", "ru", "ko", "fr", "ja")


def multilingual(model, alignment_heads=((2, 2), (3, 0))):
    """Give a random tiny-dimension Whisper a multilingual generation config (OpenAI's token ids:
    start 50258, languages from 50259, translate 50358 / transcribe 50359, no-timestamps 50363)."""
    gc = model.generation_config
    gc.decoder_start_token_id, gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = 50258, 50257, 50257, 50257
    gc.no_timestamps_token_id, gc.prev_sot_token_id, gc.is_multilingual = 50363, 50361, True
    gc.lang_to_id = {f"<|{code}|>": 50259 + i for i, code in enumerate(LANGUAGES)}
    gc.task_to_id = {"translate": 50358, "transcribe": 50359}
    gc.begin_suppress_tokens, gc.suppress_tokens = [220, 50257], [1, 2, 7]
    gc.max_initial_timestamp_index = 50
    gc.alignment_heads = [list(h) for h in alignment_heads]
    return model
