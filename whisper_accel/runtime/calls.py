"""Fast-path and stock calls of each patched entry point, with the reason for each stock call.

A patched entry point (the encoder, the decoder step, the greedy and beam loops) either runs
the fast path or hands the call to the stock code it replaced. Each call is counted here
(:func:`fast` / :func:`stock`), so a user whose script is not faster can learn why:
``whisper_accel.status()["calls"]``, ``whisper-accel run --stats`` and ``whisper-accel ab``
show the counts, and the first stock call for each (entry point, reason) logs one line on the
``whisper_accel`` logger (INFO). Counts are per process; :func:`reset` clears them.

Pure Python: importing this module imports neither MindSpore nor MindNLP.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Dict

logger = logging.getLogger("whisper_accel")

_lock = threading.Lock()
_fast: Dict[str, int] = {}
_stock: Dict[str, Dict[str, int]] = {}
_counters: Dict[str, Dict[str, int]] = {}


def fast(entry: str) -> None:
    """``entry`` ran its fast path once."""
    with _lock:
        _fast[entry] = _fast.get(entry, 0) + 1


def stock(entry: str, reason: str) -> None:
    """``entry`` ran stock code once, because of ``reason`` (the first time per reason: one log line)."""
    with _lock:
        reasons = _stock.setdefault(entry, {})
        first = reason not in reasons
        reasons[reason] = reasons.get(reason, 0) + 1
    if first:
        logger.info("%s ran stock code: %s (counts: whisper_accel.status()['calls'])",
                    entry, reason)


def count(entry: str, **amounts: int) -> None:
    """Add ``amounts`` to ``entry``'s named counters (e.g. the assisted loop's candidate tokens
    ``proposed`` and ``accepted``), reported with its calls."""
    with _lock:
        counters = _counters.setdefault(entry, {})
        for name, n in amounts.items():
            counters[name] = counters.get(name, 0) + int(n)


def snapshot() -> Dict[str, Dict]:
    """``{entry: {"fast": n, "stock": n, "reasons": {reason: n}}}`` for every entry point called,
    plus ``"counters": {name: n}`` for an entry point that counts more (:func:`count`)."""
    with _lock:
        names = sorted(set(_fast) | set(_stock))
        out = {n: {"fast": _fast.get(n, 0), "stock": sum(_stock.get(n, {}).values()),
                   "reasons": dict(_stock.get(n, {}))} for n in names}
        for n, counters in _counters.items():
            if n in out:
                out[n]["counters"] = dict(counters)
        return out


def reset() -> None:
    with _lock:
        _fast.clear()
        _stock.clear()
        _counters.clear()


def format_table(counts: Dict[str, Dict]) -> str:
    """The counts as text: one line per entry point, then one indented line per stock reason."""
    if not counts:
        return "whisper_accel: no patched Whisper entry point was called"
    lines = [f"{'whisper_accel entry point':<28}{'fast':>7}{'stock':>7}"]
    for name, c in counts.items():
        extra = c.get("counters")
        tail = ("  (" + ", ".join(f"{k} {v}" for k, v in sorted(extra.items())) + ")") if extra else ""
        lines.append(f"{name:<28}{c['fast']:>7}{c['stock']:>7}{tail}")
        for reason, n in sorted(c["reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    stock x{n}: {reason}")
    return "\n".join(lines)


def report_at_exit(target: str) -> None:
    """Called at interpreter exit when ``WHISPER_ACCEL_STATS`` is set: ``1``/``stderr`` (or any of
    ``WHISPER_ACCEL``'s "on" words) prints :func:`format_table` to stderr; anything else is a path
    that receives the counts as JSON."""
    counts = snapshot()
    if target.strip().lower() in ("1", "stderr", "true", "yes", "on", "all"):
        print(format_table(counts), file=sys.stderr)
        return
    try:
        with open(target, "w") as f:
            json.dump(counts, f, indent=1)
    except OSError as exc:
        print(f"whisper_accel: could not write call counts to {target!r}: {exc}", file=sys.stderr)
