"""Batch transcription on Ray Data (examples/ray_transcribe.py), as a user would run it.

A local Ray cluster of two CPUs runs two actors, each holding a transformers ASR pipeline on the
real tiny.en weights. The driver sets ``WHISPER_ACCEL=1`` only in Ray's ``runtime_env``: no
worker code patches anything, the ``whisper_accel.pth`` start-up hook does. The transcripts must
equal a single-process run in this process with the arithmetic left stock, and every worker
must report fast-path calls and no stock ones.

``ray`` is the optional extra ``.[ray]`` (CI installs it). It is not imported in this process:
Ray loads the upb protobuf implementation, under which MindSpore 2.7's generated protobuf
modules cannot import (see docs/scaling.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import whisper_accel

from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
EXAMPLE = ROOT / "examples" / "ray_transcribe.py"
FILES = ("short_fox.wav", "stella.wav", "weather.wav")  # 3.4-4.7 s of espeak-ng speech, 16 kHz

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="ray is not installed (the optional extra: pip install '.[ray]')"),
]


def load_example():
    spec = importlib.util.spec_from_file_location("ray_transcribe", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_driver(args, env, timeout):
    """The example as a child process in a session of its own: on a timeout the whole group
    (driver and the Ray processes it started) is killed, not left running."""
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *args], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the Ray driver ran past {timeout} s\n{out[-3000:]}\n{err[-6000:]}")
    return proc.returncode, out, err


@pytest.mark.timeout(600)
def test_two_ray_workers_patched_by_the_environment_transcribe_as_stock(tiny_en_dir, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in FILES:
        shutil.copy(DATA / name, audio / name)
    out = tmp_path / "ray.json"
    env = child_env(
        GLOG_v="3",
        # the workers import this checkout's whisper_accel (the .pth hook is the installed one)
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        # start dispatching only when both actors are up, so each one transcribes a file
        RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="400",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)  # always a fresh local cluster, never one the shell points at
    t0 = time.monotonic()
    rc, stdout, stderr = run_driver([str(tiny_en_dir), str(audio), "--workers", "2",
                                     "--num-cpus", "2", "--json", str(out)], env, timeout=480)
    ray_seconds = time.monotonic() - t0
    assert rc == 0, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    result = json.loads(out.read_text())

    # the same pipeline, one process, the model's arithmetic stock: only `compat` (stock MindNLP
    # cannot compute Whisper's features at all; compat does not touch the model)
    from whisper_accel.groups import NAMES

    example = load_example()
    paths = [str(audio / name) for name in FILES]
    def fast_calls():
        return {k: c["fast"] for k, c in whisper_accel.status()["calls"].items()}

    before = fast_calls()
    with whisper_accel.patched(**{g: g == "compat" for g in NAMES}):
        reference = example.Transcriber(str(tiny_en_dir))(
            {"path": paths, "bytes": [Path(p).read_bytes() for p in paths]})
        assert fast_calls() == before  # nothing took a fast path
    expected = dict(zip(reference["path"], reference["text"]))

    assert result["transcripts"] == expected, (result["transcripts"], expected)
    assert "lazy dog" in expected[paths[0]] and "Stella" in expected[paths[1]]  # real speech heard

    workers = result["workers"]
    assert len(workers) == 2, workers  # both actors transcribed
    assert sum(w["files"] for w in workers.values()) == len(FILES)
    for name, w in workers.items():
        calls = w["calls"]
        assert w["patched"], f"worker {name} was not patched by WHISPER_ACCEL=1: {calls}"
        assert calls.get("encoder", {}).get("fast", 0) >= w["files"], (name, calls)
        loops = [calls.get(k, {}).get("fast", 0) for k in ("greedy loop", "beam search loop")]
        assert sum(loops) >= w["files"], (name, calls)
        stock = {k: c["reasons"] for k, c in calls.items() if c["stock"]}
        assert not stock, f"worker {name} ran stock code: {stock}"
    print(f"Ray run (2 workers, {len(FILES)} files, start-up included): {ray_seconds:.0f} s")
