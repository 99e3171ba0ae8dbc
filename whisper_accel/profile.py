"""``whisper-accel bench --profile DIR``: a MindSpore profiler trace of the patched run."""

from __future__ import annotations

import os

from . import _api, bench


def profile_patched(model, features, stage: str, max_new_tokens: int, out_dir: str,
                    audio=None, processor=None) -> str:
    """Run ``stage`` once patched under ``mindspore.Profiler``; return the trace folder."""
    from mindspore import Profiler

    os.makedirs(out_dir, exist_ok=True)
    fn = bench._stage_fn(stage, model, features, audio, processor, max_new_tokens)
    with _api.patched():
        fn()  # warm: the trace shows steady state, not first-call compilation
        prof = Profiler(output_path=out_dir)
        fn()
        prof.stop()
    prof.analyse()
    return os.path.abspath(out_dir)
