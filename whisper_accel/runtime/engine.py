"""The one fallback mechanism every engine uses: executors tried in order, faults kept per engine.

An *engine* (:class:`~.encoder_engine.EncoderEngine`, :class:`~.decoder_engine.DecoderEngine`)
holds one model's weights and several *executors* (:mod:`.executors`), each able to run some of
its operations ("encode", "cross_kv", "decode_next", ...). :meth:`Engine.run` calls the first
executor in the engine's order that has the operation:

* an executor that does not take this call (a shape, an option it lacks) raises
  :class:`Decline`: the next one runs it, and nothing is recorded; one that cannot run for
  this model at all raises :class:`Unavailable`: recorded, never tried again, no warning;
* an executor that fails with any other exception is *faulted* for this engine (never for
  other models or the process): recorded in :attr:`Engine.faults` with the reason, logged, and
  the next one runs the call; the last executor's exception propagates (the patch group then
  turns the model to stock code);
* :attr:`Engine.ran` records which executor ran each operation last (reports, tests).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Sequence

from .. import config as _config

logger = logging.getLogger("whisper_accel")

#: One lock for every engine: graph launches and host kernel calls from several threads are
#: serialised (whether concurrent launches of one jit function are safe in MindSpore 2.7 is
#: not established).
LAUNCH_LOCK = threading.RLock()


def order_for(setting: str) -> List[str]:
    """Executor names tried in order for a ``Config.encoder``/``decoder`` value: ``auto``, all
    of :data:`whisper_accel.config.EXECUTORS`; a forced one, it and those after it."""
    names = _config.EXECUTORS
    return list(names if setting == "auto" else names[names.index(setting):])


class Decline(Exception):
    """An executor does not take this call; the next executor runs it (not a fault)."""


class Unavailable(Decline):
    """An executor cannot run for this model at all (e.g. weights it cannot read): recorded in
    :attr:`Engine.faults` as unavailable, without a warning, and never tried again."""


class Executor:
    """One way to run an engine's operations, on weights ``w`` with a config. Subclasses define
    the operations they run as methods, and set :attr:`name` (one of
    :data:`whisper_accel.config.EXECUTORS`)."""

    name = "?"

    def __init__(self, w, config):
        #: the engine's arranged weights and the config it was built with
        self.w, self.config = w, config

    def unavailable(self):
        """Why this executor cannot run here at all (None: it can). Checked once per engine."""
        return None


class NotCopied:
    """An engine is derived state of the module that holds it: a ``copy.deepcopy`` of the model
    gets none (its copy builds its own on first use, from its own weights), and pickling the
    model (``torch.save``) stores none."""

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


class Engine:
    """Executors of one model part in fallback order, and the faults met so far."""

    def __init__(self, executors: Sequence[Executor], order: Sequence[str]):
        self.executors: Dict[str, Executor] = {e.name: e for e in executors}
        #: executor names, first tried first
        self.order: List[str] = [n for n in order if n in self.executors]
        #: executor name -> why it is not used for this model (unavailable here, or faulted)
        self.faults: Dict[str, str] = {}
        #: operation -> the executor that ran it last
        self.ran: Dict[str, str] = {}
        self.lock = LAUNCH_LOCK
        for name in list(self.order):
            why = self.executors[name].unavailable()
            if why:
                self.faults[name] = f"unavailable: {why}"

    def usable(self) -> List[str]:
        """The executors not faulted, in order."""
        return [n for n in self.order if n not in self.faults]

    def prefer(self, name: str) -> None:
        """Try ``name`` first from now on (the rest keep their order)."""
        if name in self.order:
            self.order = [name] + [n for n in self.order if n != name]

    def fault(self, name: str, op: str, exc: BaseException) -> None:
        """Stop using executor ``name`` for this engine after ``exc`` in ``op``."""
        self.faults[name] = f"fault in {op}: {exc!r}"
        logger.warning("whisper_accel: the %s executor failed (%r) in %s; this model falls back to the next "
                       "executor", name, exc, op)

    def run(self, op: str, *args, first: Optional[str] = None, **kwargs) -> Any:
        """``op(*args, **kwargs)`` on the first usable executor that takes it (``first``: that
        one before the engine's order). Under :data:`LAUNCH_LOCK`."""
        with self.lock:
            names = self.usable()
            if first in names:
                names = [first] + [n for n in names if n != first]
            candidates = [n for n in names if hasattr(self.executors[n], op)]
            for i, name in enumerate(candidates):
                try:
                    out = getattr(self.executors[name], op)(*args, **kwargs)
                except Unavailable as exc:
                    self.faults[name] = f"unavailable: {exc}"
                    continue
                except Decline:
                    continue
                except Exception as exc:  # noqa: BLE001  the next executor runs the call
                    if i == len(candidates) - 1:
                        raise
                    self.fault(name, op, exc)
                    continue
                self.ran[op] = name
                return out
        raise RuntimeError(f"no executor of {type(self).__name__} runs {op} here "
                           f"(faults: {self.faults or 'none'})")

    def report(self) -> Dict[str, Any]:
        """Order, faults and what ran, for ``status()`` and ``doctor``."""
        return {"order": list(self.order), "faults": dict(self.faults), "ran": dict(self.ran)}
