"""The patch ledger: apply a set of attribute replacements all or nothing, undo exactly.

A :class:`Patch` names an owner (class or module), an attribute and a factory that builds the
replacement from the original. :class:`Patcher` records ``(owner, attribute, original)`` read
from ``vars(owner)`` -- never ``getattr``, which would hand back a bound or inherited object --
and restores those very objects on :meth:`Patcher.undo`. One re-entrant lock serialises every
state change, so concurrent ``patch()``/``unpatch()`` calls end in the state of the last call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Tuple

#: Stands for "the owner had no such attribute of its own" in records and :meth:`Patcher.originals`.
MISSING = object()

#: Attribute set on every replacement so a second wrap can be detected and refused.
MARKER = "__whisper_accel__"


@dataclass(frozen=True)
class Patch:
    """One attribute replacement.

    :param group: the patch group it belongs to (``attention``, ``conv1d``, ``compat``, ...).
    :param owner: the class or module whose attribute is replaced.
    :param attribute: the attribute name.
    :param make: builds the replacement from the original: the owner's own attribute, else
        the inherited one, else ``None`` (an added attribute).
    :param description: one line for reports.
    """

    group: str
    owner: Any
    attribute: str
    make: Callable[[Any], Any]
    description: str = ""

    @property
    def target(self) -> str:
        name = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", "?")
        module = getattr(self.owner, "__module__", None)
        if isinstance(self.owner, type) and module:
            name = f"{module}.{name}"
        return f"{name}.{self.attribute}"


@dataclass
class _Record:
    patch: Patch
    original: Any  # MISSING when the attribute did not exist on the owner itself
    replacement: Any


@dataclass
class Patcher:
    """Holds the applied patches. Use one instance per process (see ``whisper_accel._state``)."""

    _lock: threading.RLock = field(default_factory=threading.RLock)
    _records: List[_Record] = field(default_factory=list)

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def applied(self) -> List[Patch]:
        with self._lock:
            return [r.patch for r in self._records]

    def originals(self) -> List[Tuple[Any, str, Any]]:
        with self._lock:
            return [(r.patch.owner, r.patch.attribute, r.original) for r in self._records]

    def apply(self, patches: Iterable[Patch]) -> List[Patch]:
        """Apply every patch or none. Raises what the failing patch raised, after rollback."""
        with self._lock:
            if self._records:
                raise RuntimeError("patches are already applied; undo() first")
            done: List[_Record] = []
            try:
                for p in patches:
                    original = vars(p.owner).get(p.attribute, MISSING) if _has_dict(p.owner) else MISSING
                    if original is MISSING and not _has_dict(p.owner):
                        original = getattr(p.owner, p.attribute, MISSING)
                    if original is not MISSING and is_ours(original):
                        raise RuntimeError(f"{p.target} is already wrapped by whisper_accel")
                    # an inherited attribute: wrap what the owner resolves to now, and on undo
                    # delete the override so inheritance is back exactly as it was
                    base = getattr(p.owner, p.attribute, None) if original is MISSING else original
                    replacement = p.make(base)
                    _mark(replacement)
                    setattr(p.owner, p.attribute, replacement)
                    done.append(_Record(p, original, replacement))
            except BaseException:
                _restore(done)
                raise
            self._records = done
            return [r.patch for r in done]

    def undo(self) -> List[Patch]:
        """Restore the exact originals, newest first. Returns the patches undone."""
        with self._lock:
            done, self._records = self._records, []
            _restore(done)
            return [r.patch for r in done]


def _has_dict(owner: Any) -> bool:
    try:
        vars(owner)
        return True
    except TypeError:
        return False


def _mark(obj: Any) -> None:
    try:
        setattr(obj, MARKER, True)
    except (AttributeError, TypeError):  # builtins, slots: nothing to mark
        pass


def is_ours(obj: Any) -> bool:
    """True when ``obj`` (or the function behind a staticmethod/classmethod) is a replacement."""
    inner = getattr(obj, "__func__", obj)
    return bool(getattr(inner, MARKER, False) or getattr(obj, MARKER, False))


def _restore(records: List[_Record]) -> None:
    errors = []
    for r in reversed(records):
        try:
            if r.original is MISSING:
                if r.patch.attribute in vars(r.patch.owner):
                    delattr(r.patch.owner, r.patch.attribute)
            else:
                setattr(r.patch.owner, r.patch.attribute, r.original)
        except Exception as exc:  # keep restoring the rest; report at the end
            errors.append(f"{r.patch.target}: {exc}")
    if errors:
        raise RuntimeError("whisper_accel could not restore: " + "; ".join(errors))


def wrapper_depth(obj: Any, limit: int = 100) -> int:
    """How many whisper_accel wrappers stand between ``obj`` and a stock object."""
    depth = 0
    while obj is not None and is_ours(obj) and depth < limit:
        depth += 1
        obj = getattr(getattr(obj, "__func__", obj), "__wrapped__", None)
    return depth


