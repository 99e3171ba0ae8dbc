"""The encoder engine: one ``WhisperEncoder``'s weights (:class:`~.arranged.EncoderWeights`)
and its executors -- ``host`` (:class:`~.executors.host.HostEncoderExecutor`), ``fused`` and
``plain`` (:mod:`.executors.graph`) -- behind one :meth:`EncoderEngine.encode`.

Which executor runs first: ``Config.encoder`` forces one (the others after it in
:data:`whisper_accel.config.EXECUTORS` order stay as fallbacks); ``auto`` measures ``host``
against ``fused`` per input shape on this machine (:mod:`.choice`; with ``Config.measure`` off
or a single candidate: the rule below). A failing executor falls back to the next one for this
model only (:mod:`.engine`).

The rule without a measurement: ``host`` where the fused graphs would split the layers over
several launches (large models), else ``fused`` (one graph for the whole encoder). A measured
case runs ``host`` first (no graph to compile), then ``fused``. With a verdict, a process's
first calls may run a stand-in while the verdict's graph is not compiled yet
(:func:`.choice.stand_in`).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

from .. import config as _config
from . import native
from .arranged import EncoderWeights
from .choice import Choice
from .engine import Engine, NotCopied, order_for
from .executors.graph import FusedEncoder, PlainEncoder
from .executors.host import HostEncoderExecutor


class EncoderEngine(NotCopied):
    """``encode(features (B, mels, frames) float32) -> (B, frames // 2, d_model)``."""

    def __init__(self, encoder, config: Optional[_config.Config] = None):
        self.config = _config.current() if config is None else config
        self.weights = w = EncoderWeights(encoder)
        self._fused = FusedEncoder(w, self.config)
        self._plain = PlainEncoder(w, self.config)
        self._host = HostEncoderExecutor(w, self.config)
        self.engine = Engine([self._host, self._fused, self._plain],
                             order_for(self.config.encoder))
        self.choice: Optional[Choice] = None
        # host first: its first call compiles nothing (a graph executor's compiles its graph)
        candidates = [n for n in ("host", "fused") if n in self.engine.usable()]
        if self.config.encoder == "auto" and self.config.measure and len(candidates) > 1:
            lib = native.library(self.config)
            self.choice = Choice("encoder", w.dims(), candidates, self._rule((1, w.mels, 2 * w.positions)),
                                 self.config, lib.path.rsplit("/", 1)[-1] if lib else None)
        #: (B, mels, frames) shapes seen, for reports
        self.compiled_shapes: List[Tuple] = []
        self.lock = self.engine.lock

    @property
    def model_dtype(self):
        return self.weights.model_dtype

    def matches(self, encoder) -> bool:
        """True while ``encoder``'s weights are the very objects, dtypes and buffers arranged."""
        return self.weights.matches(encoder)

    def _rule(self, shape) -> str:
        usable = self.engine.usable()
        if "host" in usable and "fused" in usable:
            return "host" if self._fused.group(shape) < len(self.weights.layers) else "fused"
        return usable[0] if usable else "plain"

    def encode(self, feats):
        shape = tuple(int(s) for s in feats.shape)
        if shape not in self.compiled_shapes:
            self.compiled_shapes.append(shape)
        timing, first = None, None
        if self.config.encoder == "auto":
            if self.choice is not None:
                first, timing = self.choice.next(shape, self.engine.usable())
            else:
                first = self._rule(shape)
        start = time.perf_counter()
        out = self.engine.run("encode", feats, first=first)
        if timing and self.engine.ran.get("encode") == first:
            out.asnumpy()  # launches are asynchronous: time to completion
            self.choice.record(shape, first, time.perf_counter() - start, first=timing == "first")
        return out

    @property
    def executor(self) -> Optional[str]:
        """Which executor ran the last :meth:`encode` ("host", "fused", "plain")."""
        return self.engine.ran.get("encode")

    @property
    def layers_per_launch(self) -> Optional[int]:
        """Layers per graph launch of the last :meth:`encode` (None: it ran on the host)."""
        ran = self.executor
        return {"fused": self._fused.last_group, "plain": self._plain.last_group}.get(ran)

    def report(self) -> Dict:
        out = {"config": self.config.encoder, **self.engine.report(), "matmul_precision": self._host.precision()}
        if self.choice is not None:
            out["choice"] = self.choice.report()
        return out
