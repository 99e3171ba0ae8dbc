"""Probe results kept on disk, one small JSON file per machine and stack.

A probe (does this backend run kernel X?) costs up to seconds -- the conv1d probe starts a
child Python that imports MindSpore -- and its answer only changes when the stack does. The
caller (:mod:`whisper_accel._environment`) describes the stack as a *key* (a JSON-able dict:
versions, backend, device, machine, probe-code version); this module stores ``{probe name:
bool}`` under that key, in ``probes-<hash of key>.json``, and gives it back only to a caller
presenting an equal key. A changed key finds another file (or none): the probes run again.

* Directory: ``$WHISPER_ACCEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/whisper_accel``, else
  ``~/.cache/whisper_accel``. ``WHISPER_ACCEL_PROBE_CACHE=0`` turns the disk cache off.
* Concurrent processes: a writer writes a temporary file in the same directory and renames it
  over the old one (``os.replace``, atomic on POSIX and Windows), so a reader sees a whole old
  file or a whole new one. Two writers racing on the same key can drop one's extra result; the
  next process then probes it again. No lock is needed for correctness.
* Never raises: an unreadable, corrupt, foreign or unwritable cache reads as empty and is
  rewritten when possible; the caller then probes as if there were no cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict

ENV_DIR = "WHISPER_ACCEL_CACHE_DIR"
ENV_SWITCH = "WHISPER_ACCEL_PROBE_CACHE"
_OFF = {"0", "false", "no", "off"}
#: Layout of the file itself (not of the key): bump when the JSON written here changes shape.
FORMAT = 1


def enabled() -> bool:
    """Whether the disk cache is used (``WHISPER_ACCEL_PROBE_CACHE`` is not ``0``/``off``)."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in _OFF


def directory() -> Path:
    """Where cache files live (not created until a result is stored)."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "whisper_accel"


def path_for(key: Dict) -> Path:
    """The file holding results for ``key``."""
    import hashlib  # here, not at import: the WHISPER_ACCEL hook imports this module

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return directory() / f"probes-{digest}.json"


def load(key: Dict) -> Dict[str, bool]:
    """The results stored for ``key`` (empty: none, cache off, or the file is unusable)."""
    if not enabled():
        return {}
    try:
        with open(path_for(key), encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            return {}
        results = data.get("results")
        if not isinstance(results, dict):
            return {}
        return {name: value for name, value in results.items() if isinstance(value, bool)}
    except Exception:  # noqa: BLE001  missing, unreadable, corrupt: as if empty
        return {}


def store(key: Dict, results: Dict[str, bool]) -> bool:
    """Add ``results`` to those stored for ``key`` (atomically). Returns whether it was written;
    never raises."""
    if not enabled():
        return False
    import tempfile

    tmp = None
    try:
        target = path_for(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        merged = {**load(key), **{name: bool(value) for name, value in results.items()}}
        payload = {"format": FORMAT, "key": key, "results": merged,
                   "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".probes-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, target)
        tmp = None
        return True
    except Exception:  # noqa: BLE001  read-only home, full disk, ...: probe again next time
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
