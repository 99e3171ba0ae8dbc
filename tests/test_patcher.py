"""The patch ledger on plain Python objects: no MindSpore needed."""

import threading

import pytest

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


def test_concurrent_apply_undo_ends_consistent():
    original = vars(Owner)["method"]
    p = Patcher()
    errors = []

    def worker(i):
        try:
            for _ in range(200):
                with p.lock:
                    if p.applied():
                        p.undo()
                    else:
                        p.apply([Patch("g", Owner, "method", wrap)])
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    p.undo()
    assert vars(Owner)["method"] is original
