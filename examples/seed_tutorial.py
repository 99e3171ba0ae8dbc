"""The MindSpore blog's Whisper inference script, kept as the blog wrote it.

    python examples/seed_tutorial.py MODEL_DIR AUDIO_PATH

On stock MindNLP 0.5.1 (CPU) this script fails; with ``whisper_accel`` patched in it runs.
It is the seed case the plugin's ``compat`` group is built against.
"""
import sys

import mindspore
from mindnlp.transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

model_dir = sys.argv[1]
path_to_audio_file = sys.argv[2]

model = AutoModelForSpeechSeq2Seq.from_pretrained(
    model_dir,
    ms_dtype=mindspore.float16,
    low_cpu_mem_usage=True,
    use_safetensors=True,
    attn_implementation="flash_attention_2",
)
processor = AutoProcessor.from_pretrained(model_dir)

pipe = pipeline(
    "automatic-speech-recognition",
    model=model,
    tokenizer=processor.tokenizer,
    feature_extractor=processor.feature_extractor,
    ms_dtype=mindspore.float16,
    return_timestamps=True,
)

result = pipe(path_to_audio_file)
print(result["text"])
