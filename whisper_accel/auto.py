"""Activation from the environment, with no change to the user's script.

``whisper_accel.pth`` (installed at the top of site-packages) runs one line at interpreter
start: when ``WHISPER_ACCEL`` is set to something other than ``0``/``false``/``off``/empty it
calls :func:`install`, which registers a wrapt post-import hook on transformers' Whisper module.
The patch is applied the moment that module is imported -- whatever imported it, in whatever
order -- or at once if it already is. Unset, nothing is imported at start-up.

``WHISPER_ACCEL``: ``1``/``true``/``yes``/``on``/``all`` (every group) or a comma list of groups
(``attention,conv1d``). ``WHISPER_ACCEL_STRICT=1`` raises instead of warning.
``WHISPER_ACCEL_STATS=1`` prints, at exit, how many calls of each patched entry point took the
fast path or ran stock code and why (to stderr; a path instead of ``1`` receives them as JSON).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional

ENV = "WHISPER_ACCEL"
ENV_STRICT = "WHISPER_ACCEL_STRICT"
ENV_STATS = "WHISPER_ACCEL_STATS"
WHISPER_MODULE = "transformers.models.whisper.modeling_whisper"
_ON = {"1", "true", "yes", "on", "all"}
_OFF = {"", "0", "false", "no", "off"}

_installed = False


def parse(value: Optional[str]) -> Optional[Dict[str, bool]]:
    """``None`` when activation is off, else the ``patch()`` group arguments.

    :raises ValueError: naming the valid values, for anything else.
    """
    from .groups import ALIASES
    from .groups import NAMES as GROUPS

    text = (value or "").strip().lower()
    if text in _OFF:
        return None
    if text in _ON:
        return {}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS and n not in ALIASES]
    if unknown or not names:
        raise ValueError(
            f"{ENV}={value!r} is not understood ({', '.join(unknown) or 'empty list'}); use "
            f"1/true/all, 0/false/off, or a comma list of groups from: {', '.join(GROUPS)}"
            f" (old names: {', '.join(ALIASES)})")
    wanted = {real for n in names for real in ALIASES.get(n, (n,))}
    return {g: g in wanted for g in GROUPS}


def strict_from_env() -> bool:
    return os.environ.get(ENV_STRICT, "").strip().lower() in _ON


def install() -> bool:
    """Register the post-import hook per ``WHISPER_ACCEL``. Returns whether one was registered.

    Never raises unless ``WHISPER_ACCEL_STRICT`` is set: the user's program must start. Strict
    with a bad value stops the interpreter with the message (``site`` would swallow an ordinary
    exception raised from a ``.pth`` line)."""
    global _installed
    strict = strict_from_env()
    try:
        groups = parse(os.environ.get(ENV))
    except ValueError as exc:
        if strict:
            raise SystemExit(f"whisper_accel: {exc}") from None
        from ._errors import WhisperAccelWarning

        warnings.warn(f"{exc}. whisper_accel stays off.", WhisperAccelWarning, stacklevel=2)
        return False
    if groups is None or _installed:
        return False
    try:
        import wrapt
    except Exception as exc:  # noqa: BLE001  a broken install must not stop the user's program
        return _fault(f"whisper_accel could not register its import hook: {exc!r}; Whisper stays "
                      "stock", strict, exc)

    def on_import(module):
        # Runs inside the user's own `import transformers...`: nothing may escape it unless strict.
        try:
            from . import _api

            if not _api.is_patched():
                _api.patch(strict=strict, **groups)
        except Exception as exc:  # noqa: BLE001
            if strict:
                raise
            _fault(f"whisper_accel left Whisper stock after an internal error: {exc!r}", False, exc)

    wrapt.register_post_import_hook(on_import, WHISPER_MODULE)
    stats = os.environ.get(ENV_STATS, "").strip()
    if stats and stats.lower() not in _OFF:
        import atexit

        from .runtime import calls

        atexit.register(calls.report_at_exit, stats)
    _installed = True
    return True


def _fault(message: str, strict: bool, exc: BaseException) -> bool:
    if strict:
        raise SystemExit(f"whisper_accel: {message}") from exc
    warnings.warn(message, UserWarning, stacklevel=3)
    return False
