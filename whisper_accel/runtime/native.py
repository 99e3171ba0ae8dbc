"""The fused encoder kernels (:mod:`whisper_accel.kernels.fused`, source ``kernels/fused.cc``):
built once per machine with the system C++ compiler, checked, and handed to the compiled model.

:func:`fused_graphs` returns the fused graphs module, or None, in which case the encoder and the
decoder steps run the plain MindSpore graphs of :mod:`whisper_accel.kernels.graphs` (same
results within ~4e-7, slower). None when: ``WHISPER_ACCEL_NATIVE=0``; the CPU lacks AVX2/FMA/F16C (read from
``/proc/cpuinfo``); no C++ compiler (``$CXX``, else ``c++``/``g++``); the build fails; or a
kernel's self-check against numpy fails. :func:`state` says which, for ``doctor`` and reports.

The library is built into the cache directory (``$WHISPER_ACCEL_CACHE_DIR``, else
``$XDG_CACHE_HOME/whisper_accel``, else ``~/.cache/whisper_accel``; a temporary directory with
``WHISPER_ACCEL_PROBE_CACHE=0``), named by a hash of the source, the flags and the compiler's
version, written to a temporary file and renamed into place (safe under concurrent processes).
A build costs ~10 s once per machine (2 cores); later processes load the file. Decided once per process.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .. import _probe_cache
from . import host_calls

logger = logging.getLogger("whisper_accel")

ENV_SWITCH = "WHISPER_ACCEL_NATIVE"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-std=c++14", "-pthread")
SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "fused.cc"
_OFF = {"0", "false", "off", "no"}

_lock = threading.Lock()
_state: Dict[str, Optional[str]] = {}  # "library" (path or None), "reason" (why not, or None)


def _cpu_ok() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2/FMA/F16C"
    missing = {"avx2", "fma", "f16c"} - flags
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("c++") or shutil.which("g++")


def _directory() -> Path:
    if _probe_cache.enabled():
        return _probe_cache.directory() / "native"
    return Path(tempfile.mkdtemp(prefix="whisper_accel_native_"))


def build(directory: Path, cxx: str) -> Path:
    """The library for this source, flags and compiler in ``directory`` (built when absent)."""
    version = subprocess.run([cxx, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=30).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = directory / f"fused-{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=str(directory))
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stdout.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _gelu(x):
    from math import erf, sqrt

    return x * 0.5 * (np.vectorize(erf)(x / sqrt(2.0)) + 1.0)


def _ln(x, g, b):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b


def _softmax(s):
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _attention(q, k, v):  # (B, T, H, Dh), (B, S, H, Dh) -> (B, T, H, Dh)
    return np.einsum("bhts,bshd->bthd", _softmax(np.einsum("bthd,bshd->bhts", q, k)), v)


def _layer_inputs(rng, rows, audios, pos0, heads=2, dh=12, slots=6, frames=9, ffn=40):
    """Random ``DecoderLayer`` inputs: D = 24 (a tail after the 8-wide vectors), slot ``pos0``
    written by the step; with several rows, slot 1 of row 0 is masked."""
    d = heads * dh

    def m(*shape):
        return rng.standard_normal(shape) / np.sqrt(shape[-1])

    ok = np.ones((rows if rows > 1 else 1, slots))
    if rows > 1:
        ok[0, 1] = 0
    ln = lambda: (1 + 0.1 * m(d), 0.1 * m(d))  # noqa: E731
    return (m(rows, d) * 3, *ln(), m(d, d), m(d), m(d, d), m(d, d), m(d), m(d, d), m(d),
            m(rows, heads, slots, dh), m(rows, heads, slots, dh), np.array([pos0], np.int32), ok, *ln(), m(d, d), m(d),
            m(d, d), m(d), m(audios, heads, dh, frames), m(audios, heads, frames, dh), *ln(), m(ffn, d), m(ffn),
            m(d, ffn), m(d), np.array([0.3]))


def _decoder_layer(a):
    """The ``DecoderLayer`` kernel's inputs (see ``fused.cc``) -> (x, k, v), in float64."""
    (x, g1, b1, wq, bq, wk, wv, bv, wo, bo, kc, vc, pos, ok, g2, b2, wcq, bcq, wco, bco, kx, vx, g3, b3,
     w1, c1, w2, c2, scaling) = a
    r, d = x.shape
    _, h, s, dh = kc.shape
    p0, sc, beams = int(pos[0]), float(scaling[0]), r // kx.shape[0]
    heads = lambda t: t.reshape(r, h, 1, dh)  # noqa: E731
    n = _ln(x, g1, b1)
    q, k, v = heads((n @ wq.T + bq) * sc), heads(n @ wk.T), heads(n @ wv.T + bv)
    keys, vals = kc.copy(), vc.copy()
    keys[:, :, p0:p0 + 1], vals[:, :, p0:p0 + 1] = k, v
    visible = (np.arange(s) <= p0) & (ok > 0)  # (1 or R, S)
    # the graph's mask: float32's lowest added (a row with nothing visible averages every slot)
    scores = q @ keys.transpose(0, 1, 3, 2) + np.where(visible, 0.0, -3.4028234663852886e38)[:, None, None, :]
    x = x + (_softmax(scores) @ vals).reshape(r, d) @ wo.T + bo
    q = heads((_ln(x, g2, b2) @ wcq.T + bcq) * sc)
    kt, vv = np.repeat(kx, beams, 0), np.repeat(vx, beams, 0)  # rows of one audio share its K/V
    x = x + (_softmax(q @ kt) @ vv).reshape(r, d) @ wco.T + bco
    x = x + _gelu(_ln(x, g3, b3) @ w1.T + c1) @ w2.T + c2
    return x, k, v


def _cross_kv(enc, *weights, heads=2):
    """The ``CrossKV`` kernel's inputs -> per layer K^T (B, H, Dh, S), V (B, H, S, Dh), in float64."""
    b, s, d = enc.shape
    out = []
    for wk, wv, bv in zip(weights[0::3], weights[1::3], weights[2::3]):
        out += [(enc @ wk.T).reshape(b, s, heads, d // heads).transpose(0, 2, 3, 1),
                (enc @ wv.T + bv).reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3)]
    return tuple(out)


#: DecoderLayer's weight matrices among its inputs (Wq, Wk, Wv, Wo, Wcq, Wco, W1, W2)
_MATRICES = (3, 5, 6, 8, 16, 18, 24, 26)
_HALVES = (("F16", lambda a: a.astype(np.float16)),
           ("BF16", lambda a: (a.view(np.uint32) >> 16).astype(np.uint16)))  # bfloat16 bits (truncated)


def check_half(library: str) -> Optional[str]:
    """The host steps' half-precision kernels (``DecoderLayerF16``/``BF16``, ``RowsMatMulF16``/
    ``BF16``, called through ctypes) against the float32 kernels on the same weights' exact
    float32 values: equal bit for bit (the layer for 3 beams of one audio with a masked slot;
    the projection with 5 rows, 37 inputs: a scalar tail, 39 outputs). None, else what differs."""
    lib = ctypes.CDLL(library)
    rng = np.random.default_rng(1)
    layer = [a if a.dtype == np.int32 else a.astype(np.float32) for a in _layer_inputs(rng, 3, 1, 3)]
    (r, d), (_, h, _, dh) = layer[0].shape, layer[10].shape
    rows, w = rng.standard_normal((5, 37)).astype(np.float32), rng.standard_normal((39, 37)).astype(np.float32)
    for suffix, lower in _HALVES:
        half = [lower(a) if i in _MATRICES else a for i, a in enumerate(layer)]
        exact = [host_calls.upcast(a) if i in _MATRICES else a for i, a in enumerate(half)]
        got = {}
        for name, args in (("DecoderLayer", exact), ("DecoderLayer" + suffix, half)):
            outs = [np.zeros((r, d), np.float32), np.zeros((r, h, 1, dh), np.float32), np.zeros((r, h, 1, dh), np.float32)]
            host_calls.Call(getattr(lib, name), args + outs)()
            got[name] = outs
        for name, args in (("RowsMatMul", [rows, host_calls.upcast(lower(w))]), ("RowsMatMul" + suffix, [rows, lower(w)])):
            out = np.zeros((5, 39), np.float32)
            host_calls.Call(getattr(lib, name), args + [out])()
            got[name] = [out]
        for base in ("DecoderLayer", "RowsMatMul"):
            if not all(np.array_equal(a, b) for a, b in zip(got[base], got[base + suffix])):
                return f"kernel {base + suffix} differs from {base} on the same weights"
    return None


def check_host(library: str) -> Optional[str]:
    """The host encoder's ``AttentionBias`` (called through ctypes) against ``Attention`` on q and
    v with their biases and scaling applied in numpy's float32: equal bit for bit (2 audios, 11
    queries, 37 keys, 2 heads of 20). None, else what differs."""
    lib = ctypes.CDLL(library)
    rng = np.random.default_rng(2)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v, bq, bv = f32(2, 11, 2, 20), f32(2, 37, 2, 20), f32(2, 37, 2, 20), f32(40), f32(40)
    scale = np.array([0.3], np.float32)
    want, got = np.zeros_like(q), np.zeros_like(q)
    heads = lambda b: b.reshape(2, 20)  # noqa: E731
    host_calls.Call(lib.Attention, [(q + heads(bq)) * scale[0], k, v + heads(bv), want])()
    host_calls.Call(lib.AttentionBias, [q, k, v, bq, bv, scale, got])()
    return None if np.array_equal(want, got) else "kernel AttentionBias differs from Attention on the biased inputs"


def check(library: str) -> Optional[str]:
    """Run every kernel once against a float64 numpy reference (rows of 37 values: a tail after
    the 8-wide vectors; attention with 7 queries and 37 keys: a partial row block and a partial
    key tile, and with a head dim of 20; the projection with 5 rows and with 1, 39 outputs; the
    decoder layer for 3 beams of one audio with a masked slot, and for one row; cross K/V of two
    layers for two audios of 13 frames, D 264: a row panel across the audios, a partial column
    block, two blocks of the inner dimension), then :func:`check_half` and :func:`check_host`.
    None when all agree within 1e-5 (the half-precision and host kernels: bit for bit), else
    what differs."""
    import mindspore as ms

    from ..kernels import fused

    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((2, 3, 37)) * 2 for _ in range(2))
    bias, g, b = (rng.standard_normal(37) for _ in range(3))
    chan = rng.standard_normal(3)
    q, k, v = (rng.standard_normal(shape) for shape in ((2, 7, 2, 16), (2, 37, 2, 16), (2, 37, 2, 16)))
    q2, kv2 = rng.standard_normal((1, 13, 3, 20)) * 3, rng.standard_normal((1, 13, 3, 20))
    rows, w = rng.standard_normal((5, 37)), rng.standard_normal((39, 37))
    layer3, layer1 = _layer_inputs(rng, 3, 1, 3), _layer_inputs(rng, 1, 1, 0)
    cross = (rng.standard_normal((2, 13, 264)),) + tuple(
        rng.standard_normal(shape) / 16 for _ in range(2) for shape in ((264, 264), (264, 264), (264,)))
    r = x + (y + bias)
    want = (("LayerNorm", (x, g, b), (_ln(x, g, b),)),
            ("ResLayerNorm", (x, y, bias, g, b), (r, _ln(r, g, b))),
            ("BiasResidual", (x, y, bias), (r,)),
            ("BiasGelu", (y, bias), (_gelu(y + bias),)),
            ("ChanBiasGelu", (y, chan), (_gelu(y + chan[:, None]),)),
            ("Attention", (q, k, v), (_attention(q, k, v),)),
            ("Attention", (q2, kv2, -kv2), (_attention(q2, kv2, -kv2),)),  # head dim not a multiple of 16
            ("RowsMatMul", (rows, w), (rows @ w.T,)),  # 5 rows: a partial block of 4; 39 outputs: an odd one
            ("RowsMatMul", (rows[:1], w), (rows[:1] @ w.T,)),  # one row: blocks of 8 outputs, then 2, then 1
            ("DecoderLayer", layer3, _decoder_layer(layer3)),  # 3 beams of one audio, a masked slot
            ("DecoderLayer", layer1, _decoder_layer(layer1)),  # one row, mask shared
            ("CrossKV", cross, _cross_kv(*cross, heads=2)))
    for name, args, outs in want:
        tensors = (ms.Tensor(a if a.dtype == np.int32 else a.astype(np.float32)) for a in args)
        got = fused.kernel(library, name, heads=2)(*tensors)
        got = got if isinstance(got, tuple) else (got,)
        for out, ref in zip(got, outs):
            err = float(np.abs(out.asnumpy() - ref).max() / (np.abs(ref).max() + 1e-30))
            if not err < 1e-5:
                return f"kernel {name} differs from its reference by {err:.1e}"
    return check_half(library) or check_host(library)


def _decide() -> Dict[str, Optional[str]]:
    if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
        return {"library": None, "reason": f"{ENV_SWITCH}=0"}
    why = _cpu_ok()
    cxx = _compiler() if why is None else None
    if why is None and cxx is None:
        why = "no C++ compiler ($CXX, c++ or g++)"
    if why is not None:
        return {"library": None, "reason": why}
    try:
        library = str(build(_directory(), cxx))
        why = check(library)
    except Exception as exc:  # noqa: BLE001  (any failure: the plain graphs run)
        library, why = None, f"build or load failed: {exc!r}"
    if why is not None:
        return {"library": None, "reason": why}
    from ..kernels import fused

    fused.configure(library)
    return {"library": library, "reason": None}


def state() -> Dict[str, Optional[str]]:
    """``{"library": path or None, "reason": why not or None}`` (decides on first use)."""
    with _lock:
        if not _state:
            _state.update(_decide())
            if _state["reason"]:
                logger.info("whisper_accel: fused kernels not used (%s); the encoder and decoder steps run MindSpore's own "
                            "operators", _state["reason"])
        return dict(_state)


def fused_graphs():
    """:mod:`whisper_accel.kernels.fused` (the encoder graphs and ``DECODER``, the step graphs)
    when its kernels are usable here, else None."""
    if state()["library"] is None:
        return None
    from ..kernels import fused

    return fused


def disable(reason: str) -> None:
    """Stop using the fused kernels in this process (a graph with them failed)."""
    with _lock:
        _state.update({"library": None, "reason": reason})


def restore(saved: Dict[str, Optional[str]]) -> None:
    """Put back a decision returned by :func:`state` (benchmarks toggle the kernels with
    :func:`disable` and this, without deciding again)."""
    with _lock:
        _state.clear()
        _state.update(saved)


def reset() -> None:
    """Forget the decision (tests): the next :func:`state` decides again."""
    with _lock:
        _state.clear()
