"""The first call of a fresh process: the seed script's pipeline, patched against PyTorch.

    .venv/bin/python benchmarks/first_call.py --tiny-en [--rounds 4] [--json out.json]
    .venv/bin/python benchmarks/first_call.py --model DIR --audio CLIP [--rounds 4] [--json out.json]

A script that transcribes one file runs once: what it costs is its import, its model load and
its first pipeline call. Each arm runs in fresh processes, and the arms alternate in every round
(the order reversed each round) so that the machine's drift over minutes lands on each alike.
Every child times its own steps: the imports, the load (model, processor, pipeline), the first
pipeline call and a second call on the same audio, and prints the text.

Arms:

* ``patched``: the MindSpore blog's seed script as written (``examples/seed_tutorial.py``:
  float16, ``attn_implementation="flash_attention_2"``, the ASR pipeline with
  ``return_timestamps=True``), with ``whisper_accel.patch()`` before it (what ``WHISPER_ACCEL=1``
  does through the .pth hook);
* ``patched-fp32``: the same script in float32;
* ``pytorch``: PyTorch + transformers on the same weights, float32 (the precision a CPU user
  runs there), the same pipeline call; MindNLP is never imported.

Stock MindNLP cannot run the seed script at all (``docs/seed-script.md``). One untimed child per
arm runs first, so the plugin's caches (kernel build, probe results, the measured executor
choice) are those of a machine that has run it before, as a user's second script finds them;
the first run on a new machine also builds the kernels (``whisper-accel doctor`` shows that).
``--tiny-en`` converts the real tiny.en weights offline (``tests/fixtures/ct2_to_hf.py``) and
uses the 7.5 s anchor clip of ``vs_pytorch.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PATCHED = """
import json, sys, time
t0 = time.perf_counter()
import mindspore
import whisper_accel
whisper_accel.patch()
from mindnlp.transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline
t1 = time.perf_counter()
model_dir, path_to_audio_file, half = sys.argv[1], sys.argv[2], sys.argv[3] == "float16"
extra = dict(ms_dtype=mindspore.float16) if half else {}
model = AutoModelForSpeechSeq2Seq.from_pretrained(model_dir, low_cpu_mem_usage=True, use_safetensors=True,
                                                  attn_implementation="flash_attention_2", **extra)
processor = AutoProcessor.from_pretrained(model_dir)
pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                feature_extractor=processor.feature_extractor, return_timestamps=True, **extra)
"""

_PYTORCH = """
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline
from transformers.utils import logging
logging.set_verbosity_error()
t1 = time.perf_counter()
assert "mindnlp" not in sys.modules
model_dir, path_to_audio_file = sys.argv[1], sys.argv[2]
model = AutoModelForSpeechSeq2Seq.from_pretrained(model_dir, low_cpu_mem_usage=True, use_safetensors=True)
processor = AutoProcessor.from_pretrained(model_dir)
pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                feature_extractor=processor.feature_extractor, return_timestamps=True)
"""

#: after either script's load: the two pipeline calls, timed, and the JSON line the parent reads
_CALLS = """
t2 = time.perf_counter()
result = pipe(path_to_audio_file)
t3 = time.perf_counter()
again = pipe(path_to_audio_file)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2, "second_s": t4 - t3,
                  "text": result["text"], "same_again": again["text"] == result["text"]}))
"""

ARMS = {"patched": (_PATCHED, "float16"), "patched-fp32": (_PATCHED, "float32"), "pytorch": (_PYTORCH, "float32")}
STEPS = ("import_s", "load_s", "first_s", "second_s")


def child(arm: str, model: str, audio: str) -> dict:
    code, dtype = ARMS[arm]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_ACCEL")}
    env.setdefault("GLOG_v", "3")
    out = subprocess.run([sys.executable, "-c", code + _CALLS, model, audio, dtype], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: dict) -> dict:
    """Per arm: the median of each step over the rounds, with its range, and the texts."""
    out = {}
    for arm, rows in runs.items():
        out[arm] = {k: statistics.median(r[k] for r in rows) for k in STEPS}
        out[arm].update({k + "_range": [min(r[k] for r in rows), max(r[k] for r in rows)] for k in STEPS})
        out[arm]["texts"] = sorted({r["text"] for r in rows})
        out[arm]["runs"] = len(rows)
    return out


def order(arms: list, rnd: int) -> list:
    """The arms of round ``rnd``: as listed in even rounds, reversed in odd ones."""
    return list(arms) if rnd % 2 == 0 else list(reversed(arms))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model")
    p.add_argument("--audio")
    p.add_argument("--tiny-en", action="store_true", help="real tiny.en weights and the 7.5 s anchor clip")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json")
    a = p.parse_args()
    arms = a.arms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny_en:
            sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
            import vs_pytorch

            made = vs_pytorch.tiny_en(tmp)
            a.model, a.audio = a.model or made["model"], a.audio or made["speech"]
        if not (a.model and a.audio):
            p.error("--model and --audio (or --tiny-en)")
        for arm in arms:  # caches as a second run finds them
            child(arm, a.model, a.audio)
        runs = {arm: [] for arm in arms}
        for rnd in range(a.rounds):
            for arm in order(arms, rnd):
                runs[arm].append(child(arm, a.model, a.audio))
                print(f"round {rnd + 1} {arm}: " + " ".join(f"{k} {runs[arm][-1][k]:.2f}" for k in STEPS),
                      file=sys.stderr)
    s = summary(runs)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import vs_pytorch

    cpu = vs_pytorch.cpu_name()
    print(f"first call of a fresh process, {os.path.basename(a.audio)}, medians of {a.rounds} rounds; CPU: {cpu}")
    print(f"{'arm':<14}{'import s':>10}{'load s':>9}{'first call s':>14}{'second call s':>15}  text")
    for arm in arms:
        r = s[arm]
        print(f"{arm:<14}{r['import_s']:>10.2f}{r['load_s']:>9.2f}{r['first_s']:>14.2f}{r['second_s']:>15.2f}"
              f"  {' | '.join(t.strip() for t in r['texts'])}")
    if "pytorch" in s:
        for arm in arms:
            if arm != "pytorch":
                print(f"{arm} / pytorch: first call {s[arm]['first_s'] / s['pytorch']['first_s']:.2f}x, "
                      f"load + first call {(s[arm]['load_s'] + s[arm]['first_s']) / (s['pytorch']['load_s'] + s['pytorch']['first_s']):.2f}x, "
                      f"same text: {s[arm]['texts'] == s['pytorch']['texts']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu, "audio": os.path.basename(a.audio), "rounds": a.rounds, "arms": s,
                       "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
