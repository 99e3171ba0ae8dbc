"""Which executor an engine runs first, measured on this machine.

The fastest executor depends on the machine: numpy's BLAS against MindSpore's oneDNN MatMul,
the kernels' instruction set, environment settings such as ``OPENBLAS_CORETYPE``. So with
``Config.encoder = "auto"`` and ``Config.measure`` on, the encoder engine times its eligible
executors on the calls it has to run anyway, and keeps the winner:

* per *case* -- the model's dimensions and dtype and the input's shape (batch, mels, frames);
* a case without a verdict runs its first calls round-robin over the candidates, in the order
  the engine gives (the encoder: ``host`` first, which compiles nothing, so a one-shot script's
  first call pays no graph compilation): each candidate's first call is its warm-up (a graph
  executor compiles there), timed apart; its next call is timed (completion included); with
  every candidate timed, the fastest is the verdict. So measuring adds no work: every call
  computes the real output once (with the candidate of that call; executors agree within ~1e-6
  relative). Calls under :data:`SHORT_S` are timed :data:`SHORT_RUNS` times each (round-robin,
  the minimum kept), longer ones once;
* the verdict is kept on disk (:mod:`whisper_accel._probe_cache`, kind ``verdicts``; atomic,
  merged) under a key of the CPU's model and flags, the stack's versions, whisper_accel's, the
  kernel build and the settings that change what an executor does. A verdict from another CPU,
  stack or kernel build is never read; a corrupt file reads as none;
* the verdict also keeps each candidate's *first* call (its warm-up, compilation included).
  A process whose first calls find the verdict's executor cold (a graph not compiled yet) may
  run another candidate instead while that is cheaper overall (:func:`stand_in`, the
  ski-rental rule): the extra seconds the stand-in costs over the verdict's warm time, summed
  over the process's calls, stay within what the verdict's first call costs beyond a warm one.
  A one-shot script skips a compilation that would cost more than it saves; a long-running
  process pays at most that much before it compiles.

:meth:`Choice.report` gives the verdicts, their timings and where they came from, for
``status()`` and ``doctor``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import _probe_cache
from .. import config as _config
from ..kernels import isa

KIND = "verdicts"
#: Calls shorter than this many seconds are timed :data:`SHORT_RUNS` times per candidate (the
#: minimum is kept), longer ones once.
SHORT_S = 0.25
SHORT_RUNS = 3
#: Bump when the measuring protocol or a verdict's meaning changes.
FORMAT = 2  # 2: verdicts keep each candidate's first call (stand-ins)


def machine_key(config: _config.Config, kernels: Optional[str]) -> Dict:
    """What a verdict is valid for: the CPU (model, architecture, flags), the stack, this
    package, the kernel build (``kernels``: the library's file name, which hashes source, flags,
    compiler and CPU) and the settings that change an executor's work."""
    from .. import __version__, _environment

    cpu = isa.cpu()
    return {"format": FORMAT, "cpu": cpu.model, "arch": cpu.arch, "flags": sorted(cpu.flags),
            "versions": {p: _environment.installed_version(p) for p in _environment.SUPPORTED},
            "whisper_accel": __version__, "kernels": kernels,
            "settings": {"group_bytes": config.group_bytes, "whole_encoder_graph": config.whole_encoder_graph,
                         "matmul_precision": config.matmul_precision}}


def cached(config: _config.Config, library: Optional[str]) -> Dict[str, Dict]:
    """The verdicts kept on disk for this machine, stack and kernel ``library`` (``doctor``)."""
    if not config.probe_cache:
        return {}
    kernels = library.rsplit("/", 1)[-1] if library else None
    entries = _probe_cache.load_entries(machine_key(config, kernels), KIND, _where(config))
    return {case: v for case, v in entries.items() if isinstance(v, dict)}


def _where(config: _config.Config) -> Path:
    return Path(_config.cache_directory(config))


def _seconds(value) -> Dict[str, float]:
    """A verdict's ``{executor: seconds}`` as read from disk (anything else: empty)."""
    if not isinstance(value, dict):
        return {}
    return {k: float(v) for k, v in value.items() if isinstance(k, str) and isinstance(v, (int, float))
            and not isinstance(v, bool) and v >= 0}


def stand_in(verdict: Dict, usable: Sequence[str], warm: Sequence[str], spent: float) -> Optional[Tuple[str, float]]:
    """``(executor, extra seconds)`` to run instead of the verdict's cold executor, or None.

    ``verdict``: ``{"executor", "seconds", "first_seconds"}`` (warm and first-call seconds per
    candidate); ``warm``: the executors this process has run for the case; ``spent``: the extra
    seconds stand-ins have cost so far. The verdict's executor runs once it is warm, or when no
    candidate's next call (its warm time if it is warm, its first call's if not) keeps ``spent``
    plus that call's excess over the verdict's warm time within the verdict's own first-call
    overhead (``first - warm``)."""
    best = verdict.get("executor")
    seconds, first = verdict.get("seconds") or {}, verdict.get("first_seconds") or {}
    if best in warm or best not in seconds or best not in first:
        return None
    budget = first[best] - seconds[best]
    costs = {c: (seconds[c] if c in warm else first.get(c)) for c in usable if c != best and c in seconds}
    costs = {c: t for c, t in costs.items() if t is not None}
    if not costs or budget <= 0:
        return None
    c = min(costs, key=costs.get)
    extra = max(costs[c] - seconds[best], 0.0)
    return (c, extra) if spent + extra <= budget else None


class Choice:
    """The first executor for each case of one engine kind (e.g. ``"encoder"``)."""

    def __init__(self, kind: str, dims: Tuple, candidates: Sequence[str], default: str,
                 config: _config.Config, kernels: Optional[str]):
        self.kind, self.dims, self.config = kind, tuple(dims), config
        #: the executors that are timed, in the order their first calls run (the caller's order)
        self.candidates: List[str] = list(dict.fromkeys(candidates))
        self.default = default
        self._kernels = kernels
        self._key: Optional[Dict] = None
        self._lock = threading.Lock()
        self._verdicts: Dict[str, Dict] = {}  # case -> {"executor", "seconds", "source"[, "first_seconds"]}
        self._runs: Dict[str, Dict[str, List[float]]] = {}  # case -> executor -> seconds of its calls
        self._first: Dict[str, Dict[str, float]] = {}  # case -> executor -> seconds of its first call
        self._warm: Dict[str, set] = {}  # case -> the executors this process has run for it
        self._spent: Dict[str, float] = {}  # case -> extra seconds stand-ins cost so far
        self._stood_in: Dict[str, int] = {}  # case -> calls a stand-in ran

    def _disk_key(self) -> Optional[Dict]:
        if self._key is None:
            try:
                self._key = machine_key(self.config, self._kernels)
            except Exception:  # noqa: BLE001  no key, no disk cache: measure in this process
                self._key = {}
        return self._key or None

    def case(self, shape) -> str:
        return f"{self.kind}:{'x'.join(map(str, self.dims))}:{'x'.join(map(str, shape))}"

    def next(self, shape, usable: Sequence[str]) -> Tuple[str, Optional[str]]:
        """The executor to try first for a call of input ``shape``, and what to time:
        ``"first"`` (a candidate's first call while the case is measured), ``"timed"`` (a
        measured call) or None (``usable``: the engine's executors not faulted)."""
        case = self.case(shape)
        with self._lock:
            name, timing = self._next(case, usable)
            self._warm.setdefault(case, set()).add(name)
            return name, timing

    def _next(self, case: str, usable: Sequence[str]) -> Tuple[str, Optional[str]]:
        verdict = self._verdicts.get(case)
        if verdict is None and case not in self._runs and len(self.candidates) > 1:
            verdict = self._from_disk(case)  # once per case: measuring runs record it in _runs
        if verdict is not None and verdict["executor"] in usable:
            instead = stand_in(verdict, usable, self._warm.get(case, ()), self._spent.get(case, 0.0))
            if instead is None:
                return verdict["executor"], None
            self._spent[case] = self._spent.get(case, 0.0) + instead[1]
            self._stood_in[case] = self._stood_in.get(case, 0) + 1
            return instead[0], None
        todo = [c for c in self.candidates if c in usable]
        if len(todo) < 2:
            return (todo[0] if todo else self.default), None
        runs = self._runs.setdefault(case, {})
        for c in todo:  # first calls (timed apart: compilation included), then timed calls each
            if c not in runs:
                runs[c] = []
                return c, "first"
        want = self._wanted(runs)
        for c in sorted(todo, key=lambda c: len(runs[c])):
            if len(runs[c]) < want:
                return c, "timed"
        return self._decide(case, todo), None

    def record(self, shape, executor: str, seconds: float, first: bool = False) -> None:
        """A timed call's duration (``first``: a candidate's first call, kept beside the
        verdict); decides the case when every candidate has its timed calls."""
        case = self.case(shape)
        with self._lock:
            if first:
                self._first.setdefault(case, {})[executor] = float(seconds)
                return
            runs = self._runs.setdefault(case, {})
            runs.setdefault(executor, []).append(float(seconds))
            want = self._wanted(runs)
            if all(len(runs.get(c) or ()) >= want for c in self.candidates):
                self._decide(case, self.candidates)

    @staticmethod
    def _wanted(runs: Dict[str, List[float]]) -> int:
        """Timed calls per candidate: one where a call takes long (its noise is small against
        it), :data:`SHORT_RUNS` where the fastest took under :data:`SHORT_S`."""
        times = [t for ts in runs.values() for t in ts]
        return SHORT_RUNS if times and min(times) < SHORT_S else 1

    def _decide(self, case: str, names: Sequence[str]) -> str:
        runs = self._runs[case]
        seconds = {c: min(runs[c]) for c in names if runs.get(c)}
        best = min(seconds, key=seconds.get)
        entry = {"executor": best, "seconds": seconds}
        first = {c: t for c, t in self._first.get(case, {}).items() if c in seconds}
        if first:
            entry["first_seconds"] = first
        self._verdicts[case] = dict(entry, source="measured")
        key = self._disk_key()
        if key is not None and self.config.probe_cache:
            stored = _probe_cache.store_entries(key, {case: entry}, KIND, _where(self.config))
            self._verdicts[case]["source"] = "measured; cached" if stored else "measured"
        return best

    def _from_disk(self, case: str) -> Optional[Dict]:
        if not self.config.probe_cache:
            return None
        key = self._disk_key()
        if key is None:
            return None
        entry = _probe_cache.load_entries(key, KIND, _where(self.config)).get(case)
        if not isinstance(entry, dict) or entry.get("executor") not in self.candidates:
            return None
        verdict = {"executor": entry["executor"], "seconds": _seconds(entry.get("seconds")), "source": "from the cache"}
        first = _seconds(entry.get("first_seconds"))
        if first:
            verdict["first_seconds"] = first
        self._verdicts[case] = verdict
        return verdict

    def report(self) -> Dict:
        """``{case: {"executor", "seconds", "source"}}`` for the cases decided, and the cases
        still being measured with their timings so far."""
        with self._lock:
            out = {case: dict(v) for case, v in self._verdicts.items()}
            for case, n in self._stood_in.items():
                if case in out:
                    out[case]["stand_in_calls"] = n
            for case, runs in self._runs.items():
                if case not in out:
                    out[case] = {"executor": None, "seconds": {c: min(t) for c, t in runs.items() if t},
                                 "source": "measuring"}
            return out
