"""The seed script's scale: a half-precision large checkpoint on ~90 s of audio, sequential
long-form with timestamps (what the MindSpore blog's pipeline call runs), stock vs patched.

    .venv/bin/python benchmarks/seed_scale.py --config large-v3-turbo --seconds 90 --tokens 16 \\
        [--json out.json]

Random weights with the checkpoint's real dimensions (``whisper_accel.models``). Each arm runs in
a fresh process, so its peak resident memory (VmHWM) is its own:

* ``patched``: the model in ``--dtype`` (float16, as the seed script loads it), all groups;
* ``patched-bf16`` (with ``--bf16``): the same, patched with ``matmul_precision="bfloat16"`` (the
  encoder's products in bfloat16 on AVX512_BF16 CPUs; its tokens are compared, not required equal);
* ``stock``: stock MindNLP cannot run a float16 Whisper on CPU (its first forward fails in the
  conv1d bias add), so the stock arm runs a float32 model holding the same (float16-rounded)
  weights: the reference the bench uses too.

Both arms run ``generate`` on the whole clip's features with an attention mask and
``return_timestamps=True`` (sequential long-form, 30 s windows), with ``min_new_tokens =
max_new_tokens = --tokens`` so random weights do equal work per window. Reported per arm: the
first call (patched: graph compilation included), a second call (patched only: stock is too slow
to repeat), the encoder time of one window (warm: timed after the ``generate`` calls, once a
patched arm's measured executor choice has settled), the windows decoded (counted as encoder calls: a
window whose last timestamp ends early moves the seek by less than 30 s) and per window the
decode time (generate less the windows' encoder time); tokens of both arms are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def whisper_generation_config(model) -> None:
    """The generation config of OpenAI's multilingual checkpoints (ids shift by one from
    ``<|translate|>`` on in large-v3's 51866-token vocabulary), so that timestamps work."""
    shift = 1 if model.config.vocab_size >= 51866 else 0
    gc = model.generation_config
    gc.decoder_start_token_id, gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = 50258, 50257, 50257, 50257
    gc.no_timestamps_token_id, gc.prev_sot_token_id = 50363 + shift, 50361 + shift
    gc.is_multilingual, gc.lang_to_id = True, {"<|en|>": 50259}
    gc.task_to_id = {"translate": 50358 + shift, "transcribe": 50359 + shift}
    gc.begin_suppress_tokens, gc.max_initial_timestamp_index = [220, 50257], 50


#: ``--bf16``'s arm: patched with ``matmul_precision="bfloat16"`` (the encoder's products)
BF16 = "patched-bf16"


def worker(a) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindnlp  # noqa: F401
    import numpy as np
    import torch
    from transformers.utils import logging

    import whisper_accel
    from whisper_accel import models
    from whisper_accel.groups.encoder import ENCODER
    from whisper_accel.runtime import calls

    logging.set_verbosity_error()
    model = models.random_model(a.config, seed=0, dtype=a.dtype)
    whisper_generation_config(model)
    if a.arm == "stock":
        model = models.float32_copy(model)
    elif a.arm == BF16:
        from whisper_accel.config import Config

        whisper_accel.patch(config=Config().with_(matmul_precision="bfloat16"))
    else:
        whisper_accel.patch()
    mels = model.config.num_mel_bins
    frames = int(a.seconds * 100)
    rng = np.random.default_rng(1)
    feats = torch.tensor(rng.standard_normal((1, mels, frames)).astype(np.float32)).to(model.dtype)
    mask = torch.tensor(np.ones((1, frames), np.int64))
    window = feats[:, :, :3000]
    kw = dict(attention_mask=mask, return_timestamps=True, language="en", min_new_tokens=a.tokens,
              max_new_tokens=a.tokens)
    out = {"arm": a.arm, "dtype": str(model.dtype), "config": a.config, "seconds": a.seconds, "tokens": a.tokens}
    encoder = model.model.encoder
    inner, windows = encoder.forward, [0]  # encoder calls since the last generate began

    def counted(*args, **kwargs):  # the windows long-form decodes: one encoder call each
        windows[0] += 1
        return inner(*args, **kwargs)

    encoder.forward = counted
    with torch.no_grad():
        t0 = time.perf_counter()
        model.model.encoder(window)
        out["encoder_first_s"] = time.perf_counter() - t0
        windows[0] = 0
        t0 = time.perf_counter()
        seq = model.generate(feats, **kw)
        out["generate_first_s"] = time.perf_counter() - t0
        if a.arm != "stock":
            windows[0] = 0
            encoder_fast = calls.snapshot().get(ENCODER, {}).get("fast", 0)
            t0 = time.perf_counter()
            seq = model.generate(feats, **kw)
            out["generate_s"] = time.perf_counter() - t0
        # one window's encoder, warm: after the generate calls, so that the patched arms'
        # measured executor choice (its first calls time each executor) has settled
        count = windows[0]
        if a.arm != "stock":  # the same count, as the patched encoder's fast calls (a cross-check)
            out["encoder_calls"] = calls.snapshot().get(ENCODER, {}).get("fast", 0) - encoder_fast
        t0 = time.perf_counter()
        model.model.encoder(window)
        out["encoder_window_s"] = time.perf_counter() - t0
        windows[0] = count
    out["tokens_out"] = seq.asnumpy().tolist()
    # counted, not ceil(frames / 3000): a window whose last timestamp ends early moves the seek by
    # less than 30 s (random weights with forced tokens do), and each window runs the encoder once
    out["windows"] = windows[0]
    gen = out.get("generate_s", out["generate_first_s"])
    out["decode_per_window_s"] = (gen - out["windows"] * out["encoder_window_s"]) / out["windows"]
    out["vmhwm_mb"] = _vmhwm_mb()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="large-v3-turbo")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--bf16", action="store_true",
                   help="add an arm patched with matmul_precision=bfloat16 (its tokens are reported, not required "
                        "to equal stock's)")
    p.add_argument("--json")
    p.add_argument("--arm", choices=["stock", "patched", BF16], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        print(json.dumps(worker(a)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_ACCEL")}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    arms = {}
    for arm in ("patched", "stock") + ((BF16,) if a.bf16 else ()):
        cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm, "--config", a.config, "--dtype", a.dtype,
               "--seconds", str(a.seconds), "--tokens", str(a.tokens)]
        print(f"running the {arm} arm ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"the {arm} arm failed")
        arms[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    s, q = arms["stock"], arms["patched"]
    equal = s["tokens_out"] == q["tokens_out"]
    print(f"{a.config}, {a.seconds:.0f} s ({q['windows']} windows of up to 30 s, stock {s['windows']}), {a.tokens} "
          "tokens per window; "
          f"patched {q['dtype']}, stock {s['dtype']} on the same weights")
    b = arms.get(BF16)
    print(f"{'':<34}{'stock':>10}{'patched':>10}{'speedup':>9}" + (f"{'bfloat16':>10}{'speedup':>9}" if b else ""))
    rows = [("encoder, one window (warm) s", "encoder_window_s", "encoder_window_s"),
            ("decode per window s", "decode_per_window_s", "decode_per_window_s"),
            ("generate, whole clip s", "generate_first_s", "generate_s"),
            ("first call (compile included) s", "generate_first_s", "generate_first_s")]
    for name, sk, qk in rows:
        x, y = s[sk], q[qk]
        print(f"{name:<34}{x:>10.2f}{y:>10.2f}{x / y:>8.1f}x" + (f"{b[qk]:>10.2f}{x / b[qk]:>8.1f}x" if b else ""))
    print(f"{'peak RSS (VmHWM) MB':<34}{s['vmhwm_mb']:>10.0f}{q['vmhwm_mb']:>10.0f}"
          + (f"{'':>9}{b['vmhwm_mb']:>10.0f}" if b else ""))
    print("tokens " + ("equal" if equal else "DIFFER")
          + (f"; bfloat16 arm's tokens {'equal' if b['tokens_out'] == s['tokens_out'] else 'differ from'} stock's"
             if b else ""))
    if a.json:
        bf16_equal = b["tokens_out"] == s["tokens_out"] if b else None
        for arm in arms.values():
            arm.pop("tokens_out")
        with open(a.json, "w") as f:
            json.dump({"arms": arms, "tokens_equal": equal, "bf16_tokens_equal": bf16_equal}, f, indent=2)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
