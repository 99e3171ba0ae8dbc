"""How fast a built kernel library runs a decode step's and an encoder layer's work on this
machine: what the measured instruction-set choice (:mod:`.native`) compares between the
variants a CPU can run (on an AVX-512 CPU: ``avx512`` and ``avx2``).

The widest variant is not always the fastest: some CPUs run a 512-bit operation as two 256-bit
halves, and a decode step reads memory more than it computes. So :func:`time_libraries` times
every library on the same inputs, the libraries interleaved round by round (a drift of the
machine hits them alike), and keeps each case's fastest round.

The workload (:func:`workload`) is a tiny.en-sized decode step as the host steps run it: four
``DecoderLayer`` calls, each with its own weights and audio K/V, then ``RowsMatMul`` over the
51864 x 384 vocabulary projection, for one row (greedy) and for five (beams); ~130 MB of
inputs, more than a CPU's last-level cache, so each step reads them from memory as a real one
does (a workload that fits in cache times the arithmetic, not the streaming). And the encoder's
``Attention`` on a 30 s window (1500 frames, 6 heads). Each case counts as often as a 30 s
window runs it (:data:`WEIGHTS`): the encoder's attention once a layer, 50 greedy steps (~2.5
tokens a second of speech), and the 5-row step 10 times, for beam search's share. So the verdict
weighs the encoder's kernels (compute-bound: the wider variant tends to win) against the
steps' (memory-bound: not always). About 25 ms a library a round.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

from ..kernels.reference import layer_inputs
from . import host_calls
from .kernel_checks import ARG

#: Interleaved rounds; each case's fastest round counts.
ROUNDS = 12
#: Each case's weight: how often a 30 s window runs it (see the module's docstring).
WEIGHTS = {"step1": 50.0, "step5": 10.0, "attention_per_layer": 1.0}


@dataclass(frozen=True)
class KernelCall:
    """``kernel`` on ``inputs``, writing outputs of ``outputs``' shapes."""

    kernel: str
    inputs: Sequence[np.ndarray]
    outputs: Sequence[tuple]


@dataclass(frozen=True)
class Case:
    """One kind of work: its calls, in order, timed together."""

    name: str
    calls: Sequence[KernelCall]
    weight: float = 1.0  # how many times a window of audio runs it


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int32 if a.dtype.kind in "iu" else np.float32)


def _filled(rng, shape, scale: float) -> np.ndarray:
    """Random-looking float32 of ``shape`` made cheaply: a small random block repeated (the
    kernels' speed does not depend on the values)."""
    block = (rng.standard_normal(1 << 16) * scale).astype(np.float32)
    return np.resize(block, shape)


def workload(seed: int = 0, d_model: int = 384, heads: int = 6, ffn: int = 1536, layers: int = 4,
             slots: int = 448, frames: int = 1500, vocab: int = 51864, attention_frames: int = 1500) -> List[Case]:
    """The cases timed (seeded inputs; see the module's docstring)."""
    rng = np.random.default_rng(seed)
    dh = d_model // heads
    per_row = ("x", "k_cache", "v_cache", "key_ok")  # what a layer's call has per row
    stacks = {1: [], 5: []}
    for _ in range(layers):
        five = [_f32(a) for a in layer_inputs(rng, 5, 1, min(20, slots - 1), heads=heads, dh=dh, slots=slots,
                                              frames=frames, ffn=ffn)]
        one = list(five)
        for name in per_row:
            one[ARG[name]] = np.ascontiguousarray(five[ARG[name]][:1])
        for rows, ins in ((1, one), (5, five)):
            stacks[rows].append(KernelCall("DecoderLayer", ins, [(rows, d_model), (rows, heads, 1, dh),
                                                                 (rows, heads, 1, dh)]))
    w = _filled(rng, (vocab, d_model), 1 / np.sqrt(d_model))
    cases = []
    for rows in (1, 5):
        proj = KernelCall("RowsMatMul", [_f32(rng.standard_normal((rows, d_model))), w], [(rows, vocab)])
        cases.append(Case(f"decode step, {rows} row(s)", stacks[rows] + [proj], WEIGHTS[f"step{rows}"]))
    qkv = [_f32(rng.standard_normal((1, attention_frames, heads, dh))) for _ in range(3)]
    cases.append(Case("encoder attention", [KernelCall("Attention", qkv, [(1, attention_frames, heads, dh)])],
                      WEIGHTS["attention_per_layer"] * layers))
    return cases


def _calls(library: str, cases: Sequence[Case]) -> List[List[host_calls.Call]]:
    lib = ctypes.CDLL(library)
    return [[host_calls.Call(getattr(lib, c.kernel), list(c.inputs) + [np.zeros(s, np.float32) for s in c.outputs])
             for c in case.calls] for case in cases]


def time_libraries(libraries: Mapping[str, str], cases: Sequence[Case] = (), rounds: int = ROUNDS,
                   clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """``{name: seconds}``: for each library (``{name: path}``), the sum over ``cases`` (default
    :func:`workload`) of the case's fastest round times its weight, the libraries interleaved
    round by round (the order rotating). Every case runs once first, untimed."""
    cases = list(cases) or workload()
    calls = {name: _calls(path, cases) for name, path in libraries.items()}
    for per_case in calls.values():
        for seq in per_case:
            for fn in seq:
                fn()
    best = {name: [float("inf")] * len(cases) for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for i, seq in enumerate(calls[name]):
                t = clock()
                for fn in seq:
                    fn()
                best[name][i] = min(best[name][i], clock() - t)
    return {name: float(sum(c.weight * t for c, t in zip(cases, v))) for name, v in best.items()}
