"""whisper_accel: faster Whisper on MindSpore NLP (MindNLP) without changing your script.

.. code-block:: python

    import whisper_accel
    report = whisper_accel.patch()   # before or after the model is built
    print(report)                    # what was patched, what was skipped and why
    whisper_accel.unpatch()          # the exact stock objects again

Importing this package imports neither MindSpore nor MindNLP; ``patch()`` does.
"""

from ._api import Report, is_patched, patch, patched, status, unpatch
from ._errors import Unsupported, WhisperAccelError, WhisperAccelWarning
from .config import Config

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "is_patched", "patched", "status", "Report", "Config",
    "WhisperAccelError", "WhisperAccelWarning", "Unsupported",
]
