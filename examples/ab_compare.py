"""In-process A/B: the same model stock and patched, interleaved, as a table.

    python examples/ab_compare.py                 # built-in tiny random-weight model
    python examples/ab_compare.py MODEL_DIR       # a local Hugging Face folder
"""

import sys

from whisper_accel import bench, models

import mindnlp  # noqa: E402,F401

model = models.load_model(sys.argv[1]) if len(sys.argv) > 1 else models.random_model("tiny")
features = bench.log_mel(None, models.synthetic_audio(30.0), mels=model.config.num_mel_bins)
rows = bench.compare(model, features, stages=["encoder", "generate"], variants=["stock", "all"],
                     repeats=int(sys.argv[2]) if len(sys.argv) > 2 else 3, max_new_tokens=8,
                     progress=bench.stderr_progress)
print(bench.format_table(rows))
sys.exit(0 if all(r.tokens_equal is not False for r in rows) else 1)
