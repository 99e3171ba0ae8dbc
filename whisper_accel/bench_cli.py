"""``whisper-accel bench``: build the model and inputs, run :func:`bench.compare`, report."""

from __future__ import annotations

import json
import os
import time

from . import bench, models


def _environment(ns, model_label: str) -> dict:
    from ._environment import detect

    env = detect()
    return {**{k: v for k, v in env.versions.items()}, "backend": env.backend,
            "threads": os.cpu_count(), "model": model_label, "dtype": ns.dtype,
            "max_new_tokens": ns.max_new_tokens, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_bench(ns) -> int:
    os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, before it is imported
    import mindnlp  # noqa: F401  (torch -> mindtorch before transformers)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    stages = [s.strip() for s in ns.stage.split(",") if s.strip()]
    variants = [v.strip() for v in ns.variants.split(",") if v.strip()]
    say = bench.stderr_progress
    if not ns.model and ns.config not in models.CONFIGS:
        raise SystemExit(f"whisper-accel bench: unknown --config {ns.config!r}; choose one of "
                         f"{', '.join(models.CONFIGS)}")
    for flag in ("encoder_layers", "decoder_layers"):
        n = getattr(ns, flag, None)
        if n is not None and (ns.model or n < 1):
            raise SystemExit(f"whisper-accel bench: --{flag.replace('_', '-')} needs --config and "
                             "a count of at least 1")
    t0 = time.perf_counter()
    processor = None
    if ns.model:
        model = models.load_model(ns.model, ns.dtype)
        label = os.path.basename(os.path.abspath(ns.model))
        try:
            from transformers import WhisperProcessor

            processor = WhisperProcessor.from_pretrained(ns.model, local_files_only=True)
        except Exception:  # a model folder without tokenizer files still benchmarks
            processor = None
    else:
        layers = {k: n for k, n in (("encoder_layers", ns.encoder_layers),
                                    ("decoder_layers", ns.decoder_layers)) if n is not None}
        model = models.random_model(ns.config, seed=ns.seed, dtype=ns.dtype, **layers)
        shape = "".join(f", {k.split('_')[0]} layers {n}" for k, n in layers.items())
        label = f"{ns.config} (random weights, seed {ns.seed}{shape})"
    audio = models.read_audio(ns.audio) if ns.audio else models.synthetic_audio(30.0, ns.seed)
    import torch

    features = bench.log_mel(processor, audio, dtype=getattr(torch, ns.dtype),
                             mels=model.config.num_mel_bins)
    say(f"model {label} ready in {time.perf_counter() - t0:.1f} s; input "
        f"{audio.size / models.SAMPLE_RATE:.1f} s audio -> features {tuple(features.shape)}")
    rows = bench.compare(model, features, stages=stages, variants=variants, repeats=ns.repeats,
                         warmup=ns.warmup, max_new_tokens=ns.max_new_tokens, audio=audio,
                         processor=processor, progress=say)
    print(bench.format_table(rows))
    result = {"environment": _environment(ns, label), "rows": [r.as_dict() for r in rows]}
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)
        say(f"wrote {ns.json}")
    if ns.profile:
        from .profile import profile_patched

        path = profile_patched(model, features, stages[-1], ns.max_new_tokens, ns.profile,
                               audio=audio, processor=processor)
        say(f"profiler trace of the patched run in {path}")
    return 1 if bench.failed(rows) else 0
