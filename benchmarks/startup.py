"""Start-up cost of the WHISPER_ACCEL hook (whisper_accel.pth), unset vs set.

    .venv/bin/python benchmarks/startup.py [--runs 30] [--json out.json]

Runs ``python -c pass`` interleaved with WHISPER_ACCEL unset, =0 and =1, and reports the
median wall time of each, plus what ``-X importtime`` shows the hook importing. Target: unset
adds nothing measurable (< 5 ms); set imports whisper_accel + wrapt but never MindSpore.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = {"unset": None, "0": "0", "1": "1"}


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json")
    a = p.parse_args()
    times = {m: [] for m in MODES}
    for _ in range(a.runs):
        for mode, value in MODES.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=env_for(value), check=True)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    result = {"runs": a.runs, "median_ms": med, "imports": {m: imported(v) for m, v in MODES.items()}}
    print(f"{'WHISPER_ACCEL':<14}{'median ms':>10}{'vs unset':>10}  what the hook imports")
    for m in MODES:
        imp = result["imports"][m]
        print(f"{m:<14}{med[m]:>10.1f}{med[m] - med['unset']:>+10.1f}  "
              f"{len(imp['modules'])} modules: {', '.join(imp['modules'][:3]) or '-'}"
              f"{' ...' if len(imp['modules']) > 3 else ''}; MindSpore: {imp['mindspore_imported']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
