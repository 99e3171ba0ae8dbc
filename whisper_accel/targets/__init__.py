"""Patch groups: each name maps to a builder ``build(env) -> list[Patch]``.

A builder raises :class:`whisper_accel._errors.Unsupported` with a one-line reason when its
group cannot apply here (missing kernel, unsupported stack); ``patch()`` reports that reason
and leaves the group stock. Builders only describe patches; ``_patcher`` applies them.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from .._patcher import Patch


def _compat(env) -> List[Patch]:
    from .compat import build

    return build(env)


def _attention(env) -> List[Patch]:
    from .mindnlp05 import attention_patches

    return attention_patches(env)


def _conv1d(env) -> List[Patch]:
    from .mindnlp05 import conv1d_patches

    return conv1d_patches(env)


def _compiled(env) -> List[Patch]:
    from .compiled_glue import patches

    return patches(env)


def _generation(env) -> List[Patch]:
    from .generation import patches

    return patches(env)


def _greedy(env) -> List[Patch]:
    from .greedy import patches

    return patches(env)


#: Group name -> builder, in the order they are applied. ``patch()`` enables all by default.
GROUPS: Dict[str, Callable[[object], List[Patch]]] = {
    "compat": _compat,
    "attention": _attention,
    "conv1d": _conv1d,
    "compiled": _compiled,
    "generation": _generation,
    "greedy": _greedy,
}
