"""Version gating and capability probes. Unsupported stacks warn and stay stock."""

import warnings

import pytest

import whisper_accel
from whisper_accel import _environment
from whisper_accel._environment import check_versions, installed_version

from conftest import stack

GOOD = {"mindspore": "2.7.0", "mindnlp": "0.5.1", "transformers": "4.57.6"}


def test_versions_come_from_metadata_not_dunder_version(monkeypatch):
    import mindnlp

    assert installed_version("mindnlp") == stack()["mindnlp"]
    # MindNLP 0.5.1 says 0.5.0rc2 in __version__: why it is never read
    monkeypatch.setattr(mindnlp, "__version__", "0.0.0-bogus", raising=False)
    assert installed_version("mindnlp") == stack()["mindnlp"]


def test_tested_stack_is_supported():
    assert check_versions(GOOD) == []
    installed = {p: stack()[p] for p in GOOD}
    if check_versions(installed):
        pytest.skip(f"installed stack {installed} is outside the tested range")
    assert _environment.detect().supported
    assert _environment.detect().backend == stack()["backend"]


@pytest.mark.parametrize("package,version,needle", [
    ("mindnlp", "0.4.1", "cannot import on any MindSpore that PyPI offers"),
    ("mindspore", "2.8.0", "outside the tested range"),
    ("transformers", "5.0.0", "outside the tested range"),
    ("transformers", None, "transformers is not installed"),
    ("mindspore", "not-a-version", "unreadable version"),
])
def test_unsupported_versions_are_explained(package, version, needle):
    problems = check_versions({**GOOD, package: version})
    assert len(problems) == 1 and needle in problems[0]
    assert "pip install" in problems[0]  # actionable


def _fake(monkeypatch, **versions):
    table = {**GOOD, **versions}
    monkeypatch.setattr(_environment, "installed_version", lambda p: table.get(p))


def test_unsupported_stack_warns_and_leaves_stock(monkeypatch):
    from transformers.models.whisper import modeling_whisper as mw

    registry = mw.ALL_ATTENTION_FUNCTIONS
    _fake(monkeypatch, mindnlp="0.4.1")
    whisper_accel._errors.forget_warnings()
    with pytest.warns(whisper_accel.WhisperAccelWarning, match="0.4"):
        report = whisper_accel.patch()
    assert not whisper_accel.is_patched()
    assert report.applied == [] and report.skipped
    assert mw.ALL_ATTENTION_FUNCTIONS is registry


def test_unsupported_stack_raises_in_strict_mode(monkeypatch):
    _fake(monkeypatch, mindspore="2.10.0")
    with pytest.raises(whisper_accel.WhisperAccelError, match="2.10.0"):
        whisper_accel.patch(strict=True)
    assert not whisper_accel.is_patched()


def test_warns_once_per_problem(monkeypatch):
    _fake(monkeypatch, transformers="5.1.0")
    whisper_accel._errors.forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whisper_accel.patch()
        whisper_accel.patch()
    assert len([w for w in caught if issubclass(w.category, whisper_accel.WhisperAccelWarning)]) == 1


def test_probes_on_cpu_find_no_ascend_kernels():
    if stack()["backend"] != "CPU":
        pytest.skip("what the Ascend kernels' probes find is only known on CPU")
    caps = _environment.capabilities()
    assert caps == {"native_conv1d": False, "fused_flash_attention": False}


def test_conv1d_verdict_follows_its_probe():
    report = whisper_accel.patch()
    conv = [e for e in report.entries if e.group == "conv1d"]
    if stack()["native_conv1d"]:
        assert conv and conv[0].status == "applied"
    else:
        assert conv and conv[0].status == "skipped" and "Conv1DExt" in conv[0].reason
    status = whisper_accel.status()
    assert status["patched"] and any("attention" in a for a in status["applied"])
