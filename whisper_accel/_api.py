"""``patch()`` / ``unpatch()`` and the report they return.

Data flows one way: detect the environment -> ask each requested group's builder for its
patches (or the reason it cannot apply) -> hand them all to the :class:`Patcher`, which applies
all or none. One lock (the patcher's) covers the whole sequence, so concurrent callers see one
consistent state and the last call wins.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional

from . import _environment
from ._errors import Unsupported, WhisperAccelError, WhisperAccelWarning
from ._patcher import Patcher
from .targets import GROUPS

_PATCHER = Patcher()
_last_report: Optional["Report"] = None
_warned: set = set()


@dataclass
class Entry:
    group: str
    target: str
    status: str  # "applied" | "skipped"
    reason: str = ""


@dataclass
class Report:
    """What ``patch()`` did: one entry per patch applied and per group skipped, with reasons."""

    entries: List[Entry] = field(default_factory=list)
    environment: Dict = field(default_factory=dict)

    @property
    def applied(self) -> List[Entry]:
        return [e for e in self.entries if e.status == "applied"]

    @property
    def skipped(self) -> List[Entry]:
        return [e for e in self.entries if e.status == "skipped"]

    @property
    def groups_applied(self) -> List[str]:
        return sorted({e.group for e in self.applied})

    def as_dict(self) -> Dict:
        return {"environment": self.environment,
                "entries": [e.__dict__.copy() for e in self.entries]}

    def __str__(self) -> str:
        lines = [f"whisper_accel: {len(self.applied)} patch(es) applied, "
                 f"{len(self.skipped)} skipped"]
        for e in self.entries:
            mark = "+" if e.status == "applied" else "-"
            tail = f"  ({e.reason})" if e.reason else ""
            lines.append(f"  {mark} [{e.group}] {e.target}{tail}")
        return "\n".join(lines)


def _problem(message: str, strict: bool) -> None:
    if strict:
        raise WhisperAccelError(message)
    if message not in _warned:  # one warning per distinct problem per process
        _warned.add(message)
        warnings.warn(message, WhisperAccelWarning, stacklevel=3)


def _requested(groups: Dict[str, bool]) -> List[str]:
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown patch group(s) {unknown}; valid: {sorted(GROUPS)}")
    return [name for name in GROUPS if groups.get(name, True)]


def patch(*, strict: bool = False, **groups: bool) -> Report:
    """Patch MindNLP's Whisper in this process. Idempotent, thread-safe, all or nothing.

    :param strict: raise :class:`WhisperAccelError` instead of warning when the stack is
        unsupported, a group named ``=True`` by the caller cannot apply, or patching fails.
        (A group enabled only by default that has no kernel here -- ``conv1d`` on CPU -- is
        reported as skipped, not raised.)
    :param groups: ``attention=``, ``conv1d=``, ... ``False`` leaves that group stock.
    :returns: a :class:`Report` of each patch applied and each group skipped, with reasons.
    """
    global _last_report
    wanted = _requested(groups)
    with _PATCHER.lock:
        if _PATCHER.applied():
            _problem("whisper_accel is already patched; call unpatch() first to change groups "
                     "(nothing was wrapped twice)", strict)
            return _last_report or Report()
        env = _environment.detect()
        report = Report(environment=env.as_dict())
        if not env.supported:
            for reason in env.problems:
                _problem(f"whisper_accel left Whisper stock: {reason}", strict)
            report.entries = [Entry(g, "*", "skipped", "; ".join(env.problems)) for g in wanted]
            _last_report = report
            return report
        patches = []
        for name in GROUPS:
            if name not in wanted:
                report.entries.append(Entry(name, "*", "skipped", "disabled by caller"))
                continue
            try:
                patches.extend(GROUPS[name](env))
            except Unsupported as exc:
                report.entries.append(Entry(name, "*", "skipped", str(exc)))
                if groups.get(name):  # asked for by name: the caller wants to know
                    _problem(f"whisper_accel could not apply {name!r}: {exc}", strict)
        try:
            applied = _PATCHER.apply(patches)
        except Exception as exc:
            _last_report = Report(environment=env.as_dict(), entries=[
                Entry(p.group, p.target, "skipped", f"rolled back: {exc!r}") for p in patches])
            _problem(f"whisper_accel could not patch and restored stock Whisper: {exc!r}", strict)
            return _last_report
        report.entries[:0] = [Entry(p.group, p.target, "applied", p.description) for p in applied]
        _last_report = report
        return report


def unpatch() -> List[str]:
    """Restore every original object. Returns the targets restored (empty if none)."""
    with _PATCHER.lock:
        return [p.target for p in _PATCHER.undo()]


def is_patched() -> bool:
    return bool(_PATCHER.applied())


def status() -> Dict:
    """What is patched now, the last report (with skip reasons), and the environment."""
    with _PATCHER.lock:
        env = _last_report.environment if _last_report else _environment.detect().as_dict()
        return {
            "patched": is_patched(),
            "applied": [f"[{p.group}] {p.target}" for p in _PATCHER.applied()],
            "last_report": _last_report.as_dict() if _last_report else None,
            "environment": env,
        }


@contextlib.contextmanager
def patched(*, strict: bool = False, **groups: bool) -> Iterator[Report]:
    """Patch for the duration of a ``with`` block; restores the prior state, even on errors.

    If whisper_accel was already patched on entry, the block runs patched and stays so."""
    with _PATCHER.lock:
        was = is_patched()
        report = _last_report if was else patch(strict=strict, **groups)
    try:
        yield report
    finally:
        if not was:
            unpatch()


def originals() -> Iterable:
    """``(owner, attribute, original)`` for every applied patch (for tests and doctor)."""
    return _PATCHER.originals()
