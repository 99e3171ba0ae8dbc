"""The patch ledger on plain Python objects: no MindSpore needed."""

import threading
import time

import pytest

from conftest import join_all
from whisper_accel._patcher import MARKER, Patch, Patcher, is_ours, wrapper_depth


class Owner:
    def method(self):
        return "stock"

    @staticmethod
    def static():
        return "stock"


def wrap(original):
    def replacement(*args, **kwargs):
        return "patched"

    replacement.__wrapped__ = original
    return replacement


def test_apply_and_undo_restore_the_exact_objects():
    before = vars(Owner)["method"], vars(Owner)["static"]
    p = Patcher()
    p.apply([Patch("g", Owner, "method", wrap), Patch("g", Owner, "static", wrap)])
    assert Owner().method() == "patched"
    assert is_ours(vars(Owner)["method"])
    p.undo()
    assert vars(Owner)["method"] is before[0]
    assert vars(Owner)["static"] is before[1]  # the staticmethod object itself, not its function
    assert Owner().method() == "stock"


def test_originals_come_from_vars_not_getattr():
    class Child(Owner):
        pass

    p = Patcher()
    p.apply([Patch("g", Child, "method", wrap)])
    assert "method" in vars(Child)
    p.undo()
    assert "method" not in vars(Child), "an inherited attribute must be removed, not copied down"
    assert Child().method() == "stock"


def test_failure_half_way_rolls_back_everything():
    before = vars(Owner)["method"]

    def boom(original):
        raise RuntimeError("injected")

    p = Patcher()
    with pytest.raises(RuntimeError, match="injected"):
        p.apply([Patch("g", Owner, "method", wrap), Patch("g", Owner, "static", boom)])
    assert vars(Owner)["method"] is before
    assert p.applied() == []


def test_second_apply_is_refused_and_nothing_is_wrapped_twice():
    p = Patcher()
    p.apply([Patch("g", Owner, "method", wrap)])
    with pytest.raises(RuntimeError, match="already applied"):
        p.apply([Patch("g", Owner, "method", wrap)])
    other = Patcher()
    with pytest.raises(RuntimeError, match="already wrapped"):
        other.apply([Patch("g", Owner, "method", wrap)])
    assert wrapper_depth(vars(Owner)["method"]) == 1
    p.undo()
    assert wrapper_depth(vars(Owner)["method"]) == 0
    assert not hasattr(vars(Owner)["method"], MARKER)


def test_many_cycles_keep_identity_and_depth():
    original = vars(Owner)["method"]
    p = Patcher()
    for _ in range(1000):
        p.apply([Patch("g", Owner, "method", wrap)])
        assert wrapper_depth(vars(Owner)["method"]) == 1
        p.undo()
        assert vars(Owner)["method"] is original


class _NoLock:
    """A lock that does not lock (to show the race check below can fail)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _race(p, threads=8, rounds=60):
    """``threads`` workers apply/undo ``p`` with NO outside lock while a reader calls the method
    and reads the wrapper depth. ``make`` sleeps, so an apply that is not serialised overlaps
    another. Returns ``(violations, errors)``: states no serialised patcher can reach."""
    original = vars(Owner)["method"]
    stop = threading.Event()
    violations, errors, counts = [], [], {"applied": 0, "undone": 0}
    count_lock = threading.Lock()

    def slow_wrap(orig):
        time.sleep(0.0005)  # widen the check-then-set window
        return wrap(orig)

    def worker(i):
        try:
            for j in range(rounds):
                if (i + j) % 2:
                    try:
                        p.apply([Patch("g", Owner, "method", slow_wrap)])
                        with count_lock:
                            counts["applied"] += 1
                    except RuntimeError as exc:
                        if "already" not in str(exc):
                            raise
                else:
                    if p.undo():
                        with count_lock:
                            counts["undone"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    def reader():
        while not stop.is_set():
            try:
                value = Owner().method()
                depth = wrapper_depth(vars(Owner)["method"])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                continue
            if value not in ("stock", "patched") or depth > 1:
                violations.append((value, depth))

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    watcher = threading.Thread(target=reader, daemon=True)
    watcher.start()
    for t in workers:
        t.start()
    join_all(workers, 60)
    stop.set()
    join_all([watcher], 10)
    # every successful apply is matched by one undo that undid something, plus what is applied now
    if counts["applied"] - counts["undone"] != len(p.applied()):
        violations.append(("counts", counts, len(p.applied())))
    p.undo()
    if vars(Owner)["method"] is not original:
        violations.append(("not restored", vars(Owner)["method"]))
        setattr(Owner, "method", original)
    return violations, errors


def test_concurrent_apply_undo_without_an_outside_lock_is_serialised():
    """The patcher's own lock serialises apply/undo: no double wrap, every apply matched by one
    undo, the exact original back at the end (the test holds no lock of its own)."""
    violations, errors = _race(Patcher())
    assert errors == [] and violations == []


def test_the_race_check_catches_an_unlocked_patcher():
    """The same race on a patcher whose lock does nothing: the check above must see it."""
    p = Patcher()
    p._lock = _NoLock()
    violations, errors = _race(p)
    assert violations or errors, "an unlocked patcher passed the race check: it cannot fail"
