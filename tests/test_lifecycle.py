"""Lifecycle of the real patch(): many cycles, rollback at every step, patched() on errors, and
the version matrix (never breaks ``import whisper_accel``; warns once; strict raises).

Extends test_patch_model.py / test_patcher.py / test_environment.py without repeating them.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import warnings

import pytest

import whisper_accel
from whisper_accel import _api, _environment, _errors
from whisper_accel._errors import WhisperAccelError, WhisperAccelWarning
from whisper_accel._patcher import Patch, is_ours, wrapper_depth
from whisper_accel.groups import NAMES

from conftest import assert_same_snapshot, child_env, register_group, stock_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mw():
    import mindnlp  # noqa: F401
    from transformers.models.whisper import modeling_whisper

    return modeling_whisper


def snapshot():
    return {"registry": mw().ALL_ATTENTION_FUNCTIONS, "targets": stock_snapshot()}


def assert_stock(before):
    assert not whisper_accel.is_patched()
    assert _api.originals() == []
    assert mw().ALL_ATTENTION_FUNCTIONS is before["registry"]
    assert not is_ours(before["registry"])
    assert_same_snapshot(before["targets"])


def _cycle(before, groups):
    report = whisper_accel.patch(**groups)
    assert "attention" in report.groups_applied
    registry = mw().ALL_ATTENTION_FUNCTIONS
    assert wrapper_depth(registry) == 1
    assert registry.__wrapped__ is before["registry"]  # never a view of a view
    assert registry["sdpa"].__wrapped__ is before["registry"]["sdpa"]
    assert whisper_accel.unpatch() != []
    assert mw().ALL_ATTENTION_FUNCTIONS is before["registry"]


def _cycles(n, groups_for):
    before = snapshot()
    for i in range(20):  # warm caches (metadata, probes, logging) before measuring
        _cycle(before, groups_for(i))
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        for i in range(n):
            _cycle(before, groups_for(i))
            if i % 97 == 0:
                assert_stock(before)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_stock(before)
    # a leak of one registry view or report per cycle would be >> 100 kB
    assert end - start < 100_000, f"memory grew by {end - start} bytes over {n} cycles"


def _attention_only(i):
    return {g: g == "attention" for g in NAMES}


def test_300_real_cycles_attention_group_restore_identity_without_memory_growth():
    _cycles(300, _attention_only)


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_1000_real_cycles_all_groups_restore_identity_without_memory_growth():
    _cycles(1000, lambda i: {} if i % 2 else {"conv1d": False})


@pytest.mark.parametrize("where", ["builder", "make_first", "make_last", "setattr", "interrupt"])
def test_failure_at_each_step_leaves_everything_stock(monkeypatch, where):
    """The factory of the first/last patch raising, an owner refusing setattr, and a
    KeyboardInterrupt mid-apply: all roll back to stock, strict or not. A builder raising is a
    fault of that group alone: it stays stock, with one warning, and the others apply."""
    before = snapshot()
    m = mw()

    class Frozen:
        def __setattr__(self, name, value):
            raise AttributeError("read-only owner")

    def fail(original):
        raise (KeyboardInterrupt if where == "interrupt" else RuntimeError)("injected failure")

    def broken(env):
        if where == "builder":
            raise RuntimeError("injected failure")
        if where == "setattr":
            return [Patch("broken", Frozen(), "forward", lambda o: (lambda *a: None), kind="add")]
        return [Patch("broken", m.WhisperAttention, "forward", fail)]

    register_group(monkeypatch, "broken", broken, first=where == "make_first")
    if where == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            whisper_accel.patch()
    elif where == "builder":
        with pytest.warns(WhisperAccelWarning, match="left group 'broken' stock .*injected"):
            report = whisper_accel.patch()
        assert "attention" in report.groups_applied
        assert any(e.group == "broken" and "internal error" in e.reason for e in report.skipped)
        whisper_accel.unpatch()
        with pytest.raises(WhisperAccelError, match="injected"):
            whisper_accel.patch(strict=True)
    else:
        with pytest.warns(WhisperAccelWarning, match="restored stock"):
            report = whisper_accel.patch()
        assert report.applied == []
        with pytest.raises(WhisperAccelError):
            whisper_accel.patch(strict=True)
    assert_stock(before)
    # and a clean patch works afterwards
    register_group(monkeypatch, "broken", lambda env: [])
    whisper_accel.patch()
    assert whisper_accel.is_patched()


def test_patched_restores_on_exception_and_baseexception():
    before = snapshot()
    for exc in (ValueError, KeyboardInterrupt, SystemExit, GeneratorExit):
        with pytest.raises(exc):
            with whisper_accel.patched():
                assert whisper_accel.is_patched()
                raise exc()
        assert_stock(before)


def test_patched_nested_and_already_patched_keep_outer_state():
    before = snapshot()
    with whisper_accel.patched() as outer:
        view = mw().ALL_ATTENTION_FUNCTIONS
        with whisper_accel.patched() as inner:
            assert inner is outer
            assert mw().ALL_ATTENTION_FUNCTIONS is view
        assert whisper_accel.is_patched()  # the inner block did not unpatch the outer one
    assert_stock(before)
    whisper_accel.patch()
    with pytest.raises(RuntimeError):
        with whisper_accel.patched():
            raise RuntimeError
    assert whisper_accel.is_patched()  # patched before the block: stays patched


def test_patched_strict_failure_leaves_stock():
    before = snapshot()
    with pytest.raises(WhisperAccelError):
        with whisper_accel.patched(strict=True, conv1d=True):
            pytest.fail("body must not run")
    assert_stock(before)


def test_unpatch_is_idempotent_and_status_follows():
    assert whisper_accel.unpatch() == []
    whisper_accel.patch()
    assert whisper_accel.status()["patched"]
    assert len(whisper_accel.unpatch()) >= 1
    assert whisper_accel.unpatch() == []
    assert whisper_accel.status()["patched"] is False and whisper_accel.status()["applied"] == []


# ----------------------------------------------------------------------------- version matrix
MATRIX = [
    ({"mindspore": "2.4.1"}, "mindspore 2.4.1 is outside the tested range"),
    ({"mindspore": "2.8.0"}, "mindspore 2.8.0 is outside the tested range"),
    ({"mindspore": "3.0.0.dev1"}, "outside the tested range"),
    ({"mindnlp": "0.4.1"}, "cannot import on any MindSpore that PyPI offers"),
    ({"mindnlp": "0.6.0"}, "mindnlp 0.6.0 is outside the tested range"),
    ({"mindnlp": None}, "mindnlp is not installed"),
    ({"transformers": "4.55.4"}, "transformers 4.55.4 is outside the tested range"),
    ({"transformers": "4.58.0"}, "outside the tested range"),
    ({"transformers": "5.0.0"}, "outside the tested range"),
    ({"transformers": None}, "transformers is not installed"),
    ({"mindspore": None}, "mindspore is not installed"),
    ({"mindspore": "weird-build+cpu!"}, "unreadable version"),
]

_PROBE = textwrap.dedent("""
    import importlib.metadata as md, json, sys, warnings
    fake = json.loads(sys.argv[1])
    real = md.version
    def version(name):
        if name in fake:
            if fake[name] is None:
                raise md.PackageNotFoundError(name)
            return fake[name]
        return real(name)
    md.version = version
    warnings.simplefilter("always")
    import whisper_accel                      # must never raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = whisper_accel.patch()
        r2 = whisper_accel.patch()
    msgs = [str(w.message) for w in caught if w.category is whisper_accel.WhisperAccelWarning]
    try:
        whisper_accel.patch(strict=True)
        strict = None
    except whisper_accel.WhisperAccelError as exc:
        strict = str(exc)
    heavy = [m for m in ("mindspore", "mindnlp", "transformers") if m in sys.modules]
    print(json.dumps({"patched": whisper_accel.is_patched(), "warnings": msgs, "strict": strict,
                      "applied": len(r1.applied), "heavy": heavy}))
""")


@pytest.mark.subprocess
@pytest.mark.parametrize("fake,needle", MATRIX, ids=[json.dumps(f) for f, _ in MATRIX])
def test_version_matrix_in_a_fresh_interpreter(fake, needle):
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(fake)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["patched"] is False and out["applied"] == 0
    assert len(out["warnings"]) == 1, out["warnings"]  # once, not per call
    assert needle in out["warnings"][0] and "pip install" in out["warnings"][0]  # actionable
    assert out["strict"] and needle in out["strict"]
    assert out["heavy"] == []  # an unsupported stack is not even imported


def test_installed_version_raising_unexpectedly_does_not_break_patch(monkeypatch):
    """A broken metadata entry (not just a missing one) must still leave Whisper stock."""
    before = snapshot()

    def broken(package):
        raise OSError("corrupt METADATA")

    monkeypatch.setattr(_environment, "installed_version", broken)
    _errors.forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = whisper_accel.patch()
    assert report.applied == []
    assert any("corrupt METADATA" in str(w.message) for w in caught)
    assert_stock(before)
    with pytest.raises(WhisperAccelError, match="corrupt METADATA"):
        whisper_accel.patch(strict=True)
