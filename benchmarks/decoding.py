"""Decoding modes users run, stock vs patched, on one model and clip.

    .venv/bin/python tests/fixtures/ct2_to_hf.py /tmp/tinyen          # real tiny.en weights, offline
    .venv/bin/python benchmarks/decoding.py --model /tmp/tinyen --audio tests/data/stella.wav \\
        --modes greedy,beam5,beam5_timestamps,pipeline --repeats 3 [--json out.json]
    .venv/bin/python benchmarks/decoding.py --config tiny --modes greedy,beam5   # random weights
    .venv/bin/python benchmarks/decoding.py --model /tmp/tinyen --audio ... --pytorch  # + PyTorch column

Modes: ``greedy`` (``generate``), ``beam5`` (``num_beams=5``), ``beam5_timestamps`` (the same
with ``return_timestamps=True``), ``pipeline`` (transformers' ASR pipeline with
``return_timestamps=True`` and its default decoding, ``num_beams=5``: the seed script's call),
``assisted`` (greedy ``generate`` with ``assistant_model`` = the model itself: speculative
decoding whose candidates are always accepted),
``streamer`` (greedy ``generate`` with a recording ``BaseStreamer``: what it receives is
compared too), ``static`` / ``static_beam5`` (``cache_implementation="static"``, greedy / 5 beams),
``chunked`` (the same pipeline with ``chunk_length_s=30, batch_size=2``: a batch of windows,
each decoded with 5 beams), ``sampled`` (``temperature=0.7``), ``fallback`` (the pipeline with
the model card's long-form recipe: temperature fallback 0.0 ... 1.0, compression-ratio,
log-prob and no-speech thresholds; windows that fall back are sampled), ``words`` (the pipeline
with ``return_timestamps="word"``, its default 5 beams; stock needs the ``compat`` group's
timestamp fixes), ``words_greedy`` and ``pipeline_greedy`` (``words`` / ``pipeline`` with
``num_beams=1``).
``generate`` modes time ``model.generate(features)`` on features computed once with
transformers' numpy log-mel path; in ``pipeline`` mode the stock arm is stock MindNLP plus the
``compat`` group only, because bare stock MindNLP cannot compute log-mel features (no
``torch.stft`` in mindtorch). Arms run interleaved (stock, patched, stock, ...) after a
warm-up round whose time is reported as ``first s``; medians. The outputs (token ids, or the
pipeline's text and chunks) of both arms must be identical. ``--pytorch`` (with ``--model``)
times every mode in a separate process on real PyTorch + transformers, same folder, audio and
features (MindNLP never imported there), and says whether its outputs equal the patched ones
(differences there are reported, not failures: the frameworks' kernels round differently).
``--no-stock`` leaves the stock arm out (long clips, where only patched vs PyTorch is wanted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MODES = {
    "greedy": dict(),
    "beam5": dict(num_beams=5),
    "beam5_timestamps": dict(num_beams=5, return_timestamps=True),
    "sampled": dict(temperature=0.7),
    # Hugging Face's Whisper speed recipes (issue 24)
    "streamer": dict(),  # greedy with a streamer attached (what a streaming UI passes)
    "static": dict(cache_implementation="static"),
    "static_beam5": dict(num_beams=5, cache_implementation="static"),
    "assisted": dict(),  # assistant_model=the model itself (agrees on every token), see run_mode
}
#: The Hugging Face model card's long-form recipe (sequential, temperature fallback).
FALLBACK = dict(num_beams=1, condition_on_prev_tokens=False, compression_ratio_threshold=1.35,
                temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), logprob_threshold=-1.0, no_speech_threshold=0.6)
#: Modes whose outputs are drawn: stock's draws cannot be seeded under mindtorch, so outputs
#: are compared only when both arms decoded greedily (the distributions are checked in tests).
SAMPLED = {"sampled", "fallback"}
PIPELINES = {"pipeline": {}, "pipeline_greedy": {}, "chunked": dict(chunk_length_s=30, batch_size=2), "fallback": {},
             "words": {}, "words_greedy": {}}


def run_mode(mode, model, processor, audio, feats, max_new_tokens=None):
    """One call of ``mode``; its output as comparable Python data. Runs under MindNLP (mindtorch)
    and under real PyTorch alike (``feats``: that framework's tensor)."""
    import torch
    from transformers import pipeline

    from whisper_accel.models import SAMPLE_RATE

    if mode in PIPELINES:
        kw = dict(generate_kwargs=FALLBACK) if mode == "fallback" else {}
        if mode.startswith("words"):
            kw = dict(return_timestamps="word")
        if mode.endswith("_greedy"):
            kw["generate_kwargs"] = {"num_beams": 1}
        asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                       feature_extractor=processor.feature_extractor, **PIPELINES[mode])
        out = asr({"raw": audio, "sampling_rate": SAMPLE_RATE}, **{"return_timestamps": True, **kw})
        return json.loads(json.dumps(out, sort_keys=True, default=_plain))
    kw = dict(MODES[mode])
    if max_new_tokens:
        kw.update(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    if mode == "assisted":  # speculative decoding with an assistant that always agrees
        kw["assistant_model"] = model
        kw.pop("min_new_tokens", None)  # stock's assisted decoding refuses a minimum-length processor
    streamer = _recording_streamer() if mode == "streamer" else None
    if streamer is not None:
        kw["streamer"] = streamer
    with torch.no_grad():
        out = model.generate(feats, **kw).tolist()
    # streamer: what it was sent (prompt, each step's tokens, end) is part of the output
    return out if streamer is None else {"sequences": out, "streamed": streamer.seen}


def _recording_streamer():
    """A ``BaseStreamer`` that keeps what ``generate`` sends it, as lists ("end" for ``end()``)."""
    from transformers.generation.streamers import BaseStreamer

    class Recording(BaseStreamer):
        def __init__(self):
            self.seen = []

        def put(self, value):
            self.seen.append(value.tolist())

        def end(self):
            self.seen.append("end")

    return Recording()


def _plain(x):
    return x.tolist() if hasattr(x, "tolist") else str(x)


def pytorch_worker(a) -> int:
    """``--worker pytorch``: the same modes on real PyTorch + transformers (MindNLP is never
    imported in this process), same weights, audio and features; prints JSON."""
    import numpy as np
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging

    from whisper_accel.models import read_audio, synthetic_audio

    assert "mindnlp" not in sys.modules
    logging.set_verbosity_error()
    model = WhisperForConditionalGeneration.from_pretrained(a.model, local_files_only=True).eval()
    processor = WhisperProcessor.from_pretrained(a.model, local_files_only=True)
    audio = read_audio(a.audio) if a.audio else synthetic_audio(30.0)
    feats = torch.tensor(np.load(a.features))
    out = {}
    for mode in [m.strip() for m in a.modes.split(",") if m.strip()]:
        times = []
        for r in range(a.repeats + 1):
            t0 = time.perf_counter()
            output = run_mode(mode, model, processor, audio, feats, a.max_new_tokens)
            times.append(time.perf_counter() - t0)
        out[mode] = {"first_s": times[0], "median_s": statistics.median(times[1:]), "output": output}
    print(json.dumps({"torch": torch.__version__, "modes": out}))
    return 0


def pytorch_arm(a, feats_np) -> dict:
    import subprocess
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.npy")
        np.save(path, feats_np)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "pytorch", "--model", a.model,
               "--modes", a.modes, "--repeats", str(a.repeats), "--features", path]
        cmd += ["--audio", a.audio] if a.audio else []
        cmd += ["--max-new-tokens", str(a.max_new_tokens)] if a.max_new_tokens else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_ACCEL")}
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             env.get("PYTHONPATH", "")])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit("the PyTorch worker failed (is PyTorch installed?)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face Whisper folder")
    p.add_argument("--config", default="tiny", help="random-weight dimensions when no --model")
    p.add_argument("--audio", help="audio file (default: 30 s of seeded synthetic audio)")
    p.add_argument("--modes", default="greedy,beam5")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="force this many tokens in generate modes (random weights)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pytorch", action="store_true",
                   help="also time each mode on PyTorch + transformers (separate process; needs --model)")
    p.add_argument("--no-stock", action="store_true",
                   help="skip the stock arm (long clips; with --pytorch, patched vs PyTorch only)")
    p.add_argument("--json")
    p.add_argument("--worker", choices=["pytorch"], help=argparse.SUPPRESS)
    p.add_argument("--features", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return pytorch_worker(a)
    if a.pytorch and not a.model:
        p.error("--pytorch needs --model (the PyTorch process loads the same folder)")
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    from transformers import WhisperProcessor
    from transformers.utils import logging

    import whisper_accel
    from whisper_accel import bench, models
    from whisper_accel.groups import NAMES

    logging.set_verbosity_error()
    if a.model:
        model = models.load_model(a.model)
        processor = WhisperProcessor.from_pretrained(a.model, local_files_only=True)
        label = os.path.basename(os.path.abspath(a.model))
    else:
        model, processor, label = models.random_model(a.config), None, f"{a.config} (random weights)"
    audio = models.read_audio(a.audio) if a.audio else models.synthetic_audio(30.0)
    feats = bench.log_mel(processor, audio, mels=model.config.num_mel_bins)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    reference = pytorch_arm(a, feats.asnumpy()) if a.pytorch else None

    def run(mode):
        return run_mode(mode, model, processor, audio, feats, a.max_new_tokens)

    rows = []
    for mode in modes:
        stock_groups = {g: g == "compat" for g in NAMES} if mode in PIPELINES else None
        arms = {"patched": {}} if a.no_stock else {"stock": stock_groups, "patched": {}}
        times, outputs, first = {n: [] for n in arms}, {}, {}
        for r in range(a.repeats + 1):
            for name, groups in arms.items():
                if groups is not None:
                    whisper_accel.patch(**groups)
                try:
                    t0 = time.perf_counter()
                    outputs[name] = run(mode)
                    elapsed = time.perf_counter() - t0
                finally:
                    whisper_accel.unpatch()
                if r:
                    times[name].append(elapsed)
                else:
                    first[name] = elapsed
                print(f"[{r}/{a.repeats}] {mode:<18}{name:<8}{elapsed:8.2f} s", file=sys.stderr, flush=True)
        med = {n: statistics.median(t) for n, t in times.items()}
        stock = "stock" in arms
        rows.append({"mode": mode, "stock_median_s": med.get("stock"), "patched_median_s": med["patched"],
                     "stock_first_s": first.get("stock"), "patched_first_s": first["patched"],
                     "speedup": med["stock"] / med["patched"] if stock else None,
                     "outputs_equal": outputs["stock"] == outputs["patched"] if stock else None,
                     "sampled": mode in SAMPLED, "times_s": times})
        if reference is not None:
            ref = reference["modes"][mode]
            rows[-1].update(pytorch_median_s=ref["median_s"], pytorch_first_s=ref["first_s"],
                            patched_vs_pytorch=med["patched"] / ref["median_s"],
                            equal_to_pytorch=ref["output"] == outputs["patched"])
    print(f"decoding modes, {label}, {a.audio or 'synthetic 30 s'}, medians of {a.repeats} (first call apart)")
    print(f"{'mode':<18}{'stock s':>9}{'patched s':>11}{'speedup':>9}{'first s (stock/patched)':>26}  outputs")
    for r in rows:
        if r["stock_median_s"] is None:
            print(f"{r['mode']:<18}{'-':>9}{r['patched_median_s']:>11.2f}{'-':>9}{'-':>14} / "
                  f"{r['patched_first_s']:<9.2f}  stock not run")
            continue
        print(f"{r['mode']:<18}{r['stock_median_s']:>9.2f}{r['patched_median_s']:>11.2f}{r['speedup']:>8.1f}x"
              f"{r['stock_first_s']:>14.2f} / {r['patched_first_s']:<9.2f}  "
              + ("equal" if r["outputs_equal"] else "sampled: not comparable" if r["sampled"] else "DIFFER!"))
    if reference is not None:
        print(f"PyTorch {reference['torch']} + transformers, same weights, separate process:")
        print(f"{'mode':<18}{'pytorch s':>10}{'patched s':>11}{'patched/pytorch':>17}{'first s':>9}  outputs vs patched")
        for r in rows:
            print(f"{r['mode']:<18}{r['pytorch_median_s']:>10.2f}{r['patched_median_s']:>11.2f}"
                  f"{r['patched_vs_pytorch']:>16.2f}x{r['pytorch_first_s']:>9.2f}  "
                  + ("equal" if r["equal_to_pytorch"] else "drawn" if r["sampled"] else "differ"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": label, "audio": a.audio, "repeats": a.repeats,
                       "pytorch": reference["torch"] if reference else None, "rows": rows}, f, indent=2)
    return 0 if all(r["outputs_equal"] is not False or r["sampled"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
