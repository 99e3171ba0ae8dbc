"""Probe results kept on disk, one small JSON file per machine and stack.

A probe (does this backend run kernel X?) costs up to seconds -- the conv1d probe starts a
child Python that imports MindSpore -- and its answer only changes when the stack does. The
caller (:mod:`whisper_accel._environment`) describes the stack as a *key* (a JSON-able dict:
versions, backend, device, machine, probe-code version); this module stores ``{probe name:
bool}`` under that key, in ``probes-<hash of key>.json``, and gives it back only to a caller
presenting an equal key. A changed key finds another file (or none): the probes run again.
The executor choice (:mod:`whisper_accel.runtime.choice`) keeps its timing verdicts the same
way, as entries of kind ``verdicts`` (``verdicts-<hash of key>.json``).

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
from typing import Any, Dict, Optional

from . import config

ENV_DIR = config.ENV["cache_dir"]
ENV_SWITCH = config.ENV["probe_cache"]
#: Layout of the file itself (not of the key): bump when the JSON written here changes shape.
FORMAT = 1


def enabled() -> bool:
    """Whether the disk cache is used (:attr:`whisper_accel.config.Config.probe_cache`:
    ``WHISPER_ACCEL_PROBE_CACHE`` is not ``0``/``off``)."""
    return config.current().probe_cache


def directory() -> Path:
    """Where cache files live (not created until a result is stored):
    :func:`whisper_accel.config.cache_directory`."""
    return Path(config.cache_directory())


def path_for(key: Dict, kind: str = "probes", where: Optional[Path] = None) -> Path:
    """The file holding ``kind`` results ("probes", "verdicts") for ``key``, in ``where``
    (default: :func:`directory`)."""
    import hashlib  # here, not at import: the WHISPER_ACCEL hook imports this module

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (directory() if where is None else Path(where)) / f"{kind}-{digest}.json"


def load_entries(key: Dict, kind: str = "probes", where: Optional[Path] = None) -> Dict[str, Any]:
    """Every entry stored for ``key`` under ``kind`` (empty: none, cache off, or the file is
    unusable). ``where``: a directory the caller chose (its config decides whether the cache is
    on), else :func:`directory` when :func:`enabled`."""
    if where is None and not enabled():
        return {}
    try:
        with open(path_for(key, kind, where), encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            return {}
        results = data.get("results")
        return dict(results) if isinstance(results, dict) else {}
    except Exception:  # noqa: BLE001  missing, unreadable, corrupt: as if empty
        return {}


def store_entries(key: Dict, results: Dict[str, Any], kind: str = "probes", where: Optional[Path] = None) -> bool:
    """Add ``results`` (JSON values) to those stored for ``key`` under ``kind`` (atomically), in
    ``where`` as for :func:`load_entries`. Returns whether it was written; never raises."""
    if where is None and not enabled():
        return False
    import tempfile

    tmp = None
    try:
        target = path_for(key, kind, where)
        target.parent.mkdir(parents=True, exist_ok=True)
        merged = {**load_entries(key, kind, where), **results}
        payload = {"format": FORMAT, "key": key, "results": merged,
                   "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{kind}-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, target)
        tmp = None
        return True
    except Exception:  # noqa: BLE001  read-only home, full disk, ...: measure again next time
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load(key: Dict) -> Dict[str, bool]:
    """The probe verdicts stored for ``key`` (empty: none, cache off, or the file is unusable)."""
    return {name: value for name, value in load_entries(key).items() if isinstance(value, bool)}


def store(key: Dict, results: Dict[str, bool]) -> bool:
    """Add probe verdicts ``results`` to those stored for ``key`` (atomically). Returns whether
    it was written; never raises."""
    return store_entries(key, {name: bool(value) for name, value in results.items()})
