"""Greedy generate with ``return_timestamps=True``: stock vs patched vs patched without ``greedy``.

    .venv/bin/python tests/fixtures/ct2_to_hf.py /tmp/tinyen
    .venv/bin/python benchmarks/timestamps.py /tmp/tinyen tests/data/stella.wav --repeats 5 [--json out.json]

One process, variants interleaved after a warm-up round, medians. Features are computed once
with transformers' numpy log-mel path (stock MindNLP cannot compute them), so every arm times
the same ``model.generate(features, return_timestamps=True)``. Token ids (timestamps included)
must be identical across arms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("audio")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    import torch
    from transformers import WhisperProcessor
    from transformers.utils import logging

    import whisper_accel
    from whisper_accel import bench, models

    logging.set_verbosity_error()
    model = models.load_model(a.model)
    processor = WhisperProcessor.from_pretrained(a.model, local_files_only=True)
    feats = bench.log_mel(processor, models.read_audio(a.audio))
    arms = {"stock": None, "all": {}, "all but greedy": {"greedy": False}}
    times = {name: [] for name in arms}
    tokens = {}
    for r in range(a.repeats + 1):
        for name, groups in arms.items():
            if groups is not None:
                whisper_accel.patch(**groups)
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    tokens[name] = model.generate(feats, return_timestamps=True).asnumpy().tolist()
                if r:  # round 0 is the warm-up
                    times[name].append(time.perf_counter() - t0)
            finally:
                whisper_accel.unpatch()
    same = all(t == tokens["stock"] for t in tokens.values())
    stock = statistics.median(times["stock"])
    print(f"generate(return_timestamps=True), {a.model}, {a.audio}, median of {a.repeats}")
    print(f"{'arm':<16}{'median s':>10}{'speedup':>9}")
    for name, ts in times.items():
        print(f"{name:<16}{statistics.median(ts):>10.3f}{stock / statistics.median(ts):>8.2f}x")
    print(f"tokens identical: {same}; {len(tokens['stock'][0])} tokens: "
          + processor.batch_decode(tokens["stock"], decode_with_timestamps=True)[0])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "audio": a.audio, "repeats": a.repeats, "tokens_equal": same,
                       "median_s": {n: statistics.median(t) for n, t in times.items()},
                       "times_s": times, "tokens": tokens["stock"]}, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
