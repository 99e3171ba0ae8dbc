"""A Whisper script that knows nothing of whisper_accel. It prints the greedy tokens (or the
text) and whether whisper_accel was active, so stock and patched runs can be compared.

    python examples/plain_whisper.py                  # built-in tiny random-weight model
    python examples/plain_whisper.py MODEL_DIR AUDIO  # a local Hugging Face folder and a file
"""

import sys

import numpy as np

import mindnlp  # noqa: F401
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

if len(sys.argv) > 2:
    import wave

    from transformers import WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(sys.argv[1], local_files_only=True).eval()
    processor = WhisperProcessor.from_pretrained(sys.argv[1], local_files_only=True)
    with wave.open(sys.argv[2]) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    fe = processor.feature_extractor
else:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
        decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536)).eval()
    processor = None
    audio = np.random.default_rng(0).standard_normal(16000 * 30).astype(np.float32) * 0.1
    fe = WhisperFeatureExtractor()
audio = np.pad(audio[: fe.n_samples], (0, max(0, fe.n_samples - audio.size)))
features = torch.tensor(fe._np_extract_fbank_features(audio[None], "cpu").astype(np.float32))
with torch.no_grad():
    tokens = model.generate(features, max_new_tokens=12)
print(processor.batch_decode(tokens, skip_special_tokens=True)[0] if processor else tokens.asnumpy().tolist())
active = "whisper_accel" in sys.modules and sys.modules["whisper_accel"].is_patched()
print(f"whisper_accel active: {active}", file=sys.stderr)
