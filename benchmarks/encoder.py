"""The Whisper encoder alone: stock MindNLP, patched with MindSpore's element-wise operators
(``plain``), patched with the fused kernels one layer a graph launch (``fused, 1 layer a
launch``) and in the graphs' default grouping (``fused``: the attention kernel, and as many
layers a launch as ``runtime.model.GROUP_BYTES`` allows), the same kernels and numpy's GEMM on
the host with no graph (``host``, ``runtime/host_encoder.py``, what ``patch()`` runs where the
fused graphs would take several launches), and PyTorch + transformers on the same weights and
features.

    .venv/bin/python benchmarks/encoder.py --config tiny --repeats 7 [--no-stock] [--layers N] [--products] \\
        [--json out.json]

One MindNLP process builds a seeded random model with the config's real dimensions, saves it
as a Hugging Face folder, and times the encoder forward for each arm interleaved (stock, plain,
fused, stock, ...) after a first call reported as ``first s`` (graph compilation included);
medians. Then a process that never imports MindNLP loads the folder and times
``model.model.encoder`` on the same features with PyTorch, twice (the faster run is reported:
it is not interleaved with the MindNLP arms). Outputs are compared with stock's
(relative L2 norm; PyTorch's with the fused arm's).

``--layers N`` gives the model N encoder layers (every layer of a config costs the same, so a
32-layer encoder's time is 32 / N times the layers' share; the stem and final norm are once;
the decoder, which no arm runs, then gets one layer).
``--products`` adds an arm that runs only the encoder's matrix products -- the two convolutions
as GEMMs over their unfolded inputs, every layer's six linear layers, and per head the
attention's scores Q K^T and their product with V -- as numpy ``matmul`` calls (its OpenBLAS)
on arrays of the same shapes: no softmax, no LayerNorm, no GELU, no bias or residual adds. It
tells how far an encoder is from what that BLAS alone needs. It is not a floor for every
implementation: an attention that never writes its scores out (PyTorch's, ours) runs those
products faster than separate GEMMs do (benchmarks/PROFILE_NOTES.md section 27).
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

    def fused(group_bytes, host=False):
        def prepare():
            if not whisper_accel.is_patched():
                whisper_accel.patch()
            native.restore(decided)
            runtime_model.GROUP_BYTES = group_bytes
            runtime_model.HOST_ENCODER = host
        return prepare

    arms["plain"] = (plain, run)
    arms["fused, 1 layer a launch"] = (fused(0), run)
    arms["fused"] = (fused(budget), run)
    arms[HOST] = (fused(budget, host=True), run)
    if a.products:
        arms[PRODUCTS] = (lambda: None, matrix_products(model.config, int(a.batch)))
    return arms, decided


#: The host encoder's arm: runtime/host_encoder.py (by default where the fused graphs would
#: split the layers over several launches).
HOST = "host"
#: The ``--products`` arm's name.
PRODUCTS = "matrix products alone (OpenBLAS)"


def matrix_products(cfg, batch: int):
    """``run(feats)`` for the ``--products`` arm: the encoder's matrix products (see the module
    docstring) as numpy matmuls on float32 arrays of their shapes, outputs written in place."""
    rng = np.random.default_rng(0)
    d, ffn, heads, mels = int(cfg.d_model), int(cfg.encoder_ffn_dim), int(cfg.encoder_attention_heads), int(cfg.num_mel_bins)
    t, dh = 1500, d // heads

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    unfolded1, w_conv1, unfolded2, w_conv2 = arr(batch * 2 * t, 3 * mels), arr(d, 3 * mels), arr(batch * t, 3 * d), arr(d, 3 * d)
    conv1, x, wide = np.empty((batch * 2 * t, d), np.float32), arr(batch * t, d), np.empty((batch * t, ffn), np.float32)
    y = np.empty((batch * t, d), np.float32)
    w_d, w_up, w_down = arr(d, d), arr(ffn, d), arr(d, ffn)
    scores, out = np.empty((t, t), np.float32), np.empty((t, dh), np.float32)
    n_layers = int(cfg.encoder_layers)

    def run(feats):
        np.matmul(unfolded1, w_conv1.T, out=conv1)
        np.matmul(unfolded2, w_conv2.T, out=y)
        for _ in range(n_layers):
            for _ in range(4):  # q, k, v, out
                np.matmul(x, w_d.T, out=y)
            for b in range(batch):
                rows = x[b * t:(b + 1) * t]
                for h in range(heads):
                    q = rows[:, h * dh:(h + 1) * dh]
                    np.matmul(q, q.T, out=scores)
                    np.matmul(scores, q, out=out)
            np.matmul(x, w_up.T, out=wide)
            np.matmul(wide, w_down.T, out=y)
        return None
    return run


def worker_mindnlp(a) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    import torch

    from whisper_accel import models
    from whisper_accel.runtime.binding import ATTR

    # with --layers the decoder, which no arm runs, keeps one layer (large-v3's 32 take minutes to build and save)
    fewer = {"encoder_layers": a.layers, "decoder_layers": 1} if a.layers else {}
    model = models.random_model(a.config, seed=a.seed, **fewer)
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
            time.sleep(a.settle)
            t0 = time.perf_counter()
            run(feats)
            times[name].append(time.perf_counter() - t0)
    cw = model.model.encoder.__dict__.get(ATTR)
    ref = outs.get("stock", outs["plain"])
    np.save(os.path.join(a.folder, "fused.npy"), outs["fused"])

    def diff(out):  # the products arm computes no encoder output
        return None if out is None else float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return {"fused_kernels": decided, "layers_per_launch": cw.encoder_layers_per_launch,
            "encoder_layers": int(model.config.encoder_layers),
            "arms": {k: {"median_s": statistics.median(v), "min_s": min(v), "first_s": first[k],
                         "rel_diff_vs_stock": diff(outs[k])} for k, v in times.items()}}


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
    p.add_argument("--layers", type=int, help="encoder layers of the model (default: the config's)")
    p.add_argument("--products", action="store_true", help="add the matrix-products-alone arm (see above)")
    p.add_argument("--settle", type=float, default=0.0,
                   help="seconds idle before each timed call (MindSpore's threads spin on after a graph launch)")
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
                   "--repeats", str(a.repeats)] + (["--no-stock"] if a.no_stock else []) + (
                       ["--layers", str(a.layers)] if a.layers else []) + (["--products"] if a.products else []) + ["--settle", str(a.settle)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
            if proc.returncode != 0:
                print(f"the {worker} worker failed", file=sys.stderr)
                return 1
            res[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
    arms, pt = res["mindnlp"]["arms"], res["pytorch"]
    # PyTorch runs after the MindNLP process, twice (not interleaved with it): the faster run
    pt = min(res.pop("pytorch2"), pt, key=lambda r: r["median_s"])
    res["pytorch"] = pt
    print(f"encoder, {a.config} (random weights, real dimensions, {res['mindnlp']['encoder_layers']} layers), "
          f"batch {a.batch} x 3000 frames, "
          f"{a.repeats} interleaved repeats, medians; fused kernels: "
          f"{res['mindnlp']['fused_kernels']['library'] or res['mindnlp']['fused_kernels']['reason']}; "
          f"fused: {res['mindnlp']['layers_per_launch']} layers a launch")
    print("| arm | median s | min s | first s | vs PyTorch | rel diff |")
    print("|---|---|---|---|---|---|")
    for name, r in arms.items():
        rel = "-" if r["rel_diff_vs_stock"] is None else f"{r['rel_diff_vs_stock']:.1e}"
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['first_s']:.2f} | "
              f"{r['median_s'] / pt['median_s']:.2f}x | {rel} |")
    print(f"| PyTorch {pt['torch']} ({pt['threads']} threads) | {pt['median_s']:.3f} | {pt['min_s']:.3f} | "
          f"{pt['first_s']:.2f} | 1.00x | {pt['rel_diff_vs_fused']:.1e} vs fused |")
    if PRODUCTS in arms:
        print(f"fused takes {arms['fused']['median_s'] / arms[PRODUCTS]['median_s']:.2f}x the matrix products' time")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "batch": a.batch, "repeats": a.repeats, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
