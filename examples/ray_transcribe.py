"""Transcribe a folder of audio files with Ray Data; every worker is patched with no code change.

    pip install ".[ray]"                       # this project plus Ray Data
    python examples/ray_transcribe.py MODEL_DIR AUDIO_DIR [--workers 2] [--json out.json]

MODEL_DIR is a local Hugging Face Whisper folder (weights, tokenizer, preprocessor config);
AUDIO_DIR a folder of audio files (anything ffmpeg decodes: .wav, .flac, .mp3, ...) or one file.

Nothing below imports or calls whisper_accel to patch: the driver starts Ray with

    ray.init(runtime_env={"env_vars": {"WHISPER_ACCEL": "1"}})

so every worker process Ray starts has ``WHISPER_ACCEL=1`` in its environment, and the
``whisper_accel.pth`` start-up hook (installed by a regular ``pip install``) patches MindNLP's
Whisper in that worker the moment transformers' Whisper module is imported. ``--accel compat``
runs the same job with the model's arithmetic stock (stock MindNLP cannot compute Whisper's
features without the ``compat`` group). Each worker reports ``whisper_accel.status()["calls"]`` (how many calls of
each patched entry point took the fast path, how many ran stock code and why); the driver
prints them per worker and returns them.

On a multi-node cluster the script is the same: start the cluster (``ray start --head`` on one
machine, ``ray start --address=HEAD:6379`` on the others, each with this project installed),
then run the script with ``--address auto`` on a node, or with ``RAY_ADDRESS`` set. The model
folder must be readable at the same path on every node; the audio files are read by Ray Data
(a shared or cloud path: ``s3://...``, ``gs://...``, NFS). See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac")


class Transcriber:
    """A Ray Data actor: one transformers ASR pipeline on a MindNLP Whisper model, kept for the
    actor's lifetime. ``__call__`` takes a batch ``{"path": [...], "bytes": [...]}`` and returns
    one row per file: the path, the text, the worker (host:pid) and that worker's call counts so
    far. Plain Python: usable without Ray too (``Transcriber(model_dir)(batch)``)."""

    def __init__(self, model_dir: str, generate_kwargs: Optional[Dict] = None):
        import mindnlp  # noqa: F401  (before transformers: redirects ``torch`` to mindtorch)
        from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

        model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
        processor = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
        self.pipe = pipeline("automatic-speech-recognition", model=model,
                             tokenizer=processor.tokenizer,
                             feature_extractor=processor.feature_extractor)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import whisper_accel  # reading the status only; patching happened at import (WHISPER_ACCEL)

        extra = {"generate_kwargs": self.generate_kwargs} if self.generate_kwargs else {}
        texts = []
        for data in batch["bytes"]:  # one file at a time: the same windows as a single-file run
            out = self.pipe(bytes(data), **extra)
            texts.append(out["text"])
        status = whisper_accel.status()
        n = len(texts)
        return {"path": np.asarray(batch["path"], dtype=object),
                "text": np.asarray(texts, dtype=object),
                "worker": np.asarray([self.worker] * n, dtype=object),
                "patched": np.asarray([status["patched"]] * n),
                "calls": np.asarray([json.dumps(status["calls"])] * n, dtype=object)}


def audio_files(folder: str) -> List[str]:
    """The audio files in ``folder`` (sorted; or ``[folder]`` when it is a file)."""
    if os.path.isfile(folder):
        return [os.path.abspath(folder)]
    return sorted(os.path.abspath(os.path.join(folder, f)) for f in os.listdir(folder)
                  if f.lower().endswith(AUDIO_SUFFIXES))


def per_worker(rows: List[Dict]) -> Dict[str, Dict]:
    """``{worker: {"patched": bool, "files": n, "calls": {...}}}`` from the output rows. Each
    row carries its worker's cumulative counts at the end of its batch; the largest is the last."""
    workers: Dict[str, Dict] = {}
    for row in rows:
        calls = json.loads(row["calls"])
        total = sum(c["fast"] + c["stock"] for c in calls.values())
        w = workers.setdefault(row["worker"], {"patched": bool(row["patched"]), "files": 0,
                                               "calls": {}, "_total": -1})
        w["files"] += 1
        if total > w["_total"]:
            w["calls"], w["_total"] = calls, total
    for w in workers.values():
        del w["_total"]
    return workers


def transcribe(model_dir: str, paths: List[str], *, workers: int = 2, batch_size: int = 1,
               accel: str = "1", generate_kwargs: Optional[Dict] = None,
               address: Optional[str] = None,
               num_cpus: Optional[int] = None) -> Tuple[Dict[str, str], Dict[str, Dict]]:
    """Transcribe ``paths`` on ``workers`` Ray actors (one CPU each). Returns
    ``({path: text}, {worker: {"patched", "files", "calls"}})``.

    ``accel`` is the workers' ``WHISPER_ACCEL`` (``"1"``: every group; ``"compat"``: only
    what stock MindNLP needs to run the pipeline at all).
    ``address``: an existing cluster (``"auto"``, ``"ray://..."``); default ``RAY_ADDRESS`` if
    set, else a local cluster of ``num_cpus`` CPUs (default: all)."""
    import ray

    # The workers' environment. MindSpore 2.7's generated protobuf modules need the pure-Python
    # protobuf implementation, which MindSpore selects itself only when it imports protobuf
    # first; a Ray worker has imported protobuf (Ray's own, upb) before any task runs.
    env_vars = {"WHISPER_ACCEL": accel, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    init = {"runtime_env": {"env_vars": env_vars}}
    if address is not None:
        init["address"] = address
    elif not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        init["num_cpus"] = num_cpus
    ray.init(**init)
    try:
        # Reading is I/O: no CPU reserved for it, so the actors may hold every CPU.
        ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=0)
        ds = ds.map_batches(Transcriber, fn_constructor_kwargs={"model_dir": model_dir,
                                                                "generate_kwargs": generate_kwargs},
                            batch_size=batch_size, num_cpus=1, batch_format="numpy",
                            # one file in flight per actor: a busy actor queues no files
                            # another actor could take
                            compute=ray.data.ActorPoolStrategy(size=workers,
                                                               max_tasks_in_flight_per_actor=1))
        rows = ds.take_all()
    finally:
        ray.shutdown()
    # Ray reports a local path as its filesystem layer sees it (without the leading "/"):
    # key the transcripts by the paths given.
    texts = {os.path.normpath(row["path"]).lstrip("/"): row["text"] for row in rows}
    return ({p: texts.get(os.path.normpath(p).lstrip("/")) for p in paths}, per_worker(rows))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="local Hugging Face Whisper folder")
    ap.add_argument("audio", help="folder of audio files, or one file")
    ap.add_argument("--workers", type=int, default=2, help="Ray actors, one CPU each (default 2)")
    ap.add_argument("--batch-size", type=int, default=1, help="files per actor call (default 1)")
    ap.add_argument("--num-beams", type=int, help="beam search width (default: the ASR pipeline's, 5)")
    ap.add_argument("--max-new-tokens", type=int, help="cap on tokens per 30 s window")
    ap.add_argument("--address", help="an existing Ray cluster ('auto', 'ray://HOST:10001'); "
                                      "default RAY_ADDRESS, else a new local cluster")
    ap.add_argument("--num-cpus", type=int, help="CPUs of a new local cluster (default: all)")
    ap.add_argument("--accel", default="1",
                    help="WHISPER_ACCEL for the workers: 1 (default: every group), or a group list; "
                         "'compat' leaves the model's arithmetic stock")
    ap.add_argument("--json", help="also write {'transcripts': ..., 'workers': ...} here")
    ns = ap.parse_args(argv)

    paths = audio_files(ns.audio)
    if not paths:
        ap.error(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {ns.audio}")
    gen = {k: v for k, v in (("num_beams", ns.num_beams), ("max_new_tokens", ns.max_new_tokens))
           if v is not None}
    texts, workers = transcribe(ns.model, paths, workers=ns.workers, batch_size=ns.batch_size,
                                accel=ns.accel, generate_kwargs=gen or None, address=ns.address,
                                num_cpus=ns.num_cpus)
    for path in paths:
        print(f"{os.path.basename(path)}\t{texts[path]}")
    for name, w in sorted(workers.items()):
        print(f"\nworker {name}: patched={w['patched']}, {w['files']} file(s)")
        for entry, c in sorted(w["calls"].items()):
            reasons = "; ".join(f"{r} x{n}" for r, n in c["reasons"].items())
            print(f"  {entry:<20} fast {c['fast']:>4}  stock {c['stock']:>4}"
                  + (f"  ({reasons})" if reasons else ""))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"transcripts": texts, "workers": workers}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
