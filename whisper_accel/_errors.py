"""Exceptions and warnings raised by whisper_accel."""


class WhisperAccelWarning(UserWarning):
    """Something could not be patched; stock code keeps running."""


class WhisperAccelError(RuntimeError):
    """Raised instead of a warning in strict mode, or on bad input."""


class Unsupported(WhisperAccelError):
    """A patch group cannot apply on this stack/backend; the message says why."""
