"""MindNLP's three Whisper example apps (``examples/transformers/inference/whisper/`` in
mindspore-lab/mindnlp: ``app.py``, ``app_realtime.py``, ``app_stream.py``), their model, processor
and pipeline calls as the apps write them, without Gradio, on real tiny.en weights and speech:

* ``app.py``: ``pipeline(task=..., model=MODEL_NAME, chunk_length_s=30, ms_dtype=float16)``, then
  ``pipe(inputs, batch_size=8, generate_kwargs={"task": task}, return_timestamps=True)["text"]``;
* ``app_realtime.py``: ``AutoModelForSpeechSeq2Seq.from_pretrained(..., ms_dtype=float16,
  low_cpu_mem_usage=True)``, ``processor.get_prompt_ids(prompt, return_tensors="ms")``, then
  ``pipe({"sampling_rate": sr, "raw": audio}, generate_kwargs={"prompt_ids": prompt_ids})["text"]``;
* ``app_stream.py``: the same prompt through the pipeline with ``return_timestamps='word'``.

Deviations, all forced by the test model: tiny.en is English-only, so ``task`` / ``language``
are left out (Whisper refuses them for English-only models) and the prompt is English; the
model is the converted tiny.en folder instead of large-v3 from the Hub; ``mindhf.transformers``
(the apps' old import) is ``mindnlp.transformers``.

Reference arm: stock MindNLP 0.5.1 cannot run these on CPU at all (float16 Whisper fails in its
first conv1d, the feature extractor needs ``hann_window``/``stft``, word timestamps need CPU
``unique``, and ``return_tensors="ms"`` is refused), so the reference is the same code on a
float32 model with only the ``compat`` group (stock arithmetic, no fast path) and
``return_tensors="pt"``. Patched (every group), the float16 model computes in float32 (see the
README), so the outputs must be identical -- and the fast loops must have run.
"""

from pathlib import Path

import numpy as np
import pytest

import whisper_accel
from whisper_accel.runtime import calls

DATA = Path(__file__).parent / "data"
ONLY_COMPAT = dict(attention=False, conv1d=False, compiled=False, generation=False, greedy=False, beam=False,
                   word_timestamps=False)
WAV = "stella.wav"
PROMPT = "Please call Stella."  # "must have periods", as the app says


def _audio():
    from whisper_accel import models

    return models.read_audio(str(DATA / WAV))


def _app(model_dir, fp16: bool):
    """app.py's pipeline and call (Gradio's file path input)."""
    import mindspore
    from mindnlp.transformers import pipeline

    kw = dict(ms_dtype=mindspore.float16) if fp16 else {}
    pipe = pipeline(task="automatic-speech-recognition", model=model_dir, chunk_length_s=30, **kw)
    return pipe(str(DATA / WAV), batch_size=8, return_timestamps=True)


def _realtime_pipe(model_dir, fp16: bool, return_tensors: str):
    """app_realtime.py / app_stream.py: model, processor, pipeline and prompt ids."""
    import mindspore
    from mindnlp.transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

    ms_dtype = mindspore.float16 if fp16 else mindspore.float32
    model = AutoModelForSpeechSeq2Seq.from_pretrained(model_dir, ms_dtype=ms_dtype, low_cpu_mem_usage=True)
    processor = AutoProcessor.from_pretrained(model_dir)
    pipe = pipeline(task="automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor, ms_dtype=ms_dtype)
    prompt_ids = processor.get_prompt_ids(PROMPT, return_tensors=return_tensors)
    return pipe, prompt_ids


def _both(run):
    """(reference, patched) results of ``run(fp16, return_tensors)``; asserts the fast path ran."""
    with whisper_accel.patched(**ONLY_COMPAT):
        ref = run(False, "pt")
    with whisper_accel.patched():
        calls.reset()
        got = run(True, "ms")
        counts = whisper_accel.status()["calls"]
    loops = [counts.get(e, {}).get("fast", 0) for e in ("greedy loop", "beam search loop")]
    assert sum(loops) >= 1 and counts["encoder"]["stock"] == 0, counts
    for entry in ("greedy loop", "beam search loop"):
        assert counts.get(entry, {}).get("stock", 0) == 0, counts
    return ref, got


def _spans(chunks):
    return [(c["text"], tuple(round(float(t), 2) if t is not None else None for t in c["timestamp"]))
            for c in chunks]


def test_app_chunked_batch8_fp16_timestamps(tiny_en_dir):
    ref, got = _both(lambda fp16, rt: _app(tiny_en_dir, fp16))
    assert got["text"] == ref["text"] and "Stella" in got["text"]
    assert _spans(got["chunks"]) == _spans(ref["chunks"])


def test_app_realtime_prompt_ids_return_tensors_ms(tiny_en_dir):
    import mindtorch

    def run(fp16, rt):
        pipe, prompt_ids = _realtime_pipe(tiny_en_dir, fp16, rt)
        assert isinstance(prompt_ids, mindtorch.Tensor)
        audio = _audio().astype(np.float32)
        audio /= np.max(np.abs(audio))
        return pipe({"sampling_rate": 16000, "raw": audio}, generate_kwargs={"prompt_ids": prompt_ids})["text"]

    ref, got = _both(run)
    assert got == ref and "Stella" in got


def test_app_stream_prompt_word_timestamps(tiny_en_dir):
    def run(fp16, rt):
        pipe, prompt_ids = _realtime_pipe(tiny_en_dir, fp16, rt)
        return pipe(_audio().astype(np.float32), generate_kwargs={"prompt_ids": prompt_ids},
                    return_timestamps="word")

    ref, got = _both(run)
    assert got["text"] == ref["text"] and "Stella" in got["text"]
    assert _spans(got["chunks"]) == _spans(ref["chunks"]) and len(got["chunks"]) >= 5


def test_get_prompt_ids_ms_fails_on_stock_and_works_patched(tiny_en_dir):
    import mindtorch
    from mindnlp.transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_en_dir)
    with pytest.raises(ValueError, match="ms is not a valid TensorType"):
        processor.get_prompt_ids(PROMPT, return_tensors="ms")
    with whisper_accel.patched(**ONLY_COMPAT):
        got = processor.get_prompt_ids(PROMPT, return_tensors="ms")
        features = processor(_audio(), sampling_rate=16000, return_tensors="ms").input_features
    ref = processor.get_prompt_ids(PROMPT, return_tensors="pt")
    assert isinstance(got, mindtorch.Tensor) and isinstance(features, mindtorch.Tensor)
    np.testing.assert_array_equal(got.asnumpy(), ref.asnumpy())
