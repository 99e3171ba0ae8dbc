"""The Whisper encoder alone: stock MindNLP, patched with MindSpore's element-wise operators
(``plain``), patched with the fused kernels one layer a graph launch (``fused, 1 layer a
launch``) and as the default runs them (``fused``: the attention kernel, and as many layers a
launch as ``runtime.model.GROUP_BYTES`` allows), and PyTorch + transformers on the same
weights and features.

    .venv/bin/python benchmarks/encoder.py --config tiny --repeats 7 [--no-stock] [--json out.json]

One MindNLP process builds a seeded random model with the config's real dimensions, saves it
as a Hugging Face folder, and times the encoder forward for each arm interleaved (stock, plain,
fused, stock, ...) after a first call reported as ``first s`` (graph compilation included);
medians. Then a process that never imports MindNLP loads the folder and times
``model.model.encoder`` on the same features with PyTorch, twice (the faster run is reported:
it is not interleaved with the MindNLP arms). Outputs are compared with stock's
(relative L2 norm; PyTorch's with the fused arm's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _arms(a, model):
    """name -> (prepare, run): ``prepare()`` (untimed) sets the arm up, ``run(feats)`` is timed."""
    import torch

    import whisper_accel
    from whisper_accel.runtime import model as runtime_model
    from whisper_accel.runtime import native

    enc = model.model.encoder

    def run(feats):
        with torch.no_grad():
            return enc(feats).last_hidden_state.asnumpy()

    whisper_accel.patch()
    decided = native.state()
    arms = {}
    if not a.no_stock:
        arms["stock"] = (whisper_accel.unpatch, run)

    def plain():
        if not whisper_accel.is_patched():
            whisper_accel.patch()
        native.disable("benchmarks/encoder.py: the plain arm")

    budget = runtime_model.GROUP_BYTES

    def fused(group_bytes):
        def prepare():
            if not whisper_accel.is_patched():
                whisper_accel.patch()
            native.restore(decided)
            runtime_model.GROUP_BYTES = group_bytes
        return prepare

    arms["plain"] = (plain, run)
    arms["fused, 1 layer a launch"] = (fused(0), run)
    arms["fused"] = (fused(budget), run)
    return arms, decided


def worker_mindnlp(a) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    import torch

    from whisper_accel import models
    from whisper_accel.runtime.binding import ATTR

    model = models.random_model(a.config, seed=a.seed)
    model.save_pretrained(a.folder, safe_serialization=True)
    rng = np.random.default_rng(a.seed)
    feats_np = rng.standard_normal((a.batch, model.config.num_mel_bins, 3000)).astype(np.float32)
    np.save(os.path.join(a.folder, "features.npy"), feats_np)
    feats = torch.tensor(feats_np)
    arms, decided = _arms(a, model)
    first, times, outs = {}, {k: [] for k in arms}, {}
    for name, (prepare, run) in arms.items():
        prepare()
        model.model.encoder.__dict__.pop(ATTR, None)  # a fresh compiled model: first call = compilation
        t0 = time.perf_counter()
        outs[name] = run(feats)
        first[name] = time.perf_counter() - t0
    for _ in range(a.repeats):
        for name, (prepare, run) in arms.items():
            prepare()
            t0 = time.perf_counter()
            run(feats)
            times[name].append(time.perf_counter() - t0)
    cw = model.model.encoder.__dict__.get(ATTR)
    ref = outs.get("stock", outs["plain"])
    np.save(os.path.join(a.folder, "fused.npy"), outs["fused"])
    return {"fused_kernels": decided, "layers_per_launch": cw.encoder_layers_per_launch,
            "arms": {k: {"median_s": statistics.median(v), "min_s": min(v), "first_s": first[k],
                         "rel_diff_vs_stock": float(np.linalg.norm(outs[k] - ref) / np.linalg.norm(ref))}
                     for k, v in times.items()}}


def worker_pytorch(a) -> dict:
    import torch
    from transformers import WhisperForConditionalGeneration

    assert "mindnlp" not in sys.modules
    model = WhisperForConditionalGeneration.from_pretrained(a.folder, local_files_only=True).eval()
    feats = torch.tensor(np.load(os.path.join(a.folder, "features.npy")))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.model.encoder(feats).last_hidden_state.numpy()
        first = time.perf_counter() - t0
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            model.model.encoder(feats)
            times.append(time.perf_counter() - t0)
    fused = np.load(os.path.join(a.folder, "fused.npy"))
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "median_s": statistics.median(times), "min_s": min(times), "first_s": first,
            "rel_diff_vs_fused": float(np.linalg.norm(out - fused) / np.linalg.norm(fused))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-stock", action="store_true", help="skip the stock arm (slow on large configs)")
    p.add_argument("--json")
    p.add_argument("--worker", choices=["mindnlp", "pytorch"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        out = worker_mindnlp(a) if a.worker == "mindnlp" else worker_pytorch(a)
        print(json.dumps(out))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_ACCEL") or k == "WHISPER_ACCEL_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as folder:
        res = {}
        for worker in ("mindnlp", "pytorch", "pytorch2"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker[:7], "--folder", folder,
                   "--config", a.config, "--seed", str(a.seed), "--batch", str(a.batch),
                   "--repeats", str(a.repeats)] + (["--no-stock"] if a.no_stock else [])
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
            if proc.returncode != 0:
                print(f"the {worker} worker failed", file=sys.stderr)
                return 1
            res[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
    arms, pt = res["mindnlp"]["arms"], res["pytorch"]
    # PyTorch runs after the MindNLP process, twice (not interleaved with it): the faster run
    pt = min(res.pop("pytorch2"), pt, key=lambda r: r["median_s"])
    res["pytorch"] = pt
    print(f"encoder, {a.config} (random weights, real dimensions), batch {a.batch} x 3000 frames, "
          f"{a.repeats} interleaved repeats, medians; fused kernels: "
          f"{res['mindnlp']['fused_kernels']['library'] or res['mindnlp']['fused_kernels']['reason']}; "
          f"fused: {res['mindnlp']['layers_per_launch']} layers a launch")
    print("| arm | median s | min s | first s | vs PyTorch | rel diff |")
    print("|---|---|---|---|---|---|")
    for name, r in arms.items():
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['first_s']:.2f} | "
              f"{r['median_s'] / pt['median_s']:.2f}x | {r['rel_diff_vs_stock']:.1e} |")
    print(f"| PyTorch {pt['torch']} ({pt['threads']} threads) | {pt['median_s']:.3f} | {pt['min_s']:.3f} | "
          f"{pt['first_s']:.2f} | 1.00x | {pt['rel_diff_vs_fused']:.1e} vs fused |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "batch": a.batch, "repeats": a.repeats, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
