"""A/B harness: stock vs patched variants of one model, interleaved, in one process.

:func:`compare` is the Python API (notebooks); ``whisper-accel bench`` wraps it. Variants run
interleaved -- stock, all, stock, all, ... -- after a warm-up call each (whose time is kept as
``first_s``: compile and cache costs show there), so drift on a busy machine hits every variant
alike. Each row holds median/min/max seconds, the speed-up of the medians against stock,
whether greedy token ids equal stock's, and the relative norm difference of encoder outputs.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import _api
from .groups import NAMES as GROUPS

STAGES = ("encoder", "generate", "transcribe")


@dataclass
class Row:
    variant: str
    stage: str
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    first_s: float
    speedup_vs_stock: Optional[float]
    tokens_equal: Optional[bool]
    max_rel_diff: Optional[float]
    applied: str = ""

    def as_dict(self) -> Dict:
        return asdict(self)


def variant_groups(variant: str) -> Dict[str, bool]:
    """``patch()`` keyword arguments for a variant: ``stock``, ``all`` or one group name."""
    if variant == "all":
        return {}
    if variant in GROUPS:
        return {g: g == variant for g in GROUPS}
    raise ValueError(f"unknown variant {variant!r}; choose from stock, all, {', '.join(GROUPS)}")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _stage_fn(stage: str, model, features, audio, processor, max_new_tokens: int) -> Callable:
    import torch

    def encoder():
        with torch.no_grad():
            return model.model.encoder(features).last_hidden_state.asnumpy(), None

    def generate(feats=None):
        with torch.no_grad():
            out = model.generate(features if feats is None else feats, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False)
        return None, out.asnumpy()

    def transcribe():
        feats = log_mel(processor, audio, dtype=features.dtype, mels=features.shape[1])
        _, tokens = generate(feats)
        if processor is not None and getattr(processor, "tokenizer", None) is not None:
            processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return None, tokens

    return {"encoder": encoder, "generate": generate, "transcribe": transcribe}[stage]


def log_mel(processor, audio: np.ndarray, dtype=None, mels: int = 80):
    """Log-mel features of 16 kHz audio with Whisper's feature extractor (numpy path, so the
    same code runs in every variant), padded/cut to 30 s as the model expects."""
    import torch
    from transformers import WhisperFeatureExtractor

    fe = getattr(processor, "feature_extractor", None) or WhisperFeatureExtractor(feature_size=mels)
    audio = np.asarray(audio, np.float32)[: fe.n_samples]
    audio = np.pad(audio, (0, fe.n_samples - audio.size))
    feats = fe._np_extract_fbank_features(audio[None, :], "cpu")
    out = torch.tensor(np.asarray(feats, np.float32))
    return out.to(dtype) if dtype is not None else out


def compare(model, features, *, stages: Sequence[str] = ("encoder", "generate"),
            variants: Sequence[str] = ("stock", "all"), repeats: int = 5, warmup: int = 1,
            max_new_tokens: int = 32, audio: Optional[np.ndarray] = None, processor=None,
            progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Time each stage under each variant, interleaved; return one :class:`Row` per pair.

    Leaves whisper_accel as it found it: unpatched, or patched with the caller's groups.
    """
    variants = list(variants)
    if "stock" not in variants:
        variants.insert(0, "stock")
    for v in variants:
        if v != "stock":
            variant_groups(v)
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    if "transcribe" in stages and audio is None:
        raise ValueError("the transcribe stage needs audio (a 16 kHz float array)")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    say = progress or (lambda msg: None)
    was_patched = _api.requested()
    _api.unpatch()
    rows: List[Row] = []
    try:
        for stage in stages:
            fn = _stage_fn(stage, model, features, audio, processor, max_new_tokens)
            times: Dict[str, List[float]] = {v: [] for v in variants}
            first: Dict[str, float] = {}
            outputs: Dict[str, tuple] = {}
            applied: Dict[str, str] = {}
            for v in variants:  # warm-up (and reference outputs), one variant at a time
                with _variant(v) as groups:
                    applied[v] = groups
                    for i in range(max(warmup, 1)):
                        t0 = time.perf_counter()
                        outputs[v] = fn()
                        if i == 0:
                            first[v] = time.perf_counter() - t0
                say(f"warm-up {stage:<10} {v:<10} {first[v]:8.3f} s")
            for r in range(repeats):  # interleaved timed runs
                for v in variants:
                    with _variant(v):
                        t0 = time.perf_counter()
                        fn()
                        times[v].append(time.perf_counter() - t0)
                    say(f"[{r + 1}/{repeats}] {stage:<10} {v:<10} {times[v][-1]:8.3f} s")
            base = statistics.median(times["stock"])
            ref_hidden, ref_tokens = outputs["stock"]
            for v in variants:
                hidden, tokens = outputs[v]
                med = statistics.median(times[v])
                rows.append(Row(
                    variant=v, stage=stage, median_s=med, min_s=min(times[v]), max_s=max(times[v]),
                    repeats=repeats, first_s=first[v], speedup_vs_stock=base / med if med else None,
                    tokens_equal=None if tokens is None else bool(
                        tokens.shape == ref_tokens.shape and (tokens == ref_tokens).all()),
                    max_rel_diff=None if hidden is None else _rel(hidden, ref_hidden),
                    applied=applied[v]))
    finally:
        _api.unpatch()
        if was_patched is not None:
            _api.patch(**was_patched)
    return rows


class _variant:
    """Context manager: stock, or patched with the variant's groups; yields applied groups."""

    def __init__(self, variant: str):
        self.variant = variant

    def __enter__(self) -> str:
        if self.variant == "stock":
            return "-"
        report = _api.patch(**variant_groups(self.variant))
        return ",".join(report.groups_applied) or "none"

    def __exit__(self, *exc):
        _api.unpatch()
        return False


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'stage':<11}{'variant':<11}{'median s':>10}{'min s':>9}{'max s':>9}{'first s':>9}"
            f"{'speedup':>9}  {'tokens':<8}{'rel diff':>10}  applied")
    lines = [head, "-" * len(head)]
    for r in rows:
        tokens = "-" if r.tokens_equal is None else ("equal" if r.tokens_equal else "DIFFER!")
        diff = "-" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}"
        speed = "-" if r.speedup_vs_stock is None else f"{r.speedup_vs_stock:.2f}x"
        lines.append(f"{r.stage:<11}{r.variant:<11}{r.median_s:>10.3f}{r.min_s:>9.3f}"
                     f"{r.max_s:>9.3f}{r.first_s:>9.3f}{speed:>9}  {tokens:<8}{diff:>10}  {r.applied}")
    bad = [r for r in rows if r.tokens_equal is False]
    if bad:
        lines.append("")
        lines.append("!!! TOKEN MISMATCH vs stock in: " +
                     ", ".join(f"{r.stage}/{r.variant}" for r in bad) + " -- do not trust these rows")
    return "\n".join(lines)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
