"""The benchmark scripts' own bookkeeping, where a wrong count would misstate a result."""

import json
import os
import subprocess
import sys

import pytest

from conftest import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_seed_scale_counts_the_windows_long_form_decodes():
    """``seed_scale.py`` divides generate's time by the windows long-form decoded. With random
    weights and 4 forced tokens a segment's last timestamp ends early, so the seek moves by less
    than 30 s and a 70 s clip takes more windows than ceil(70 / 30) = 3: the count must come from
    the encoder calls of the timed call (it used to be the ceiling, which put encoder time into
    "decode per window")."""
    env = child_env()
    env["GLOG_v"] = "3"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "seed_scale.py"), "--arm", "patched", "--config", "tiny",
           "--dtype", "float32", "--seconds", "70", "--tokens", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["windows"] == out["encoder_calls"] > 3
    gen = out["generate_s"]
    per_window = (gen - out["windows"] * out["encoder_window_s"]) / out["windows"]
    assert out["decode_per_window_s"] == pytest.approx(per_window)
