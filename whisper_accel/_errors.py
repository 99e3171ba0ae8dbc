"""Exceptions and warnings raised by whisper_accel, and the one policy for problems.

Every problem the plugin meets -- an unsupported stack, a group that cannot apply, an exception
inside the plugin at import or at run time -- goes through :func:`problem`: one
:class:`WhisperAccelWarning` per distinct message per process (Whisper keeps running stock
code), or :class:`WhisperAccelError` in strict mode. The strict flag is per process, set by the
last ``patch()`` (``patch(strict=True)`` / ``WHISPER_ACCEL_STRICT=1``), so faults met later at
run time follow what the caller asked for.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional


class WhisperAccelWarning(UserWarning):
    """Something could not be patched; stock code keeps running."""


class WhisperAccelError(RuntimeError):
    """Raised instead of a warning in strict mode, or on bad input."""


class Unsupported(WhisperAccelError):
    """A patch group cannot apply on this stack/backend; the message says why."""


_lock = threading.Lock()
_warned: set = set()
_strict = False


def set_strict(strict: bool) -> None:
    """Whether run-time faults raise (strict) or warn; ``patch()`` sets it."""
    global _strict
    _strict = bool(strict)


def problem(message: str, strict: Optional[bool] = None, cause: Optional[BaseException] = None,
            stacklevel: int = 3) -> None:
    """Report ``message``: raise :class:`WhisperAccelError` when ``strict`` (default: the process
    setting), else warn -- once per distinct message in this process."""
    if _strict if strict is None else strict:
        raise WhisperAccelError(message) from cause
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, WhisperAccelWarning, stacklevel=stacklevel)


def forget_warnings() -> None:
    """Warn again for problems already reported (tests, and a fresh ``patch()`` after changes)."""
    with _lock:
        _warned.clear()
