"""Peak memory, stock vs patched: each arm in a fresh process, alternating, median of rounds.

    .venv/bin/python benchmarks/memory.py --config tiny --max-new-tokens 32 --rounds 3 [--json out.json]

Peak resident memory is per process and never goes down, so arms cannot share a process the
way the speed benchmark's interleaved variants do. Each child builds the seeded random model
and the built-in 30 s input, records its resident set (VmRSS) with the model loaded, patches
(patched arm only), runs the encoder and greedy ``generate`` twice (a warm-up that compiles,
then the measured call), and reports its high-water mark (VmHWM, Linux). The table shows the
peak and the peak above the loaded-model baseline, median over rounds; arms alternate
(stock, patched, patched, stock, ...) so drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(a) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    import whisper_accel
    from whisper_accel import bench, models

    model = models.random_model(a.config, seed=a.seed)
    feats = bench.log_mel(None, models.synthetic_audio(30.0, a.seed), mels=model.config.num_mel_bins)
    loaded_kb = _status_kb("VmRSS")
    if a.child == "patched":
        whisper_accel.patch()
    tokens = None
    for _ in range(2):
        with torch.no_grad():
            model.model.encoder(feats)
            tokens = model.generate(feats, max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
                                    do_sample=False).asnumpy().tolist()
    return {"arm": a.child, "loaded_mb": loaded_kb / 1024, "peak_mb": _status_kb("VmHWM") / 1024,
            "tokens": tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--child", choices=["stock", "patched"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return 0
    runs = {"stock": [], "patched": []}
    for r in range(a.rounds):
        for arm in (("stock", "patched") if r % 2 == 0 else ("patched", "stock")):
            env = {k: v for k, v in os.environ.items() if k != "WHISPER_ACCEL"}
            proc = subprocess.run([sys.executable, __file__, "--child", arm, "--config", a.config,
                                   "--seed", str(a.seed), "--max-new-tokens", str(a.max_new_tokens)],
                                  stdout=subprocess.PIPE, text=True, env=env)
            if proc.returncode != 0:
                print(f"{arm} child failed", file=sys.stderr)
                return proc.returncode
            runs[arm].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {arm}: peak {runs[arm][-1]['peak_mb']:.0f} MB", file=sys.stderr)
    summary = {}
    for arm, rs in runs.items():
        summary[arm] = {"peak_mb": statistics.median(x["peak_mb"] for x in rs),
                        "above_loaded_mb": statistics.median(x["peak_mb"] - x["loaded_mb"] for x in rs),
                        "loaded_mb": statistics.median(x["loaded_mb"] for x in rs)}
    same = all(x["tokens"] == runs["stock"][0]["tokens"] for rs in runs.values() for x in rs)
    print(f"peak memory, {a.config} random weights, encoder + generate({a.max_new_tokens}), "
          f"median of {a.rounds} fresh processes per arm")
    print(f"{'arm':<10}{'peak MB':>10}{'above model MB':>16}{'vs stock':>10}")
    for arm in ("stock", "patched"):
        s = summary[arm]
        print(f"{arm:<10}{s['peak_mb']:>10.0f}{s['above_loaded_mb']:>16.0f}"
              f"{s['peak_mb'] / summary['stock']['peak_mb']:>9.2f}x")
    print(f"tokens identical across all runs: {same}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "max_new_tokens": a.max_new_tokens, "rounds": a.rounds,
                       "summary": summary, "runs": runs, "tokens_equal": same}, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
