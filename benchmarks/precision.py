"""``matmul_precision="bfloat16"`` against float32 on real speech: what the bfloat16 encoder
products change in the output, and what they save.

    .venv/bin/python tests/fixtures/ct2_to_hf.py /tmp/tinyen          # real tiny.en weights, offline
    .venv/bin/python benchmarks/precision.py --model /tmp/tinyen [--audio CLIP ...] [--repeats 3] \\
        [--json out.json]

One process, one model, patched; two arms that differ only in ``Config.matmul_precision``
(``float32``, ``bfloat16``: the encoder's products and the decoder steps' weights), both on the
host executors (``encoder="host"``, ``decoder="host"``; the bfloat16 paths exist only there), each
keeping its own engines, run interleaved per clip and mode
(float32, bfloat16, float32, ...) after a first call; medians. Clips: every speech file of
``tests/data`` (``transcripts.json`` gives what was said) and any ``--audio``. Modes: ``greedy``
and ``beam5`` (``generate`` on the clip's first 30 s; token ids) and ``pipeline_greedy`` (the ASR
pipeline with timestamps, sequential long-form past 30 s; text and chunks), from
``benchmarks/decoding.py``.

Per clip and mode: whether the outputs are identical, the token agreement (positions where the
two arms' token ids are equal, over the longer sequence; generate modes), the word error rate
of the bfloat16 text against the float32 text, and each arm's word error rate against what was
said (where known: tests/data's clips; generate modes only on clips of at most 30 s, which they
decode whole). The summary counts identical outputs and sums the word
errors; the header names the CPU. On a CPU without AVX512_BF16 the bfloat16 arm runs float32
(the output says so and the comparison is empty).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: test speech whose words are known (tests/data/transcripts.json)
DATA_CLIPS = ("short_fox.wav", "stella.wav", "booking.wav", "weather.wav", "speech_44k.wav", "speech_8k.wav",
              "long_form.wav")
MODES = ("greedy", "beam5", "pipeline_greedy")
PRECISIONS = ("float32", "bfloat16")


def words(text: str) -> list:
    """Lower-case words without punctuation (what a word error rate counts)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def word_errors(hypothesis: str, reference: str) -> tuple:
    """(word edits, reference words) of ``hypothesis`` against ``reference``."""
    ref = words(reference)
    return edit_distance(words(hypothesis), ref), len(ref)


def token_agreement(a: list, b: list) -> float:
    """Share of positions, over the longer of two token sequences, where both hold the same id."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b)) / n


def _text(out, processor) -> str:
    if isinstance(out, dict):
        return out.get("text", "")
    return processor.batch_decode(out, skip_special_tokens=True)[0]


class Arm:
    """One ``matmul_precision``: its config, and the engines it keeps between calls (the
    encoder's, on the encoder module; the decoder's, on the model)."""

    def __init__(self, model, cfg):
        self.model, self.cfg, self.engines = model, cfg, {}

    def _modules(self):
        return {"encoder": self.model.model.encoder, "decoder": self.model}

    def __enter__(self):
        from whisper_accel import config
        from whisper_accel.runtime.binding import ATTR

        config.activate(self.cfg)  # an engine built now reads it
        for name, module in self._modules().items():
            if name in self.engines:
                module.__dict__[ATTR] = self.engines[name]
            else:
                module.__dict__.pop(ATTR, None)
        return self

    def __exit__(self, *exc):
        from whisper_accel.runtime.binding import ATTR

        for name, module in self._modules().items():
            if module.__dict__.get(ATTR):
                self.engines[name] = module.__dict__[ATTR]

    def precision(self):
        """What ran: the encoder's products, and the weights the decoder's host steps read."""
        enc, dec = self.engines.get("encoder"), self.engines.get("decoder")
        step = dec.engine.executors["host"].impl if dec is not None else None
        return {"encoder": enc.report()["matmul_precision"] if enc is not None else None,
                "decoder_steps": step.weights if step is not None else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face Whisper folder (real weights)")
    p.add_argument("--audio", nargs="*", default=[], help="more clips (their words unknown)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    os.environ.setdefault("GLOG_v", "3")
    sys.path.insert(0, HERE)
    import mindnlp  # noqa: F401
    import numpy as np
    import torch
    from decoding import run_mode
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging
    from vs_pytorch import cpu_name

    import whisper_accel
    from whisper_accel.config import Config
    from whisper_accel.models import read_audio

    logging.set_verbosity_error()
    model = WhisperForConditionalGeneration.from_pretrained(a.model, local_files_only=True).eval()
    processor = WhisperProcessor.from_pretrained(a.model, local_files_only=True)
    with open(os.path.join(ROOT, "tests", "data", "transcripts.json")) as f:
        said = json.load(f)
    clips = [os.path.join(ROOT, "tests", "data", c) for c in DATA_CLIPS] + list(a.audio)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    base = Config.from_env().with_(encoder="host", decoder="host")
    arms = {name: Arm(model, base.with_(matmul_precision=name)) for name in PRECISIONS}
    whisper_accel.patch(config=base)
    cpu = cpu_name()
    print(f"CPU: {cpu}; model {a.model}; medians of {a.repeats}, arms interleaved")
    rows = []
    for clip in clips:
        audio = read_audio(clip)
        feats = processor(audio[:480000], sampling_rate=16000, return_tensors="pt").input_features
        truth = (said.get(os.path.basename(clip)) or {}).get("text")
        for mode in modes:
            outs, times, first = {}, {n: [] for n in arms}, {}
            for r in range(a.repeats + 1):
                for name, arm in arms.items():
                    with arm, torch.no_grad():
                        t0 = time.perf_counter()
                        outs[name] = run_mode(mode, model, processor, audio, feats)
                        dt = time.perf_counter() - t0
                    (times[name].append(dt) if r else first.__setitem__(name, dt))
            f32, b16 = outs["float32"], outs["bfloat16"]
            t32, t16 = _text(f32, processor), _text(b16, processor)
            edits, n = word_errors(t16, t32)
            row = {"clip": os.path.basename(clip), "mode": mode, "identical": f32 == b16,
                   "token_agreement": (token_agreement(f32[0], b16[0]) if isinstance(f32, list) else None),
                   "word_edits_vs_float32": edits, "words_float32": n,
                   "float32_s": statistics.median(times["float32"]), "bfloat16_s": statistics.median(times["bfloat16"]),
                   "float32_first_s": first["float32"], "bfloat16_first_s": first["bfloat16"],
                   "text_float32": t32, "text_bfloat16": t16,
                   "precision": arms["bfloat16"].precision()}
            if truth and (mode.startswith("pipeline") or len(audio) <= 480000):  # the whole clip decoded
                row["wer_float32_vs_said"] = word_errors(t32, truth)
                row["wer_bfloat16_vs_said"] = word_errors(t16, truth)
            rows.append(row)
            agree = "-" if row["token_agreement"] is None else f"{row['token_agreement']:.3f}"
            print(f"{row['clip']:<16} {mode:<16} identical {str(row['identical']):<5} tokens {agree:<6} "
                  f"word edits vs float32 {edits}/{n}  float32 {row['float32_s']:.2f} s  bfloat16 "
                  f"{row['bfloat16_s']:.2f} s ({row['bfloat16_s'] / row['float32_s']:.2f}x)", flush=True)
    ran = {json.dumps(r["precision"], sort_keys=True) for r in rows}
    edits = sum(r["word_edits_vs_float32"] for r in rows)
    total = sum(r["words_float32"] for r in rows)
    said_rows = [r for r in rows if "wer_float32_vs_said" in r]
    summary = {"cpu": cpu, "rows": len(rows), "identical": sum(r["identical"] for r in rows),
               "word_edits_vs_float32": edits, "words_float32": total,
               "wer_vs_float32": edits / total if total else None,
               "wer_float32_vs_said": _rate([r["wer_float32_vs_said"] for r in said_rows]),
               "wer_bfloat16_vs_said": _rate([r["wer_bfloat16_vs_said"] for r in said_rows]),
               "speed_bfloat16_over_float32": float(np.median([r["bfloat16_s"] / r["float32_s"] for r in rows])),
               "bfloat16_arm_ran": [json.loads(x) for x in ran]}
    print(f"\n{summary['identical']}/{summary['rows']} outputs identical; bfloat16 text against float32's: "
          f"{edits} word edits in {total} words; word error rate against what was said (tests/data clips): "
          f"float32 {summary['wer_float32_vs_said']:.3f}, bfloat16 {summary['wer_bfloat16_vs_said']:.3f}; "
          f"bfloat16 / float32 time, median over rows: {summary['speed_bfloat16_over_float32']:.2f}x; "
          f"the bfloat16 arm ran: {summary['bfloat16_arm_ran']}")
    whisper_accel.unpatch()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=2)
    return 0


def _rate(pairs) -> float:
    edits, n = sum(e for e, _ in pairs), sum(n for _, n in pairs)
    return edits / n if n else float("nan")


if __name__ == "__main__":
    sys.exit(main())
