"""Patched MindNLP vs stock MindNLP vs PyTorch + transformers: same weights, input and tokens.

    .venv/bin/python benchmarks/vs_pytorch.py --config tiny --max-new-tokens 32 --repeats 5 \
        [--model DIR] [--json out.json]

Three processes: one MindNLP process builds (or loads) the model, saves its weights to a temp
Hugging Face folder when random, and times stock and patched greedy ``generate`` interleaved;
one PyTorch process (MindNLP never imported) loads the same folder and times the same call on
the same log-mel features. Prints a table, writes JSON, and says whether all token ids agree.
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


def _time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def worker_mindnlp(a) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    from transformers.utils import logging

    logging.set_verbosity_error()
    from whisper_accel import bench, models

    if a.model:
        model = models.load_model(a.model)
    else:
        model = models.random_model(a.config, seed=a.seed)
        model.save_pretrained(a.folder)
    feats = bench.log_mel(None, models.synthetic_audio(30.0, a.seed), mels=model.config.num_mel_bins)
    np.save(os.path.join(a.folder, "features.npy"), feats.asnumpy())
    rows = bench.compare(model, feats, stages=["generate"], variants=["stock", "all"],
                         repeats=a.repeats, max_new_tokens=a.max_new_tokens,
                         progress=bench.stderr_progress)
    import torch
    import whisper_accel

    with whisper_accel.patched(), torch.no_grad():
        tokens = model.generate(feats, max_new_tokens=a.max_new_tokens,
                                min_new_tokens=a.max_new_tokens, do_sample=False).asnumpy()
    return {"rows": [r.as_dict() for r in rows], "tokens": tokens.tolist()}


def worker_pytorch(a) -> dict:
    import torch
    from transformers import WhisperForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    assert "mindnlp" not in sys.modules
    model = WhisperForConditionalGeneration.from_pretrained(a.model or a.folder).eval()
    feats = torch.tensor(np.load(os.path.join(a.folder, "features.npy")))

    def gen():
        with torch.no_grad():
            return model.generate(feats, max_new_tokens=a.max_new_tokens,
                                  min_new_tokens=a.max_new_tokens, do_sample=False)

    out, times = _time(gen, a.repeats)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "tokens": out.numpy().tolist(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--worker", choices=["mindnlp", "pytorch"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        result = (worker_mindnlp if a.worker == "mindnlp" else worker_pytorch)(a)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        common = [sys.executable, __file__, "--config", a.config, "--seed", str(a.seed),
                  "--max-new-tokens", str(a.max_new_tokens), "--repeats", str(a.repeats),
                  "--folder", folder] + (["--model", a.model] if a.model else [])
        results = {}
        for w in ("mindnlp", "pytorch"):
            proc = subprocess.run(common + ["--worker", w], stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"{w} worker failed", file=sys.stderr)
                return proc.returncode
            results[w] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["variant"]: r for r in results["mindnlp"]["rows"]}
    pt = results["pytorch"]
    same = results["mindnlp"]["tokens"] == pt["tokens"]
    print(f"generate, {a.model or a.config + ' random weights'}, {a.max_new_tokens} tokens, "
          f"median of {a.repeats}")
    print(f"{'arm':<16}{'median s':>10}{'vs stock':>10}{'vs pytorch':>12}")
    for name, med in (("mindnlp stock", rows["stock"]["median_s"]),
                      ("mindnlp patched", rows["all"]["median_s"]),
                      (f"pytorch {pt['torch']}", pt["median_s"])):
        print(f"{name:<16}{med:>10.3f}{rows['stock']['median_s'] / med:>9.2f}x"
              f"{med / pt['median_s']:>11.2f}x")
    print("tokens: patched == stock: " + str(rows["all"]["tokens_equal"]) +
          f"; patched == pytorch: {same}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.model or a.config, "max_new_tokens": a.max_new_tokens,
                       "mindnlp": results["mindnlp"]["rows"], "pytorch": pt,
                       "tokens_equal_pytorch": same}, f, indent=2)
    return 0 if same and rows["all"]["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
