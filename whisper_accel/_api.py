"""``patch()`` / ``unpatch()`` and the report they return.

Data flows one way: detect the environment -> ask each requested group's builder for its
patches (or the reason it cannot apply) -> hand them all to the :class:`Patcher`, which applies
all or none. One lock (the patcher's) covers the whole sequence, so concurrent callers see one
consistent state and the last call wins.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from . import _environment, _errors
from . import config as _config
from ._errors import Unsupported
from ._patcher import Patch, Patcher
from .groups import ALIASES, NAMES, load
from .runtime import calls

_PATCHER = Patcher()
_last_report: Optional["Report"] = None
_request: Optional[Tuple[Dict[str, bool], "_config.Config"]] = None  # the caller's groups and config of the patch now applied


@dataclass
class Entry:
    group: str
    target: str
    status: str  # "applied" | "skipped"
    reason: str = ""


@dataclass
class Report:
    """What ``patch()`` did: one entry per patch applied and per group skipped, with reasons."""

    entries: List[Entry] = field(default_factory=list)
    environment: Dict = field(default_factory=dict)
    #: the runtime settings in force (:class:`whisper_accel.config.Config` as a dict)
    config: Dict = field(default_factory=dict)

    @property
    def applied(self) -> List[Entry]:
        return [e for e in self.entries if e.status == "applied"]

    @property
    def skipped(self) -> List[Entry]:
        return [e for e in self.entries if e.status == "skipped"]

    @property
    def groups_applied(self) -> List[str]:
        return sorted({e.group for e in self.applied})

    def as_dict(self) -> Dict:
        return {"environment": self.environment, "config": dict(self.config),
                "entries": [e.__dict__.copy() for e in self.entries]}

    def __str__(self) -> str:
        lines = [f"whisper_accel: {len(self.applied)} patch(es) applied, "
                 f"{len(self.skipped)} skipped"]
        for e in self.entries:
            mark = "+" if e.status == "applied" else "-"
            tail = f"  ({e.reason})" if e.reason else ""
            lines.append(f"  {mark} [{e.group}] {e.target}{tail}")
        return "\n".join(lines)


def expand_aliases(groups: Dict[str, bool]) -> Dict[str, bool]:
    """Group arguments with old names replaced by the groups they stand for (``compiled`` ->
    ``encoder`` and ``decoder``; a name given explicitly wins over an alias)."""
    out = {}
    for name, value in groups.items():
        for real in ALIASES.get(name, (name,)):
            out.setdefault(real, value)
    for name, value in groups.items():
        if name not in ALIASES:
            out[name] = value
    return out


def _requested(groups: Dict[str, bool]) -> List[str]:
    unknown = sorted(set(groups) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown patch group(s) {unknown}; valid: {list(NAMES)}")
    return [name for name in NAMES if groups.get(name, True)]


def group_patches(name: str, env: _environment.Environment) -> List[Patch]:
    """Group ``name``'s patches for ``env``: import its module, check its gates, build, and
    check each patch fits the installed code. Raises :class:`Unsupported` with the reason;
    any other exception is a fault of the plugin (the caller reports it)."""
    module = load(name)
    reason = _environment.check_gates(module.GATES, env)
    if reason:
        raise Unsupported(reason)
    patches = module.patches(env)
    for p in patches:
        why = p.problem()
        if why:
            raise Unsupported(why)
    return patches


def _stock_report(env: Dict, groups: Iterable[str], reason: str) -> "Report":
    return Report(environment=env, entries=[Entry(g, "*", "skipped", reason) for g in groups])


def patch(*, strict: bool = False, config: Optional[_config.Config] = None, **groups: bool) -> Report:
    """Patch MindNLP's Whisper in this process. Idempotent, thread-safe, all or nothing.

    Never raises for a problem of the stack or of the plugin itself unless ``strict``: an
    unsupported stack, a group whose gates fail, and any exception while a group module is
    imported or builds its patches each become one :class:`WhisperAccelWarning`, and the
    groups concerned stay stock.

    :param strict: raise :class:`WhisperAccelError` instead of warning when the stack is
        unsupported, a group named ``=True`` by the caller cannot apply, a group fails, or
        patching fails; also makes faults met later at run time raise. (A group enabled only by
        default that has no kernel here -- ``conv1d`` on CPU -- is reported as skipped.)
    :param config: the runtime settings (:class:`whisper_accel.config.Config`: executors,
        kernels, grouping, caches); default: the ``WHISPER_ACCEL_*`` environment variables.
        In force until :func:`unpatch`; models bound before keep their engines until rebuilt.
    :param groups: ``attention=``, ``conv1d=``, ... ``False`` leaves that group stock (the
        old name ``compiled`` stands for ``encoder`` and ``decoder``).
    :returns: a :class:`Report` of each patch applied and each group skipped, with reasons.
    """
    global _last_report, _request
    said = dict(groups)
    groups = expand_aliases(groups)
    wanted = _requested(groups)
    if config is not None and not isinstance(config, _config.Config):
        raise TypeError(f"config must be a whisper_accel.Config, not {type(config).__name__}")
    with _PATCHER.lock:
        if _PATCHER.applied():
            _errors.problem("whisper_accel is already patched; call unpatch() first to change "
                            "groups (nothing was wrapped twice)", strict)
            return _last_report or Report()
        _errors.set_strict(strict)
        if config is None:
            try:
                config = _config.Config.from_env()
            except ValueError as exc:
                _errors.problem(f"whisper_accel ignored an invalid setting and uses the defaults: {exc}", strict, exc)
                config = _config.Config.defaults()
        try:
            env = _environment.detect()
        except Exception as exc:  # noqa: BLE001  a fault of ours must not break the caller
            _errors.problem(f"whisper_accel left Whisper stock: detecting the stack failed: {exc!r}",
                            strict, exc)
            _last_report = _stock_report({}, wanted, f"detection failed: {exc!r}")
            return _last_report
        report = Report(environment=env.as_dict())
        if env.supported and _environment.compile_cache_on():  # a setting, not a failure: never raises
            _errors.problem(f"whisper_accel: {_environment.COMPILE_CACHE}", strict=False)
        if not env.supported:
            for reason in env.problems:
                _errors.problem(f"whisper_accel left Whisper stock: {reason}", strict)
            _last_report = _stock_report(env.as_dict(), wanted, "; ".join(env.problems))
            return _last_report
        patches: List[Patch] = []
        for name in NAMES:
            if name not in wanted:
                report.entries.append(Entry(name, "*", "skipped", "disabled by caller"))
                continue
            try:
                patches.extend(group_patches(name, env))
            except Unsupported as exc:
                report.entries.append(Entry(name, "*", "skipped", str(exc)))
                if groups.get(name):  # asked for by name: the caller wants to know
                    _errors.problem(f"whisper_accel could not apply {name!r}: {exc}", strict, exc)
            except Exception as exc:  # noqa: BLE001  import/builder fault: this group stays stock
                report.entries.append(Entry(name, "*", "skipped", f"internal error: {exc!r}"))
                _errors.problem(f"whisper_accel left group {name!r} stock after an internal "
                                f"error: {exc!r}", strict, exc)
        try:
            applied = _PATCHER.apply(patches)
        except Exception as exc:
            _last_report = Report(environment=env.as_dict(), entries=[
                Entry(p.group, p.target, "skipped", f"rolled back: {exc!r}") for p in patches])
            _errors.problem(f"whisper_accel could not patch and restored stock Whisper: {exc!r}",
                            strict, exc)
            return _last_report
        report.entries[:0] = [Entry(p.group, p.target, "applied", p.description) for p in applied]
        report.config = config.as_dict()
        _last_report = report
        _request = (said, config) if applied else None  # the groups as the caller said them
        if applied:
            _config.activate(config)
        return report


def requested() -> Optional[Dict[str, bool]]:
    """The group arguments of the patch applied now (``None`` when unpatched): what a caller
    that unpatches temporarily (the bench) passes to ``patch()`` to restore the same state."""
    with _PATCHER.lock:
        return dict(_request[0]) if _request is not None and _PATCHER.applied() else None


def requested_config() -> Optional[_config.Config]:
    """The config of the patch applied now (``None`` when unpatched)."""
    with _PATCHER.lock:
        return _request[1] if _request is not None and _PATCHER.applied() else None


def unpatch() -> List[str]:
    """Restore every original object. Returns the targets restored (empty if none)."""
    global _request
    with _PATCHER.lock:
        _request = None
        _config.activate(None)
        return [p.target for p in _PATCHER.undo()]


def is_patched() -> bool:
    return bool(_PATCHER.applied())


def status() -> Dict:
    """What is patched now, the last report (with skip reasons), the environment, the config in
    force, ``calls``: per patched entry point, how many calls took the fast path and how many
    ran stock code, and why (``{"greedy loop": {"fast": 3, "stock": 1, "reasons":
    {"do_sample=True: ...": 1}}}``), ``engines``: each model's engines (executor order, faults,
    what ran, the measured choice), and ``kernels``: the fused kernel build (None before use)."""
    with _PATCHER.lock:
        env = _last_report.environment if _last_report else _environment.detect().as_dict()
        out = {
            "patched": is_patched(),
            "applied": [f"[{p.group}] {p.target}" for p in _PATCHER.applied()],
            "last_report": _last_report.as_dict() if _last_report else None,
            "environment": env,
            "config": _config.current().as_dict(),
            "calls": calls.snapshot(),
        }
    # The runtime is imported only once a model ran patched (status() stays light before).
    import sys

    binding = sys.modules.get("whisper_accel.runtime.binding")
    native = sys.modules.get("whisper_accel.runtime.native")
    out["engines"] = binding.engines_report() if binding is not None else []
    out["kernels"] = native.state() if native is not None else None
    return out


@contextlib.contextmanager
def patched(*, strict: bool = False, config: Optional[_config.Config] = None, **groups: bool) -> Iterator[Report]:
    """Patch for the duration of a ``with`` block; restores the prior state, even on errors.

    If whisper_accel was already patched on entry, the block runs patched and stays so."""
    with _PATCHER.lock:
        was = is_patched()
        report = _last_report if was else patch(strict=strict, config=config, **groups)
    try:
        yield report
    finally:
        if not was:
            unpatch()


def originals() -> Iterable:
    """``(owner, attribute, original)`` for every applied patch (for tests and doctor)."""
    return _PATCHER.originals()
