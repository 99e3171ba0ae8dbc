"""The patch ledger: apply a set of attribute replacements all or nothing, undo exactly.

A :class:`Patch` names an owner (class or module), an attribute, a factory that builds the
replacement from the original, and its kind: :data:`REPLACE` an attribute the owner has (its
own or inherited) or :data:`ADD` one it lacks. :meth:`Patch.problem` says when the kind does not
fit what is there (a replace target renamed upstream must not be *added* and reported as
applied). :class:`Patcher` records ``(owner, attribute, original)`` read from ``vars(owner)`` --
never ``getattr``, which would hand back a bound or inherited object -- and restores those very
objects on :meth:`Patcher.undo`. Every replacement goes through :func:`wrap` (the one wrapper
convention: ``__wrapped__``, name, qualname, doc, module, and the mark that refuses a second
wrap). One re-entrant lock serialises every state change, so concurrent ``patch()``/``unpatch()``
calls end in the state of the last call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Tuple

#: Stands for "the owner had no such attribute of its own" in records and :meth:`Patcher.originals`.
MISSING = object()

#: Attribute set on every replacement so a second wrap can be detected and refused.
MARKER = "__whisper_accel__"

#: :attr:`Patch.kind` values.
REPLACE = "replace"
ADD = "add"


@dataclass(frozen=True)
class Patch:
    """One attribute replacement.

    :param group: the patch group it belongs to (``attention``, ``conv1d``, ``compat``, ...).
    :param owner: the class or module whose attribute is replaced.
    :param attribute: the attribute name.
    :param make: builds the replacement from the original: the owner's own attribute, else
        the inherited one (``REPLACE``), or ``None`` (``ADD``). The result goes through
        :func:`wrap`; factories need not copy names or set ``__wrapped__`` themselves.
    :param description: one line for reports.
    :param kind: :data:`REPLACE` (the attribute must exist) or :data:`ADD` (it must not).
    """

    group: str
    owner: Any
    attribute: str
    make: Callable[[Any], Any]
    description: str = ""
    kind: str = REPLACE

    def problem(self) -> Optional[str]:
        """Why this patch does not fit the installed code (``None``: it fits)."""
        exists = _defined(self.owner, self.attribute)
        if self.kind == REPLACE and not exists:
            return (f"{self.target} does not exist in the installed version (renamed or removed "
                    f"upstream?); nothing to replace")
        if self.kind == ADD and exists:
            return f"{self.target} already exists; whisper_accel only adds it where it is missing"
        if self.kind not in (REPLACE, ADD):
            return f"{self.target}: unknown patch kind {self.kind!r}"
        return None

    @property
    def target(self) -> str:
        name = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", "?")
        module = getattr(self.owner, "__module__", None)
        if isinstance(self.owner, type) and module:
            name = f"{module}.{name}"
        return f"{name}.{self.attribute}"


def _defined(owner: Any, attribute: str) -> bool:
    """``owner`` defines ``attribute``: for a class, itself or a base class (not its metaclass:
    every class "has" ``__call__`` through ``type``); for anything else, ``hasattr``."""
    if isinstance(owner, type):
        return any(attribute in vars(k) for k in owner.__mro__)
    return hasattr(owner, attribute)


@dataclass
class _Record:
    patch: Patch
    original: Any  # MISSING when the attribute did not exist on the owner itself
    replacement: Any


@dataclass
class Patcher:
    """Holds the applied patches. Use one instance per process (``whisper_accel._api`` keeps it)."""

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
                    replacement = wrap(p.make(base), base)
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


def _set(obj: Any, name: str, value: Any) -> None:
    try:
        setattr(obj, name, value)
    except (AttributeError, TypeError):  # builtins, slots: leave as is
        pass


_NAMES = ("__module__", "__name__", "__qualname__", "__doc__")


def wrap(replacement: Any, original: Any) -> Any:
    """The one wrapper convention: ``replacement`` takes ``original``'s module, name, qualname
    and doc (functions only), ``__wrapped__ = original`` (so ``inspect.signature`` and
    unwrapping reach the stock object) and the whisper_accel mark. ``original`` is ``None`` for
    an added attribute. Returns ``replacement``.

    A ``staticmethod`` / ``classmethod`` replacement keeps the convention on the function it
    holds (``__wrapped__`` = the original's function; a descriptor's own ``__wrapped__`` is its
    ``__func__`` and cannot be set)."""
    if isinstance(replacement, (staticmethod, classmethod)):
        wrap(replacement.__func__, getattr(original, "__func__", original))
        return replacement
    if original is not None:
        if callable(replacement) and hasattr(replacement, "__code__"):
            for name in _NAMES:
                if hasattr(original, name):
                    _set(replacement, name, getattr(original, name))
        _set(replacement, "__wrapped__", original)
    _set(replacement, MARKER, True)
    return replacement


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


