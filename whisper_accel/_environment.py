"""What stack is installed, on which backend, and which kernels it really has.

Versions come from ``importlib.metadata`` (MindNLP 0.5.1's ``__version__`` says ``0.5.0rc2``).
Kernels are found by probing -- running a tiny input through them -- not by version numbers:
MindSpore 2.7 ships ``Conv1DExt`` and ``FlashAttentionScore`` for Ascend only.
Nothing here imports MindSpore until a function that needs it is called.

Each patch group declares its :class:`Gates` as data (backends, version specifiers, probes);
:func:`check_gates` is the one place they are checked.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

#: The stack whisper_accel is tested on (see constraints.txt). Outside it: warn, stay stock.
SUPPORTED: Dict[str, SpecifierSet] = {
    "mindspore": SpecifierSet(">=2.5,<2.8"),
    "mindnlp": SpecifierSet(">=0.5,<0.6"),
    "transformers": SpecifierSet(">=4.56,<4.58"),
}

#: A version inside each range (stands in for a package whose metadata could not be read, so
#: that package is reported once, as unreadable, not also as missing).
SUPPORTED_EXAMPLE = {"mindspore": "2.7.0", "mindnlp": "0.5.1", "transformers": "4.57.0"}

#: Package name on PyPI -> distribution names to try (first found wins).
_DISTRIBUTIONS = {"mindspore": ("mindspore",), "mindnlp": ("mindnlp",), "transformers": ("transformers",)}

_MINDNLP_04 = (
    "MindNLP {version} (0.4.x) is installed: it cannot import on any MindSpore that PyPI offers "
    "(2.7+ removed mindspore.common._stub_tensor) and whisper_accel does not patch it. Install "
    "the tested stack: pip install -c constraints.txt 'mindspore==2.7.0' 'mindnlp==0.5.1'."
)
_FIX = "Install the tested stack: pip install -c constraints.txt whisper_accel (see README)."


def installed_version(package: str) -> Optional[str]:
    """The installed version of ``package`` from its distribution metadata, or ``None``."""
    for dist in _DISTRIBUTIONS.get(package, (package,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class Environment:
    """A snapshot of the stack. ``problems`` lists why it cannot be patched (empty: supported)."""

    versions: Dict[str, Optional[str]]
    backend: Optional[str] = None
    problems: List[str] = field(default_factory=list)

    @property
    def supported(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"versions": dict(self.versions), "backend": self.backend,
                "supported": self.supported, "problems": list(self.problems)}


def check_versions(versions: Dict[str, Optional[str]]) -> List[str]:
    """Reasons the given versions are outside :data:`SUPPORTED` (empty when all fit)."""
    problems = []
    for package, spec in SUPPORTED.items():
        found = versions.get(package)
        if found is None:
            problems.append(f"{package} is not installed. {_FIX}")
            continue
        try:
            version = Version(found)
        except InvalidVersion:
            problems.append(f"{package} has an unreadable version {found!r}. {_FIX}")
            continue
        if package == "mindnlp" and version.release[:2] == (0, 4):
            problems.append(_MINDNLP_04.format(version=found))
        elif not spec.contains(version, prereleases=True):
            problems.append(f"{package} {found} is outside the tested range {spec}. {_FIX}")
    return problems


def detect(versions: Optional[Dict[str, Optional[str]]] = None) -> Environment:
    """Read versions, check them, and (only when supported) ask MindSpore for the backend."""
    unreadable = []
    if versions is None:
        versions = {}
        for package in SUPPORTED:
            try:
                versions[package] = installed_version(package)
            except Exception as exc:  # corrupt metadata must not break the caller's import
                versions[package] = None
                unreadable.append((package, f"could not read the installed version of "
                                            f"{package}: {exc!r}. {_FIX}"))
    bad = {package for package, _ in unreadable}
    problems = [why for _, why in unreadable] + check_versions(
        {p: (v if p not in bad else SUPPORTED_EXAMPLE[p]) for p, v in versions.items()})
    env = Environment(versions=dict(versions), problems=problems)
    if env.supported:
        try:
            env.backend = device_target()
        except Exception as exc:  # a broken MindSpore install must not break the caller
            env.problems.append(f"MindSpore could not report its backend: {exc!r}")
    return env


def device_target() -> str:
    """``CPU``, ``GPU`` or ``Ascend``: where MindSpore runs operators in this process."""
    import mindspore

    return str(mindspore.get_context("device_target"))


_CONV1D_PROBE = """
import sys, numpy as np, mindspore
from mindspore import Tensor, mint
mindspore.set_context(device_target=sys.argv[1])
out = mint.nn.functional.conv1d(Tensor(np.ones((1, 1, 4), np.float32)), Tensor(np.ones((1, 1, 2), np.float32)))
sys.exit(0 if tuple(out.shape) == (1, 1, 3) and float(out.asnumpy()[0, 0, 0]) == 2.0 else 1)
"""


@functools.lru_cache(maxsize=None)
def has_native_conv1d() -> bool:
    """Probe: does this backend run MindSpore's native conv1d (``mint.nn.functional.conv1d``,
    the ``Conv1DExt`` kernel)? Cached per process.

    The probe launches the kernel in a short-lived child process: in PyNative a failed launch
    is reported asynchronously, and in this process it could surface in whatever thread runs
    the next operator (seen: a user's inference thread failing with "Not found op Conv1DExt").
    """
    import subprocess
    import sys

    env = dict(os.environ, GLOG_v="3")
    env.pop("WHISPER_ACCEL", None)
    try:
        proc = subprocess.run([sys.executable, "-c", _CONV1D_PROBE, device_target()], env=env,
                              capture_output=True, timeout=120)
        return proc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def has_fused_attention() -> bool:
    """Probe: does this backend run the fused ``FlashAttentionScore`` kernel? Cached."""
    from .kernels.attention import fused_available

    return fused_available()


#: Probe name -> (function, what a failed probe means). Groups name probes in their gates.
PROBES: Dict[str, Tuple[Callable[[], bool], str]] = {
    "native_conv1d": (has_native_conv1d, "no native conv1d kernel (MindSpore's Conv1DExt, an "
                      "Ascend kernel in MindSpore 2.7)"),
    "fused_flash_attention": (has_fused_attention, "no fused FlashAttentionScore kernel (Ascend)"),
}


def capabilities() -> Dict[str, bool]:
    return {name: probe() for name, (probe, _) in PROBES.items()}


@dataclass(frozen=True)
class Gates:
    """Where a patch group may apply, as data.

    :param backends: MindSpore device targets it is validated on (empty: every backend).
    :param versions: ``(package, specifier)`` pairs narrowing :data:`SUPPORTED` for this group.
    :param probes: names in :data:`PROBES` that must succeed.
    """

    backends: Tuple[str, ...] = ()
    versions: Tuple[Tuple[str, str], ...] = ()
    probes: Tuple[str, ...] = ()


def check_gates(gates: Gates, env: Environment) -> Optional[str]:
    """Why a group with ``gates`` cannot apply in ``env`` (``None``: it can). Probes run last,
    and only when the cheaper gates pass."""
    if gates.backends and env.backend not in gates.backends:
        return f"validated on {', '.join(gates.backends)} only, not {env.backend}"
    for package, spec in gates.versions:
        found = env.versions.get(package)
        try:
            ok = found is not None and SpecifierSet(spec).contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            return f"needs {package} {spec}, found {found or 'none'}"
    for name in gates.probes:
        probe, missing = PROBES[name]
        if not probe():
            return f"probe {name!r} failed on {env.backend or 'this backend'}: {missing}"
    return None
