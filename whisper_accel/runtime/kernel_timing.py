"""How fast a built kernel library runs a decode step's and an encoder layer's work on this
machine: what the measured instruction-set choice (:mod:`.native`) compares between the
variants a CPU can run (on an AVX-512 CPU: ``avx512`` and ``avx2``).

The widest variant is not always the fastest: some CPUs run a 512-bit operation as two 256-bit
halves, and the decode kernels read memory more than they compute. So :func:`time_libraries`
times every library on the same inputs, the libraries interleaved round by round (a drift of
the machine hits them alike), and keeps each case's fastest round.

The workload (:func:`workload`) is one case per kind of work, on the shapes of a
``base``-sized model (D 512, 8 heads of 64, FFN 2048, 448 cache slots, 1500 audio frames):
a decoder layer for one row (greedy) and for five (beams), the vocabulary projection's rows
against a 16384 x 512 slice of the weights for one and five rows, and the encoder's attention
on 300 frames. About 30 ms a library a round.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

from ..kernels.reference import layer_inputs
from . import host_calls

#: Interleaved rounds; each case's fastest round counts.
ROUNDS = 5
#: Calls of a case in a round (their fastest counts).
REPEATS = 3


@dataclass(frozen=True)
class Case:
    """One kind of work: ``kernel`` on ``inputs``, writing outputs of ``outputs``' shapes."""

    name: str
    kernel: str
    inputs: Sequence[np.ndarray]
    outputs: Sequence[tuple]


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int32 if a.dtype.kind in "iu" else np.float32)


def workload(seed: int = 0, d_model: int = 512, heads: int = 8, ffn: int = 2048, slots: int = 448,
             frames: int = 1500, vocab_slice: int = 16384, attention_frames: int = 300) -> List[Case]:
    """The cases timed (seeded inputs; see the module's docstring)."""
    rng = np.random.default_rng(seed)
    dh = d_model // heads
    cases = []
    for rows in (1, 5):
        layer = [_f32(a) for a in layer_inputs(rng, rows, 1, min(20, slots - 1), heads=heads, dh=dh, slots=slots, frames=frames,
                                               ffn=ffn)]
        cases.append(Case(f"DecoderLayer, {rows} row(s)", "DecoderLayer", layer,
                          [(rows, d_model), (rows, heads, 1, dh), (rows, heads, 1, dh)]))
    w = _f32(rng.standard_normal((vocab_slice, d_model)) / np.sqrt(d_model))
    for rows in (1, 5):
        cases.append(Case(f"RowsMatMul, {rows} row(s)", "RowsMatMul", [_f32(rng.standard_normal((rows, d_model))), w],
                          [(rows, vocab_slice)]))
    qkv = [_f32(rng.standard_normal((1, attention_frames, heads, dh))) for _ in range(3)]
    cases.append(Case("Attention", "Attention", qkv, [(1, attention_frames, heads, dh)]))
    return cases


def _calls(library: str, cases: Sequence[Case]) -> List[host_calls.Call]:
    lib = ctypes.CDLL(library)
    return [host_calls.Call(getattr(lib, c.kernel), list(c.inputs) + [np.zeros(s, np.float32) for s in c.outputs])
            for c in cases]


def time_libraries(libraries: Mapping[str, str], cases: Sequence[Case] = (), rounds: int = ROUNDS,
                   clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """``{name: seconds}``: for each library (``{name: path}``), the sum over ``cases`` (default
    :func:`workload`) of the case's fastest call, the libraries interleaved round by round (the
    order rotating). Every call is warmed up once first, untimed."""
    cases = list(cases) or workload()
    calls = {name: _calls(path, cases) for name, path in libraries.items()}
    for fns in calls.values():
        for fn in fns:
            fn()
    best = {name: [float("inf")] * len(cases) for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i, fn in enumerate(calls[name]):
                for _ in range(REPEATS):
                    t = clock()
                    fn()
                    best[name][i] = min(best[name][i], clock() - t)
    return {name: float(sum(v)) for name, v in best.items()}
