"""Speculative (assisted) decoding against plain greedy search, patched, when the assistant is
cheaper than the main model and agrees with it.

    .venv/bin/python benchmarks/assisted.py [--size small] [--assistant-layers 2] [--tokens 64] \\
        [--repeats 5] [--json out.json]

Assisted decoding pays when an assistant much cheaper than the main model agrees with it on most
tokens (distil-large-v3, two decoder layers, for large-v3's 32). No such pair of real weights is
available offline here, and the model as its own assistant costs what it saves. The stand-in: a
random-weight main model of ``--size`` whose decoder layers past the first
``--assistant-layers`` add nothing to the residual stream (their attention output projections
and ``fc2`` are zero; they still read all their weights, so a main step costs what a step of
that size costs), and a ``WhisperForCausalLM`` assistant made of those first layers, the
embeddings, the final norm and the projection, reading the main encoder's output. Its greedy
tokens are the main model's, so every candidate is accepted unless a near-tie flips. Its
``assistant_confidence_threshold`` is 0: a random model's distributions are flat, and stock's
0.4 would end every round after one candidate (the schedule is stock's ``heuristic``).

Arms, interleaved after one warm-up call each (its time reported as ``first s``), medians:
``greedy`` (``generate(x, max_new_tokens=N)``) and ``assisted`` (the same with
``assistant_model=``); EOS is suppressed so both emit N tokens. The two outputs must be equal
(the table says so); the acceptance rate is the assisted loop's own count. The encoder runs once
per call in both arms. Everything runs patched (``whisper_accel.patch()``); stock MindNLP on the
same pair is what ``tests/test_assisted.py`` compares against, on small models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SIZES = {  # decoder sizes of Whisper's checkpoints (the encoder is cut to one layer: not timed here)
    "base": dict(d_model=512, decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=2048),
    "small": dict(d_model=768, decoder_layers=12, decoder_attention_heads=12, decoder_ffn_dim=3072),
    "medium": dict(d_model=1024, decoder_layers=24, decoder_attention_heads=16, decoder_ffn_dim=4096),
}


def build_pair(dims: dict, assistant_layers: int, seed: int = 0):
    """(main WhisperForConditionalGeneration, WhisperForCausalLM assistant) as described above;
    ``dims``: the decoder's size (one of :data:`SIZES`)."""
    import mindnlp  # noqa: F401
    import torch
    from transformers import WhisperConfig, WhisperForCausalLM, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=51865, num_mel_bins=80, encoder_layers=1,
                        encoder_attention_heads=dims["decoder_attention_heads"],
                        encoder_ffn_dim=dims["decoder_ffn_dim"], max_source_positions=1500,
                        max_target_positions=448, **dims)
    torch.manual_seed(seed)
    main = WhisperForConditionalGeneration(cfg).eval()
    layers = main.model.decoder.layers
    if not 0 < assistant_layers < len(layers):
        raise SystemExit(f"--assistant-layers must be between 1 and {len(layers) - 1}")
    with torch.no_grad():
        for layer in layers[assistant_layers:]:  # identity on the residual stream
            for lin in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    helper = WhisperForCausalLM(WhisperConfig(**{**cfg.to_dict(), "decoder_layers": assistant_layers})).eval()
    state = {k: v for k, v in main.state_dict().items() if k.startswith("model.decoder.") or k == "proj_out.weight"}
    keep = {f"model.decoder.layers.{i}." for i in range(assistant_layers)}
    state = {k: v for k, v in state.items()
             if not k.startswith("model.decoder.layers.") or any(k.startswith(p) for p in keep)}
    missing, unexpected = helper.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "encoder_attn.k_proj" not in k]:
        raise SystemExit(f"assistant weights: missing {missing}, unexpected {unexpected}")
    # a random model's next-token distributions are flat: stock's default confidence threshold
    # (0.4) would end every round after one candidate; a trained assistant is confident
    helper.generation_config.assistant_confidence_threshold = 0.0
    return main, helper


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--assistant-layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vs_pytorch import cpu_name

    import whisper_accel

    whisper_accel.patch()
    import numpy as np
    import torch

    from whisper_accel.groups import assisted

    main_model, helper = build_pair(SIZES[a.size], a.assistant_layers)
    eos = int(main_model.generation_config.eos_token_id)
    feats = torch.tensor(np.random.default_rng(1).normal(0, 1, (1, 80, 3000)).astype(np.float32))
    kw = dict(max_new_tokens=a.tokens, suppress_tokens=[eos])

    def greedy():
        with torch.no_grad():
            return main_model.generate(feats, **kw).asnumpy()

    def speculative():
        with torch.no_grad():
            return main_model.generate(feats, assistant_model=helper, **kw).asnumpy()

    arms = {"greedy": greedy, "assisted": speculative}
    first, outs, times = {}, {}, {k: [] for k in arms}
    for name, fn in arms.items():
        t0 = time.perf_counter()
        outs[name] = fn()
        first[name] = time.perf_counter() - t0
    assisted.reset_stats()
    for i in range(a.repeats):
        for name in (list(arms) if i % 2 == 0 else list(arms)[::-1]):
            t0 = time.perf_counter()
            got = arms[name]()
            times[name].append(time.perf_counter() - t0)
            if not np.array_equal(got, outs[name]):
                raise SystemExit(f"{name}: the output changed between calls")
    stats = dict(assisted.STATS)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "cpu": cpu_name(), "size": a.size, "main_decoder_layers": SIZES[a.size]["decoder_layers"],
        "assistant_layers": a.assistant_layers, "tokens": int(outs["greedy"].shape[1]), "repeats": a.repeats,
        "median_s": med, "first_s": first, "times_s": times,
        "assisted_vs_greedy": med["assisted"] / med["greedy"],
        "equal": bool(np.array_equal(outs["greedy"], outs["assisted"])),
        "acceptance": stats["accepted"] / stats["proposed"] if stats["proposed"] else None,
        "rounds_per_call": stats["rounds"] / a.repeats, "status": whisper_accel.status()["calls"].get("assisted loop"),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }
    print(f"CPU: {result['cpu']}; OPENBLAS_CORETYPE={result['env']['OPENBLAS_CORETYPE']}")
    print(f"main: {a.size}-size decoder ({result['main_decoder_layers']} layers), assistant: {a.assistant_layers} "
          f"layers; {result['tokens']} tokens")
    print("| arm | median s | first s |")
    print("|---|---|---|")
    for name in arms:
        print(f"| {name} | {med[name]:.3f} | {first[name]:.2f} |")
    acc = result["acceptance"]
    print(f"assisted / greedy: {result['assisted_vs_greedy']:.2f}x; outputs equal: {result['equal']}; "
          f"acceptance {'-' if acc is None else f'{acc:.1%}'}; rounds a call {result['rounds_per_call']:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
