"""A/B harness: stock vs patched variants of one model, interleaved, in one process.

:func:`compare` is the Python API (notebooks); ``whisper-accel bench`` wraps it. Variants run
interleaved -- stock, all, stock, all, ... -- after a warm-up call each (whose time is kept as
``first_s``: compile and cache costs show there), so drift on a busy machine hits every variant
alike. Each row holds median/min/max seconds, the speed-up of the medians against stock,
whether greedy token ids equal stock's, and the relative norm difference of encoder outputs.

A variant that raises is reported as failed (``error``, no times) instead of ending the run,
and is not run again in later stages. Stock MindNLP cannot run a float16/bfloat16 Whisper on
CPU (float16: a model's first conv1d fails in ``BiasAdd``; bfloat16: MindSpore CPU has no
bfloat16 ``Conv2D``); then the other variants are still timed, and their tokens and encoder
outputs are checked against stock running a float32 copy with the same (rounded) weights
(:func:`whisper_accel.models.float32_copy`, one untimed call per stage): ``Row.reference``
says which reference a row was checked against.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import _api
from .groups import ALIASES
from .groups import NAMES as GROUPS

STAGES = ("encoder", "generate", "transcribe")


#: ``Row.reference`` values: stock on this very model, or stock on its float32 copy.
REF_STOCK, REF_STOCK_FP32 = "stock", "stock float32"


@dataclass
class Row:
    """One (variant, stage) result. A failed variant (it raised) has ``error`` set, ``None``
    times and ``repeats`` 0. ``tokens_equal`` / ``max_rel_diff`` are against ``reference``
    (:data:`REF_STOCK`, or :data:`REF_STOCK_FP32` when stock failed on a half-precision model),
    ``None`` where there is nothing to compare."""

    variant: str
    stage: str
    median_s: Optional[float]
    min_s: Optional[float]
    max_s: Optional[float]
    repeats: int
    first_s: Optional[float]
    speedup_vs_stock: Optional[float]
    tokens_equal: Optional[bool]
    max_rel_diff: Optional[float]
    applied: str = ""
    error: Optional[str] = None
    reference: Optional[str] = REF_STOCK

    def as_dict(self) -> Dict:
        return asdict(self)


def variant_groups(variant: str) -> Dict[str, bool]:
    """``patch()`` keyword arguments for a variant: ``stock``, ``all`` or one group name."""
    if variant == "all":
        return {}
    if variant in GROUPS:
        return {g: g == variant for g in GROUPS}
    if variant in ALIASES:  # an old group name: the groups it stands for
        return {g: g in ALIASES[variant] for g in GROUPS}
    raise ValueError(f"unknown variant {variant!r}; choose from stock, all, {', '.join(GROUPS)} "
                     f"(old names: {', '.join(ALIASES)})")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _stage_fn(stage: str, model, features, audio, processor, max_new_tokens: int,
              upcast: bool = False) -> Callable:
    """The work of one stage. ``upcast``: ``model`` is the float32 reference of a half-precision
    model; it gets the same (half-precision) features, upcast, and returns float32 outputs."""
    import torch

    prep = (lambda x: x.float()) if upcast else (lambda x: x)

    def encoder():
        with torch.no_grad():
            hidden = model.model.encoder(prep(features)).last_hidden_state
        return _float_numpy(hidden), None

    def generate(feats=None):
        with torch.no_grad():
            out = model.generate(prep(features if feats is None else feats), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False)
        return None, out.asnumpy()

    def transcribe():
        feats = log_mel(processor, audio, dtype=features.dtype, mels=features.shape[1])
        _, tokens = generate(feats)
        if processor is not None and getattr(processor, "tokenizer", None) is not None:
            processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return None, tokens

    return {"encoder": encoder, "generate": generate, "transcribe": transcribe}[stage]


def _float_numpy(t) -> np.ndarray:
    # numpy has no bfloat16: compare half-precision outputs in float32 (exact for both halves)
    import mindspore

    return (t.float() if t.dtype == mindspore.bfloat16 else t).asnumpy()


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, without MindSpore's separators, graph nodes and C++ call
    stack, at most ``limit`` characters."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if "C++ Call Stack" in line:
            break
        if line and not line.startswith("---") and not line.startswith("node:"):
            lines.append(line.lstrip("- "))
    text = f"{type(exc).__name__}: {' '.join(lines)}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_half(model) -> bool:
    import mindspore

    dtype = getattr(model, "dtype", None)
    return dtype in (mindspore.float16, mindspore.bfloat16)


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
            progress: Optional[Callable[[str], None]] = None, reference_model=None) -> List[Row]:
    """Time each stage under each variant, interleaved; return one :class:`Row` per pair.

    A variant that raises (in its warm-up or a timed run) is dropped from the timing, reported
    with its ``error``, and not run again in later stages. If stock fails on a float16/bfloat16
    ``model``, the others are checked against stock on ``reference_model`` -- a float32 model
    with the same weights; by default :func:`whisper_accel.models.float32_copy` builds one (one
    float32 copy of the weights, kept for the call) -- given the same features upcast, once
    per stage and untimed.

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
    was_patched, config = _api.requested(), _api.requested_config()
    _api.unpatch()
    rows: List[Row] = []
    failed_in: Dict[str, str] = {}  # variant -> "the <stage> stage: <error>", sticky
    try:
        for stage in stages:
            fn = _stage_fn(stage, model, features, audio, processor, max_new_tokens)
            times: Dict[str, List[float]] = {v: [] for v in variants}
            first: Dict[str, float] = {}
            outputs: Dict[str, tuple] = {}
            applied: Dict[str, str] = {v: "-" for v in failed_in}
            # A variant that raised is not run again: stock float16 on CPU fails on a model's
            # first forward only and MindSpore lets later calls through -- a state no script
            # that crashed on its first call reaches, so it is not timed either.
            errors: Dict[str, str] = {v: f"not run after failing in {why}" for v, why in failed_in.items()}
            for v in variants:  # warm-up (and reference outputs), one variant at a time
                if v in errors:
                    say(f"warm-up {stage:<10} {v:<10} skipped: failed in {failed_in[v]}")
                    continue
                try:
                    with _variant(v, config) as groups:
                        applied[v] = groups
                        for i in range(max(warmup, 1)):
                            t0 = time.perf_counter()
                            outputs[v] = fn()
                            if i == 0:
                                first[v] = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001  (reported in the row, not raised)
                    errors[v] = error_text(exc)
                    failed_in[v] = f"the {stage} stage: {errors[v]}"
                    applied.setdefault(v, "-")
                    say(f"warm-up {stage:<10} {v:<10} FAILED: {errors[v]}")
                    continue
                say(f"warm-up {stage:<10} {v:<10} {first[v]:8.3f} s")
            for r in range(repeats):  # interleaved timed runs
                for v in variants:
                    if v in errors:
                        continue
                    try:
                        with _variant(v, config):
                            t0 = time.perf_counter()
                            fn()
                            times[v].append(time.perf_counter() - t0)
                    except Exception as exc:  # noqa: BLE001
                        errors[v] = error_text(exc)
                        failed_in[v] = f"the {stage} stage: {errors[v]}"
                        say(f"[{r + 1}/{repeats}] {stage:<10} {v:<10} FAILED: {errors[v]}")
                        continue
                    say(f"[{r + 1}/{repeats}] {stage:<10} {v:<10} {times[v][-1]:8.3f} s")
            reference, ref_out = REF_STOCK, outputs.get("stock")
            if "stock" in errors and _is_half(model):
                t0 = time.perf_counter()
                try:  # stock, untimed: the reference run is outside any variant
                    if reference_model is None:
                        from .models import float32_copy

                        reference_model = float32_copy(model)
                    ref_out = _stage_fn(stage, reference_model, features, audio, processor,
                                        max_new_tokens, upcast=True)()
                    reference = REF_STOCK_FP32
                    say(f"reference {stage:<8} {REF_STOCK_FP32:<13} {time.perf_counter() - t0:8.3f} s")
                except Exception as exc:  # noqa: BLE001
                    say(f"reference {stage:<8} {REF_STOCK_FP32} FAILED: {error_text(exc)}")
            base = statistics.median(times["stock"]) if "stock" not in errors else None
            for v in variants:
                if v in errors:
                    rows.append(Row(variant=v, stage=stage, median_s=None, min_s=None, max_s=None,
                                    repeats=0, first_s=None, speedup_vs_stock=None,
                                    tokens_equal=None, max_rel_diff=None, applied=applied[v],
                                    error=errors[v], reference=None))
                    continue
                hidden, tokens = outputs[v]
                ref_hidden, ref_tokens = ref_out if ref_out is not None else (None, None)
                med = statistics.median(times[v])
                rows.append(Row(
                    variant=v, stage=stage, median_s=med, min_s=min(times[v]), max_s=max(times[v]),
                    repeats=repeats, first_s=first[v],
                    speedup_vs_stock=base / med if base is not None and med else None,
                    tokens_equal=None if tokens is None or ref_tokens is None else bool(
                        tokens.shape == ref_tokens.shape and (tokens == ref_tokens).all()),
                    max_rel_diff=None if hidden is None or ref_hidden is None else _rel(hidden, ref_hidden),
                    applied=applied[v], reference=reference if ref_out is not None else None))
    finally:
        _api.unpatch()
        if was_patched is not None:
            _api.patch(config=config, **was_patched)
    return rows


class _variant:
    """Context manager: stock, or patched with the variant's groups; yields applied groups."""

    def __init__(self, variant: str, config=None):
        self.variant, self.config = variant, config

    def __enter__(self) -> str:
        if self.variant == "stock":
            return "-"
        report = _api.patch(config=self.config, **variant_groups(self.variant))
        return ",".join(report.groups_applied) or "none"

    def __exit__(self, *exc):
        _api.unpatch()
        return False


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a text table. Failed variants show ``FAILED`` and their error below the
    table; ``*`` marks results checked against stock float32 instead of stock itself."""
    head = (f"{'stage':<11}{'variant':<11}{'median s':>10}{'min s':>9}{'max s':>9}{'first s':>9}"
            f"{'speedup':>9}  {'tokens':<8}{'rel diff':>10}  applied")
    lines = [head, "-" * len(head)]

    def num(x, width, fmt="{:.3f}"):
        return f"{'-' if x is None else fmt.format(x):>{width}}"

    for r in rows:
        mark = "*" if r.reference == REF_STOCK_FP32 else ""
        if r.error is not None:
            tokens = "FAILED"
        else:
            tokens = "-" if r.tokens_equal is None else ("equal" if r.tokens_equal else "DIFFER!")
            tokens = tokens + mark if r.tokens_equal is not None else tokens
        diff = "-" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}{mark}"
        lines.append(f"{r.stage:<11}{r.variant:<11}{num(r.median_s, 10)}{num(r.min_s, 9)}"
                     f"{num(r.max_s, 9)}{num(r.first_s, 9)}{num(r.speedup_vs_stock, 9, '{:.2f}x')}"
                     f"  {tokens:<8}{diff:>10}  {r.applied}")
    notes = []
    if any(r.reference == REF_STOCK_FP32 for r in rows):
        notes.append(f"* against {REF_STOCK_FP32}: stock on a float32 copy of the model with the "
                     "same (rounded) weights and the same features upcast, run once untimed, "
                     "because stock cannot run this model")
    seen = set()
    for r in rows:  # the first failure of each variant (later stages say "not run after ...")
        if r.error is not None and r.variant not in seen:
            seen.add(r.variant)
            notes.append(f"{r.variant} FAILED ({r.stage}): {r.error}")
    unchecked = [r for r in rows if r.error is None and r.variant != "stock" and r.reference is None]
    if unchecked:
        notes.append("no reference to check " + ", ".join(f"{r.stage}/{r.variant}" for r in unchecked)
                     + " against (stock failed)")
    bad = [r for r in rows if r.tokens_equal is False]
    if bad:
        against = REF_STOCK_FP32 if any(r.reference == REF_STOCK_FP32 for r in bad) else REF_STOCK
        notes.append(f"!!! TOKEN MISMATCH vs {against} in: " +
                     ", ".join(f"{r.stage}/{r.variant}" for r in bad) + " -- do not trust these rows")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


def failed(rows: Sequence[Row]) -> bool:
    """What makes ``whisper-accel bench`` exit 1: tokens that differ from the reference, a
    non-stock variant that raised, or nothing to check a variant against. Stock failing alone
    (half precision on CPU) is reported, not a failure."""
    return any(r.tokens_equal is False or (r.variant != "stock" and r.error is not None)
               or (r.variant != "stock" and r.error is None and r.reference is None) for r in rows)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
