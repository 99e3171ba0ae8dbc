"""Which engine (:class:`~.encoder_engine.EncoderEngine`, :class:`~.decoder_engine.DecoderEngine`)
serves a Whisper module, one inference at a time, and what happens when the fast path fails.

* :func:`compiled_for` builds a module's engine once and keeps it on the module
  (``module.__dict__[ATTR]``) while its ``matches`` holds; weights changed in place, reloaded or
  cast are seen on the next call and the engine is rebuilt (no recompilation: graphs are keyed
  on shapes and dtypes), with the config in force then (:func:`whisper_accel.config.current`).
* :func:`fault` is the run-time fault path: an unexpected exception in the fast path (a graph
  that fails to compile or launch, an unexpected module layout) turns that module's fast path
  off for good and reports one warning (:func:`whisper_accel._errors.problem`; an error in
  strict mode); the caller then runs the stock code.
* :data:`INFERENCE_LOCK` and :func:`serialised`: one inference at a time across threads.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Callable, Optional

import mindspore as ms
from mindspore import ops

from .._errors import problem
from .arranged import MODEL_DTYPES
from .decoder_engine import DecoderEngine

logger = logging.getLogger(__name__)
ATTR = "_whisper_accel_compiled"  # on the module: its engine, or False after a fault
#: Why a module runs stock code once :func:`fault` turned its fast path off (counted in ``calls``).
OFF_AFTER_FAULT = "the fast path is off for this model after an earlier fault"
_build_lock = threading.Lock()
#: Every engine built in this process and still alive (for ``status()``).
ENGINES: "weakref.WeakSet" = weakref.WeakSet()

#: One process-wide re-entrant lock around every patched Whisper entry point (``generate``,
#: ``WhisperForConditionalGeneration.forward``, ``WhisperEncoder.forward``, the decode loops):
#: MindSpore 2.7's PyNative executor on CPU gives wrong results when several Python threads run
#: operator streams at once (seen up to 2.6e-4 relative on logits with 8 threads), so concurrent
#: inference is serialised rather than raced. Re-entrant: generate -> forward -> encoder.
INFERENCE_LOCK = threading.RLock()


def compiled_for(module, build: Callable):
    """``module``'s engine (built by ``build(module)`` when missing or stale), or ``None`` when
    the fast path is off for this module."""
    cw = module.__dict__.get(ATTR)
    if cw is False:
        return None
    if cw is not None and cw.matches(module):
        return cw
    with _build_lock:
        try:
            cw = build(module)
            ENGINES.add(cw)
        except Exception as exc:  # noqa: BLE001  unexpected module layout: stock from now on
            fault(module, "arranging the weights for the compiled graphs", exc)
            return None
        module.__dict__[ATTR] = cw
    return cw


#: Why the decoder declines encoder states it cannot take (see :func:`compiled_to_decode`).
ENCODER_OUTPUT = ("encoder_outputs missing, not (rows, frames, d), or not float32/float16/bfloat16 in the "
                  "model's dtype")


def beyond_positions(length: int, positions: int) -> str:
    return f"max_length {length} is beyond the model's {positions} decoder positions"


def compiled_to_decode(module, hidden, rows: int, length: int):
    """The decoder engine that decodes ``rows`` rows against encoder states ``hidden`` up to
    ``length`` positions, or a ``str``: why stock code must run instead (states of another shape
    or dtype, the fast path off after a fault, more positions than the model has)."""
    if getattr(hidden, "ndim", 0) != 3 or hidden.shape[0] != rows or not graph_dtype(hidden, module.proj_out.weight):
        return ENCODER_OUTPUT
    cw = compiled_for(module, DecoderEngine)
    if cw is None:
        return OFF_AFTER_FAULT
    if cw.model_dtype != hidden.dtype:
        return ENCODER_OUTPUT
    if length > cw.max_positions:
        return beyond_positions(length, cw.max_positions)
    return cw


def fault(module, what: str, exc: BaseException) -> str:
    """The fast path failed at ``what``: this module runs stock code from now on; one warning
    per distinct failure (the encoder's and the decoder's launch failing alike are one), or,
    strict, :class:`WhisperAccelError` from ``exc``. Returns the reason to count the call under."""
    module.__dict__[ATTR] = False
    logger.debug("whisper_accel: %s failed for %s", what, type(module).__name__, exc_info=exc)
    problem(f"whisper_accel: the compiled fast path failed ({exc!r}); this model runs stock "
            "Whisper code from now on", cause=exc)
    return f"fault in {what}: {exc!r} (stock from now on for this model)"


def engines_report() -> list:
    """Each live engine's kind, settings, executor order, faults and choice (``status()``)."""
    out = []
    for engine in list(ENGINES):
        try:
            out.append({"kind": type(engine).__name__, **engine.report()})
        except Exception as exc:  # noqa: BLE001  a report must not break status()
            out.append({"kind": type(engine).__name__, "error": repr(exc)})
    return out


def graph_dtype(t, weight) -> bool:
    """``t`` may enter the graphs: float32/float16/bfloat16 and the dtype of the model's
    ``weight`` (a mismatch is left to stock code, which raises its own error)."""
    return getattr(t, "dtype", None) in MODEL_DTYPES and t.dtype == weight.dtype


def to_compute(t):
    """Input for the graphs: they compute in float32."""
    return t if t.dtype == ms.float32 else ops.cast(t, ms.float32)


def to_model(t, cw):
    """A graph output in the model's dtype, as stock code would return it."""
    return t if cw.model_dtype == ms.float32 else ops.cast(t, cw.model_dtype)


def serialised(make: Optional[Callable]) -> Callable:
    """A patch factory whose replacement holds :data:`INFERENCE_LOCK` around ``make(original)``
    (or around ``original`` itself when ``make`` is None)."""

    def factory(original):
        inner = original if make is None else make(original)

        def locked(*args, **kwargs):
            with INFERENCE_LOCK:
                return inner(*args, **kwargs)

        return locked

    return factory
