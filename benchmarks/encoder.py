"""The Whisper encoder alone: stock MindNLP and every executor of the encoder engine
(runtime/encoder_engine.py), each forced by a :class:`whisper_accel.Config`, beside what
``patch()`` chooses (``auto``: measured on this machine, runtime/choice.py), and PyTorch +
transformers on the same weights and features.

Arms (:data:`ARMS`): ``plain`` (MindSpore's own operators, one layer a graph launch), ``fused, 1
layer a launch`` and ``fused`` (the fused kernels' graphs; as many layers a launch as
``Config.group_bytes`` allows), ``host`` (numpy's GEMM and the same kernels through ctypes, no
graph), and ``auto`` (what ``patch()`` runs: its first calls time host against fused, then it
keeps the faster; the table shows which it ran, its verdict's timings and where the verdict came
from: measured now, or an earlier run's kept in the cache directory).

    .venv/bin/python benchmarks/encoder.py --config tiny --repeats 7 [--no-stock] [--layers N] [--products] \\
        [--isa avx2] [--fresh-verdict] [--json out.json]

One MindNLP process builds a seeded random model with the config's real dimensions, saves it
as a Hugging Face folder, and times the encoder forward for each arm interleaved (stock, plain,
fused, stock, ...) after a first call reported as ``first s`` (graph compilation included; for
``auto``, the calls it then spends measuring are run before the timed ones and reported as
``measuring``); medians. Each arm keeps its own engine on the encoder module between its calls.
Then a process that never imports MindNLP loads the folder and times ``model.model.encoder`` on
the same features with PyTorch, twice (the faster run is reported: it is not interleaved with
the MindNLP arms). Outputs are compared with stock's (relative L2 norm; PyTorch's with the fused
arm's).

``--isa NAME`` (avx512, avx2, neon) builds and uses that kernel variant in every arm
(``Config(isa=NAME)``). The fused graphs bind one kernel library per process, the first one
used; the MindNLP worker is a process of its own whose every arm passes the forced ISA, so the
graph arms and the host arm (which loads its library through ctypes) run the same variant. The
header names the variant and the CPU, and the JSON both libraries (``kernels`` and
``graphs_bound``); a mismatch is printed as a warning.
``--fresh-verdict`` gives the ``auto`` arm an empty verdict cache (a temporary directory, the
kernel library copied into its ``native/``), so it measures in this run instead of reading a
verdict an earlier run kept.
``--layers N`` gives the model N encoder layers (every layer of a config costs the same, so a
32-layer encoder's time is 32 / N times the layers' share; the stem and final norm are once;
the decoder, which no arm runs, then gets one layer).
``--bf16`` adds ``host, bfloat16``: the host encoder with ``matmul_precision="bfloat16"`` (its
products' inputs rounded to bfloat16, summed in float32; AVX512_BF16 CPUs). Its output is not
stock's: the table's difference column shows by how much.
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

#: arm name -> the Config fields it sets (over the environment's config and ``--isa``)
ARMS = {
    "plain": dict(encoder="plain"),
    "fused, 1 layer a launch": dict(encoder="fused", group_bytes=0),
    "fused": dict(encoder="fused"),
    "host": dict(encoder="host"),
    "auto": dict(encoder="auto", measure=True),
}
#: The arm ``patch()`` runs by default.
AUTO = "auto"
#: The host encoder's arm: runtime/host_encoder.py.
HOST = "host"
#: ``--bf16``'s arm: the host encoder with its products in bfloat16 (``matmul_precision``).
BF16 = "host, bfloat16"


def arm_configs(base, bf16: bool = False):
    """arm name -> its :class:`whisper_accel.Config` (``base`` with the arm's fields), and the
    bfloat16 arm when ``bf16``."""
    arms = dict(ARMS, **({BF16: dict(encoder="host", matmul_precision="bfloat16")} if bf16 else {}))
    return {name: base.with_(**fields) for name, fields in arms.items()}


class Arm:
    """One engine configuration on the encoder: ``prepare()`` (untimed) patches with the arm's
    config and puts its kept engine back on the module; ``run(feats)`` is timed."""

    def __init__(self, enc, cfg):
        self.enc, self.cfg, self.engine = enc, cfg, None

    def prepare(self):
        import whisper_accel
        from whisper_accel import config
        from whisper_accel.runtime.binding import ATTR

        if not whisper_accel.is_patched():
            whisper_accel.patch(config=self.cfg)
        config.activate(self.cfg)  # an engine built now reads it
        if self.engine is None:
            self.enc.__dict__.pop(ATTR, None)  # the first call builds it (and compiles)
        else:
            self.enc.__dict__[ATTR] = self.engine

    def run(self, feats):
        import torch

        from whisper_accel.runtime.binding import ATTR

        with torch.no_grad():
            out = self.enc(feats).last_hidden_state.asnumpy()
        self.engine = self.enc.__dict__.get(ATTR) or None
        return out


def _stock(enc):
    import torch

    import whisper_accel

    def run(feats):
        with torch.no_grad():
            return enc(feats).last_hidden_state.asnumpy()
    return whisper_accel.unpatch, run


def _arms(a, model):
    """name -> (prepare, run, Arm or None), and the base config."""
    from whisper_accel import config

    enc = model.model.encoder
    base = config.Config.from_env()
    if a.isa:
        base = base.with_(isa=a.isa)
    configs = arm_configs(base, a.bf16)
    if a.fresh_verdict:
        configs[AUTO] = configs[AUTO].with_(cache_dir=_fresh_cache(base, a.folder))
    arms = {}
    if not a.no_stock:
        arms["stock"] = _stock(enc) + (None,)
    for name, cfg in configs.items():
        arm = Arm(enc, cfg)
        arms[name] = (arm.prepare, arm.run, arm)
    if a.products:
        arms[PRODUCTS] = (lambda: None, matrix_products(model.config, int(a.batch)), None)
    return arms, base


def _fresh_cache(base, folder) -> str:
    """An empty cache directory for the auto arm's verdicts, with the kernel library of ``base``
    copied into its ``native/`` (the same build key: found there, not compiled again)."""
    from whisper_accel.runtime import native

    cache = os.path.join(folder, "verdict-cache")
    os.makedirs(os.path.join(cache, "native"), exist_ok=True)
    lib = native.library(base)
    if lib is not None:
        shutil.copy2(lib.path, os.path.join(cache, "native", os.path.basename(lib.path)))
    return cache


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


def _measure_auto(arm, feats):
    """Run the auto arm until its choice has a verdict for this input (at most the calls
    runtime/choice.py measures a case over): the calls it spends measuring, their seconds."""
    from whisper_accel.runtime import choice

    spent = []
    for _ in range(2 + 2 * choice.SHORT_RUNS):
        eng = arm.engine
        if eng is None or eng.choice is None:
            break
        verdict = eng.choice.report().get(eng.choice.case(tuple(feats.shape)))
        if verdict and verdict["executor"] is not None:
            break
        arm.prepare()
        t0 = time.perf_counter()
        arm.run(feats)
        spent.append(time.perf_counter() - t0)
    return spent


def worker_mindnlp(a) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    import torch

    from whisper_accel import models
    from whisper_accel.kernels import fused
    from whisper_accel.runtime import native

    # with --layers the decoder, which no arm runs, keeps one layer (large-v3's 32 take minutes to build and save)
    fewer = {"encoder_layers": a.layers, "decoder_layers": 1} if a.layers else {}
    model = models.random_model(a.config, seed=a.seed, **fewer)
    model.save_pretrained(a.folder, safe_serialization=True)
    rng = np.random.default_rng(a.seed)
    feats_np = rng.standard_normal((a.batch, model.config.num_mel_bins, 3000)).astype(np.float32)
    np.save(os.path.join(a.folder, "features.npy"), feats_np)
    feats = torch.tensor(feats_np)
    arms, base = _arms(a, model)
    decided = native.state(base)
    first, times, outs, measuring = {}, {k: [] for k in arms}, {}, []
    for name, (prepare, run, _) in arms.items():
        prepare()
        t0 = time.perf_counter()
        outs[name] = run(feats)
        first[name] = time.perf_counter() - t0
    auto = arms[AUTO][2]
    measuring = _measure_auto(auto, feats)
    for _ in range(a.repeats):
        for name, (prepare, run, _) in arms.items():
            prepare()
            time.sleep(a.settle)
            t0 = time.perf_counter()
            run(feats)
            times[name].append(time.perf_counter() - t0)
    ref = outs.get("stock", outs["plain"])
    np.save(os.path.join(a.folder, "fused.npy"), outs["fused"])

    def diff(out):  # the products arm computes no encoder output
        return None if out is None else float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    def engine(arm):
        eng = arm.engine if arm is not None else None
        if eng is None:
            return {}
        out = {"executor": eng.executor, "layers_per_launch": eng.layers_per_launch, "faults": dict(eng.engine.faults),
               "matmul_precision": eng.report()["matmul_precision"]}
        if eng.choice is not None:
            out["verdict"] = eng.choice.report().get(eng.choice.case(tuple(feats.shape)))
        return out

    result = {"fused_kernels": decided, "graphs_bound": fused.bound(), "cpu": _cpu(),
              "encoder_layers": int(model.config.encoder_layers),
              "auto_measuring_s": measuring,
              "arms": {k: {"median_s": statistics.median(v), "min_s": min(v), "first_s": first[k],
                           "rel_diff_vs_stock": diff(outs[k]), **engine(arms[k][2])} for k, v in times.items()}}
    return result


def _cpu() -> dict:
    from whisper_accel.kernels import isa

    cpu = isa.cpu()
    wide = [v.name for v in isa.runnable(cpu)]
    return {"model": cpu.model, "arch": cpu.arch, "runnable": wide}


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


def parser() -> argparse.ArgumentParser:
    from_isa = ("avx512", "avx2", "neon")  # whisper_accel.kernels.isa.NAMES (not imported here: no MindSpore)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-stock", action="store_true", help="skip the stock arm (slow on large configs)")
    p.add_argument("--layers", type=int, help="encoder layers of the model (default: the config's)")
    p.add_argument("--products", action="store_true", help="add the matrix-products-alone arm (see above)")
    p.add_argument("--bf16", action="store_true",
                   help="add the host encoder with matmul_precision=bfloat16 (AVX512_BF16 CPUs; elsewhere it "
                        "runs float32 and says so)")
    p.add_argument("--isa", choices=from_isa, help="force this kernel variant in every arm (Config(isa=...))")
    p.add_argument("--fresh-verdict", action="store_true",
                   help="the auto arm measures now (an empty verdict cache) instead of reading a kept verdict")
    p.add_argument("--settle", type=float, default=0.0,
                   help="seconds idle before each timed call (MindSpore's threads spin on after a graph launch)")
    p.add_argument("--json")
    p.add_argument("--worker", choices=["mindnlp", "pytorch"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p


def _forwarded(a):
    """The worker's arguments from ``a``."""
    return (["--config", a.config, "--seed", str(a.seed), "--batch", str(a.batch), "--repeats", str(a.repeats)]
            + (["--no-stock"] if a.no_stock else []) + (["--layers", str(a.layers)] if a.layers else [])
            + (["--products"] if a.products else []) + (["--bf16"] if a.bf16 else [])
            + (["--isa", a.isa] if a.isa else [])
            + (["--fresh-verdict"] if a.fresh_verdict else []) + ["--settle", str(a.settle)])


def _verdict_text(r) -> str:
    v = r.get("verdict") or {}
    if not v:
        return "-"
    secs = ", ".join(f"{k} {t:.3f} s" for k, t in sorted((v.get("seconds") or {}).items()))
    return f"{v.get('executor')} ({secs}; {v.get('source')})"


def main() -> int:
    a = parser().parse_args()
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
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker[:7], "--folder", folder] + _forwarded(a)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
            if proc.returncode != 0:
                print(f"the {worker} worker failed", file=sys.stderr)
                return 1
            res[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
    mind = res["mindnlp"]
    arms, pt = mind["arms"], res["pytorch"]
    # PyTorch runs after the MindNLP process, twice (not interleaved with it): the faster run
    pt = min(res.pop("pytorch2"), pt, key=lambda r: r["median_s"])
    res["pytorch"] = pt
    kernels = mind["fused_kernels"]
    cpu = mind["cpu"]
    print(f"encoder, {a.config} (random weights, real dimensions, {mind['encoder_layers']} layers), "
          f"batch {a.batch} x 3000 frames, {a.repeats} interleaved repeats, medians; "
          f"CPU: {cpu['model']} ({cpu['arch']}; kernel variants it runs: {', '.join(cpu['runnable']) or 'none'}); "
          f"kernels: {kernels['isa'] + ' ' + kernels['library'] if kernels['library'] else kernels['reason']}")
    if kernels["library"] and mind["graphs_bound"] and mind["graphs_bound"] != kernels["library"]:
        print(f"WARNING: the fused graphs ran {mind['graphs_bound']}, not {kernels['library']}", file=sys.stderr)
    auto = arms.get(AUTO, {})
    print(f"patch() (auto) ran: {auto.get('executor')}; verdict: {_verdict_text(auto)}; "
          f"measuring calls before the timed ones: {len(mind['auto_measuring_s'])} "
          f"({sum(mind['auto_measuring_s']):.2f} s)")
    print("| arm | executor | layers a launch | median s | min s | first s | vs PyTorch | rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in arms.items():
        rel = "-" if r["rel_diff_vs_stock"] is None else f"{r['rel_diff_vs_stock']:.1e}"
        label = f"{name} (patch()'s choice)" if name == AUTO else name
        print(f"| {label} | {r.get('executor') or '-'} | {r.get('layers_per_launch') or '-'} | {r['median_s']:.3f} | "
              f"{r['min_s']:.3f} | {r['first_s']:.2f} | {r['median_s'] / pt['median_s']:.2f}x | {rel} |")
    print(f"| PyTorch {pt['torch']} ({pt['threads']} threads) | - | - | {pt['median_s']:.3f} | {pt['min_s']:.3f} | "
          f"{pt['first_s']:.2f} | 1.00x | {pt['rel_diff_vs_fused']:.1e} vs fused |")
    if BF16 in arms:
        r, prec = arms[BF16], arms[BF16].get("matmul_precision") or {}
        print(f"{BF16}: products ran in {prec.get('host')}" + (f" ({prec['why']})" if prec.get("why") else "")
              + (f"; {arms['stock']['median_s'] / r['median_s']:.2f}x stock" if "stock" in arms else "")
              + (f"; {r['median_s'] / arms[HOST]['median_s']:.2f}x the float32 host arm's time"
                 if HOST in arms else ""))
    executors = {n: r["median_s"] for n, r in arms.items() if n in ("plain", "fused", "fused, 1 layer a launch", HOST)}
    if AUTO in arms and executors:
        best = min(executors, key=executors.get)
        print(f"auto takes {arms[AUTO]['median_s'] / executors[best]:.2f}x the fastest arm's time ({best})")
    if PRODUCTS in arms:
        print(f"fused takes {arms['fused']['median_s'] / arms[PRODUCTS]['median_s']:.2f}x the matrix products' time")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "batch": a.batch, "repeats": a.repeats, "isa": a.isa, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
