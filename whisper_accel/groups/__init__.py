"""The patch groups: one module per group, named after it.

Every group module keeps the same contract (see README, "Adding a patch group"):

* ``GATES``: an :class:`whisper_accel._environment.Gates` -- backends, version specifiers and
  probes, as data; ``patch()`` checks them centrally before asking for patches;
* ``SUMMARY``: one line for ``doctor`` and the docs;
* ``patches(env) -> list[Patch]``: describes the patches (the patcher applies them), or raises
  :class:`whisper_accel._errors.Unsupported` with a one-line reason.

:data:`NAMES` is the registry, in application order. Importing this package imports no group
module (so ``WHISPER_ACCEL`` parsing and ``import whisper_accel`` stay light); :func:`load`
imports one on demand, and ``patch()`` turns any failure of that import into a warning.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Tuple

#: Registered groups, in the order they are applied. ``patch()`` enables all by default.
NAMES: Tuple[str, ...] = ("compat", "attention", "conv1d", "encoder", "decoder", "generation", "greedy", "beam",
                          "assisted", "word_timestamps")

#: Old group names and the groups they stand for (``patch(compiled=False)`` and
#: ``WHISPER_ACCEL=compiled,...`` keep working).
ALIASES: Dict[str, Tuple[str, ...]] = {"compiled": ("encoder", "decoder")}


def load(name: str) -> ModuleType:
    """The module of group ``name`` (imports it, with its runtime and kernels)."""
    if name not in NAMES:
        raise ValueError(f"unknown patch group {name!r}; valid: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")
