"""An existing Whisper script plus one line: ``whisper_accel.patch()``.

    python examples/one_line_patch.py                 # built-in tiny random-weight model
    python examples/one_line_patch.py MODEL_DIR AUDIO # a local Hugging Face folder and a file
"""

import sys
import time

import whisper_accel

print(whisper_accel.patch())  # <- the one line; everything below is ordinary MindNLP code

import mindnlp  # noqa: E402,F401
import torch  # noqa: E402  (mindtorch)

from whisper_accel import models  # noqa: E402
from whisper_accel.bench import log_mel  # noqa: E402

if len(sys.argv) > 2:
    from transformers import WhisperProcessor

    model = models.load_model(sys.argv[1])
    processor = WhisperProcessor.from_pretrained(sys.argv[1], local_files_only=True)
    audio = models.read_audio(sys.argv[2])
else:
    model, processor, audio = models.random_model("tiny"), None, models.synthetic_audio(30.0)

features = log_mel(processor, audio, mels=model.config.num_mel_bins)
t0 = time.perf_counter()
with torch.no_grad():
    tokens = model.generate(features, max_new_tokens=16)
print(f"generate: {time.perf_counter() - t0:.2f} s")
if processor is not None:
    print(processor.batch_decode(tokens, skip_special_tokens=True)[0])
else:
    print(tokens.asnumpy().tolist())
