"""What whisper_accel adds to a script's start-up, each part measured in fresh processes.

    .venv/bin/python benchmarks/startup.py [--runs 30] [--patch-runs 5] [--json out.json]

1. The WHISPER_ACCEL hook (whisper_accel.pth): ``python -c pass`` interleaved with
   WHISPER_ACCEL unset, =0 and =1; median wall time of each, plus what ``-X importtime`` shows
   the hook importing. Target: unset adds nothing measurable (< 5 ms); set imports
   whisper_accel + wrapt but never MindSpore.
2. ``patch()``: a fresh ``python`` imports MindNLP, then whisper_accel, then calls ``patch()``,
   timing each step itself; interleaved per run: probe cache *cold* (an empty directory),
   *warm* (filled by an earlier process) and *off* (``WHISPER_ACCEL_PROBE_CACHE=0``). It also
   counts the conv1d probe children ``patch()`` starts. Target: warm ``patch()`` <= 100 ms.

Children run from the repository root, so they import this checkout's whisper_accel.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"unset": None, "0": "0", "1": "1"}
CACHE_MODES = ("cold", "warm", "off")

_PATCH_CHILD = """
import json, subprocess, time
t0 = time.perf_counter()
import mindnlp
t1 = time.perf_counter()
import whisper_accel
from whisper_accel import _environment
t2 = time.perf_counter()
probes = []
real_run = subprocess.run
def run(args, *a, **k):
    probes.append(_environment._CONV1D_PROBE in list(args))
    return real_run(args, *a, **k)
subprocess.run = run
t3 = time.perf_counter()
report = whisper_accel.patch()
t4 = time.perf_counter()
assert report.applied, str(report)
print(json.dumps({"import_mindnlp_ms": (t1 - t0) * 1e3, "import_whisper_accel_ms": (t2 - t1) * 1e3,
                  "patch_ms": (t4 - t3) * 1e3, "probe_children": sum(probes)}))
"""


def env_for(value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_ACCEL")}
    if value is not None:
        env["WHISPER_ACCEL"] = value
    return env


def imported(value):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env_for(value),
                          capture_output=True, text=True)
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")]
    names = [r[2].strip() for r in rows[1:]]
    ours = [n for n in names if n.split(".")[0] in ("whisper_accel", "wrapt", "mindspore", "mindnlp")]
    return {"modules": ours, "mindspore_imported": any(n.startswith("mindspore") for n in ours)}


def hook(runs):
    times = {m: [] for m in MODES}
    for _ in range(runs):
        for mode, value in MODES.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=env_for(value), check=True)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    result = {"runs": runs, "median_ms": med, "imports": {m: imported(v) for m, v in MODES.items()}}
    print(f"{'WHISPER_ACCEL':<14}{'median ms':>10}{'vs unset':>10}  what the hook imports")
    for m in MODES:
        imp = result["imports"][m]
        print(f"{m:<14}{med[m]:>10.1f}{med[m] - med['unset']:>+10.1f}  "
              f"{len(imp['modules'])} modules: {', '.join(imp['modules'][:3]) or '-'}"
              f"{' ...' if len(imp['modules']) > 3 else ''}; MindSpore: {imp['mindspore_imported']}")
    return result


def patch_child(cache_dir, mode):
    env = env_for(None)
    env["GLOG_v"] = "3"
    env["WHISPER_ACCEL_CACHE_DIR"] = cache_dir
    if mode == "off":
        env["WHISPER_ACCEL_PROBE_CACHE"] = "0"
    proc = subprocess.run([sys.executable, "-c", _PATCH_CHILD], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(f"patch() child ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def patch_costs(runs):
    fields = ("import_mindnlp_ms", "import_whisper_accel_ms", "patch_ms", "probe_children")
    samples = {m: {f: [] for f in fields} for m in CACHE_MODES}
    with tempfile.TemporaryDirectory(prefix="wa_startup_") as tmp:
        warm = os.path.join(tmp, "warm")
        patch_child(warm, "warm")  # fills it (not counted)
        for i in range(runs):
            for mode in CACHE_MODES:
                cache_dir = os.path.join(tmp, f"cold{i}") if mode == "cold" else warm
                out = patch_child(cache_dir, mode)
                for f in fields:
                    samples[mode][f].append(out[f])
    med = {m: {f: statistics.median(v) for f, v in s.items()} for m, s in samples.items()}
    print(f"\npatch() in a fresh process, median of {runs} (interleaved):")
    print(f"{'probe cache':<14}{'import mindnlp ms':>18}{'import w_a ms':>15}{'patch() ms':>12}"
          f"{'probe children':>16}")
    for m in CACHE_MODES:
        r = med[m]
        print(f"{m:<14}{r['import_mindnlp_ms']:>18.0f}{r['import_whisper_accel_ms']:>15.1f}"
              f"{r['patch_ms']:>12.1f}{r['probe_children']:>16.0f}")
    return {"runs": runs, "median": med, "samples": samples}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30, help="python -c pass runs per hook mode")
    p.add_argument("--patch-runs", type=int, default=5,
                   help="fresh processes per probe-cache mode (0: skip)")
    p.add_argument("--json")
    a = p.parse_args()
    result = {"hook": hook(a.runs)}
    if a.patch_runs:
        result["patch"] = patch_costs(a.patch_runs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
