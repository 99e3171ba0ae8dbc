"""Probe verdicts cached on disk per machine and stack (issue #13, start-up).

Every test points ``WHISPER_ACCEL_CACHE_DIR`` at its own empty directory; the session's own
cache (conftest) is never the user's either.
"""

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import whisper_accel
from whisper_accel import _environment, _probe_cache

from conftest import child_env, clean_env_vars, stack

ROOT = Path(__file__).resolve().parents[1]
NAME = "native_conv1d"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of this test's own, the cache switched on."""
    clean_env_vars(monkeypatch)  # no WHISPER_ACCEL* of the shell that ran pytest
    directory = tmp_path / "cache"
    monkeypatch.setenv(_probe_cache.ENV_DIR, str(directory))
    monkeypatch.delenv(_probe_cache.ENV_SWITCH, raising=False)
    static = _environment._machine_and_stack  # a test may replace it
    static.cache_clear()
    yield directory
    static.cache_clear()


@pytest.fixture
def counted(monkeypatch):
    """Replace the conv1d probe by one that counts its calls; ``verdict[0]`` is its answer."""
    calls, verdict = [], [True]
    monkeypatch.setitem(_environment.PROBES, NAME,
                        (lambda: calls.append(1) or verdict[0], "no fake kernel"))
    return calls, verdict


def stored(key=None):
    path = _probe_cache.path_for(key or _environment.probe_cache_key())
    return json.loads(path.read_text())


def test_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(_probe_cache.ENV_DIR, str(tmp_path / "a"))
    assert _probe_cache.directory() == tmp_path / "a"
    monkeypatch.delenv(_probe_cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _probe_cache.directory() == tmp_path / "xdg" / "whisper_accel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _probe_cache.directory() == Path.home() / ".cache" / "whisper_accel"


def test_key_names_the_stack_backend_and_machine(cache):
    key = _environment.probe_cache_key()
    for package in ("mindspore", "mindnlp", "transformers"):
        assert key["versions"][package] == stack()[package]
    assert key["whisper_accel"] == whisper_accel.__version__
    assert key["backend"] == stack()["backend"]
    assert key["probe_code"] == _environment.PROBE_CODE_VERSION
    for field in ("python", "machine", "node", "device_id", "toolkit"):
        assert field in key
    json.dumps(key)  # it is what the file stores


def test_hit_skips_the_probe(cache, counted):
    calls, _ = counted
    assert _environment.probe(NAME) is True and len(calls) == 1
    assert stored()["results"] == {NAME: True}
    assert _environment.probe_cache_info()["sources"][NAME] == "probed; cached"
    for _ in range(3):
        assert _environment.probe(NAME) is True
    assert len(calls) == 1
    info = _environment.probe_cache_info()
    assert info["sources"][NAME] == "from the cache" and info["enabled"]
    assert info["file"] == str(_probe_cache.path_for(_environment.probe_cache_key()))


def test_gates_read_the_cache(cache, counted):
    calls, verdict = counted
    verdict[0] = False
    env = _environment.detect()
    gates = _environment.Gates(probes=(NAME,))
    assert "no fake kernel" in _environment.check_gates(gates, env)
    assert "no fake kernel" in _environment.check_gates(gates, env)
    assert len(calls) == 1


@pytest.mark.parametrize("change", ["mindspore", "mindnlp", "transformers", "whisper_accel",
                                    "backend", "probe_code", "node", "python"])
def test_a_changed_key_probes_again(cache, counted, monkeypatch, change):
    calls, _ = counted
    original = dict(_environment._machine_and_stack())
    real_backend, real_version = _environment.device_target(), _environment.installed_version
    now = {"static": original, "backend": real_backend, "package": None}
    monkeypatch.setattr(_environment, "_machine_and_stack", lambda: tuple(now["static"].items()))
    monkeypatch.setattr(_environment, "device_target", lambda: now["backend"])
    monkeypatch.setattr(_environment, "installed_version",
                        lambda p: "9.9.9" if p == now["package"] else real_version(p))
    _environment.probe(NAME)
    if change == "backend":
        now["backend"] = "Ascend"
    elif change in _environment.SUPPORTED:
        now["package"] = change
    elif change == "probe_code":
        now["static"] = {**original, "probe_code": original["probe_code"] + 1}
    else:
        now["static"] = {**original, change: "something else"}
    _environment.probe(NAME)
    assert len(calls) == 2  # another stack: probed again
    _environment.probe(NAME)
    assert len(calls) == 2  # ... and cached under its own key
    now.update(static=original, backend=real_backend, package=None)
    _environment.probe(NAME)
    assert len(calls) == 2  # the first stack's verdict is still there
    assert len(list(cache.glob("probes-*.json"))) == 2


def test_versions_detect_read_are_the_key(cache, counted, monkeypatch):
    """check_gates keys the cache by the versions detect() read (no second metadata read)."""
    calls, _ = counted
    env = _environment.detect()
    monkeypatch.setattr(_environment, "installed_version", lambda p: pytest.fail("read again"))
    gates = _environment.Gates(probes=(NAME,))
    assert _environment.check_gates(gates, env) is None
    assert _environment.check_gates(gates, env) is None
    assert len(calls) == 1
    assert stored(_environment.probe_cache_key(env.versions))["key"]["versions"] == env.versions


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"format": 1}',
                                     '{"format": 1, "key": "x", "results": {}}', "\x00\xff"])
def test_corrupt_file_is_probed_again_and_rewritten(cache, counted, content):
    calls, _ = counted
    key = _environment.probe_cache_key()
    path = _probe_cache.path_for(key)
    path.parent.mkdir(parents=True)
    path.write_text(content, errors="surrogateescape")
    assert _environment.probe(NAME) is True and len(calls) == 1
    assert stored(key)["results"] == {NAME: True} and stored(key)["key"] == key
    _environment.probe(NAME)
    assert len(calls) == 1


def test_a_file_for_another_key_is_not_trusted(cache, counted):
    calls, _ = counted
    key = _environment.probe_cache_key()
    path = _probe_cache.path_for(key)
    path.parent.mkdir(parents=True)
    # same file name (say, a hash collision), another stack inside: ignored
    path.write_text(json.dumps({"format": 1, "key": {**key, "backend": "elsewhere"},
                                "results": {NAME: False}}))
    assert _environment.probe(NAME) is True and len(calls) == 1
    bad_value = {"format": 1, "key": key, "results": {NAME: "yes"}}
    path.write_text(json.dumps(bad_value))
    assert _environment.probe(NAME) is True and len(calls) == 2


def test_inconclusive_verdict_is_not_cached(cache, counted):
    calls, verdict = counted
    verdict[0] = None
    assert _environment.probe(NAME) is False
    assert _environment.probe(NAME) is False
    assert len(calls) == 2 and not list(cache.glob("probes-*.json"))
    assert "inconclusive" in _environment.probe_cache_info()["sources"][NAME]


@pytest.mark.parametrize("outcome,verdict", [(0, True), (3, False), (1, None), (4, None),
                                             (-11, None), ("timeout", None), ("oserror", None)])
def test_conv1d_child_verdicts(monkeypatch, outcome, verdict):
    """Only "ran and was right" (0) and "the device runs operators, not this one" (3) are
    definite; an import failure, a crash, a dead device or a timeout are not cached."""
    import types

    real_run = subprocess.run

    def run(args, **kwargs):
        if _environment._CONV1D_PROBE not in args:
            return real_run(args, **kwargs)
        if outcome == "timeout":
            raise subprocess.TimeoutExpired(args, 120)
        if outcome == "oserror":
            raise OSError("no such interpreter")
        return types.SimpleNamespace(returncode=outcome)

    _environment.device_target()  # MindSpore imported before subprocess.run is replaced
    monkeypatch.setattr(subprocess, "run", run)
    assert _environment.probe_native_conv1d.__wrapped__() is verdict


def test_probes_not_marked_cacheable_always_run(cache, monkeypatch):
    calls = []
    monkeypatch.setitem(_environment.PROBES, "fake_probe", (lambda: calls.append(1) or True, "x"))
    _environment.probe("fake_probe")
    _environment.probe("fake_probe")
    assert len(calls) == 2 and not cache.exists()


def test_unwritable_cache_still_probes_and_patches(tmp_path, monkeypatch, counted):
    calls, verdict = counted
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(_probe_cache.ENV_DIR, str(blocker / "cache"))  # cannot be created
    assert _probe_cache.store({"k": 1}, {NAME: True}) is False
    assert _environment.probe(NAME) is True and _environment.probe(NAME) is True
    assert len(calls) == 2  # no cache: probed each time, no error
    assert _environment.probe_cache_info()["sources"][NAME] == "probed"
    verdict[0] = False
    report = whisper_accel.patch()
    assert whisper_accel.is_patched() and "attention" in report.groups_applied


def test_read_only_directory_is_tolerated(cache, counted, monkeypatch):
    import os

    calls, _ = counted
    _environment.probe(NAME)

    def refuse(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "replace", refuse)
    assert _probe_cache.store(_environment.probe_cache_key(), {"other": True}) is False
    assert not list(cache.glob(".probes-*.tmp"))  # the temporary file is removed
    assert stored()["results"] == {NAME: True}


def test_switch_turns_the_disk_cache_off(cache, counted, monkeypatch):
    calls, _ = counted
    for value in ("0", "off", "false", "no"):
        monkeypatch.setenv(_probe_cache.ENV_SWITCH, value)
        _environment.probe(NAME)
        assert not cache.exists()
    assert len(calls) == 4
    assert _environment.probe_cache_info()["enabled"] is False
    monkeypatch.setenv(_probe_cache.ENV_SWITCH, "1")
    _environment.probe(NAME)
    assert stored()["results"] == {NAME: True}


def test_concurrent_threads_leave_a_valid_file(cache):
    key = {"stack": "threads"}
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        for j in range(25):
            assert _probe_cache.store(key, {f"p{i}": j % 2 == 0})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = stored(key)
    assert data["key"] == key and set(data["results"]) <= {f"p{i}" for i in range(8)}
    assert data["results"]  # races may drop a result (probed again later), never corrupt
    assert not list(cache.glob(".probes-*.tmp"))


_WRITER = """
import sys, time
from whisper_accel import _probe_cache
key = {"stack": "processes"}
for j in range(40):
    assert _probe_cache.store(key, {"p" + sys.argv[1]: j % 2 == 0})
    time.sleep(0.005)  # ~0.2 s of writing: the parent reads the file many times meanwhile
"""


@pytest.mark.subprocess
def test_concurrent_processes_never_show_a_partial_file(cache):
    key = {"stack": "processes"}
    path = _probe_cache.path_for(key)
    env = child_env(WHISPER_ACCEL_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(i)], env=env,
                              stderr=subprocess.PIPE) for i in range(4)]
    reads = 0
    deadline = time.monotonic() + 120
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if path.exists():
                data = json.loads(path.read_text())  # never half-written
                assert data["key"] == key
                reads += 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        assert p.wait(timeout=30) == 0, p.stderr.read().decode()[-2000:]
    assert reads > 0, "the file was never read while the writers ran: the test checked nothing"
    data = json.loads(path.read_text())
    assert data["results"] and set(data["results"]) <= {f"p{i}" for i in range(4)}
    assert not list(cache.glob(".probes-*.tmp"))


_FRESH = textwrap.dedent("""
    import json, subprocess
    import mindnlp
    import whisper_accel
    from whisper_accel import _environment

    launched = []
    real_run = subprocess.run
    def run(args, *a, **k):
        launched.append(_environment._CONV1D_PROBE in list(args))
        return real_run(args, *a, **k)
    subprocess.run = run
    report = whisper_accel.patch()
    print(json.dumps({"probe_children": sum(launched),
                      "source": _environment.probe_cache_info()["sources"].get("native_conv1d"),
                      "conv1d": [e.status for e in report.entries if e.group == "conv1d"]}))
""")


@pytest.mark.subprocess
def test_second_process_patches_without_probing(cache):
    """The point of the cache: after the first run, patch() in a fresh process starts no probe
    child (timings: benchmarks/startup.py)."""
    env = child_env(WHISPER_ACCEL_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), GLOG_v="3")

    def fresh():
        proc = subprocess.run([sys.executable, "-c", _FRESH], env=env, capture_output=True,
                              text=True, timeout=120, cwd="/")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold, warm = fresh(), fresh()
    assert cold["probe_children"] == 1 and cold["source"] == "probed; cached"
    assert warm["probe_children"] == 0 and warm["source"] == "from the cache"
    assert cold["conv1d"] == warm["conv1d"]
    assert list(cache.glob("probes-*.json"))
