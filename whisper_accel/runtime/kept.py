"""Values computed once per distinct key and then read back: results of stock's own tensor
expressions on small inputs (a segment's times, a window's time offset), which the host
bookkeeping cannot recompute in numpy bit for bit and which repeat from window to window."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional


class Kept:
    """A dict of computed values, cleared whole when it reaches ``limit`` entries (inputs that
    never repeat cannot grow it without bound). Reads and writes are single dict operations;
    threads that race compute the same value twice."""

    def __init__(self, limit: int):
        self._values: dict = {}
        self._limit = limit

    def peek(self, key: Hashable) -> Optional[Any]:
        """The kept value, or None."""
        return self._values.get(key)

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per distinct ``key``, then the kept value."""
        hit = self._values.get(key)
        if hit is None:
            if len(self._values) >= self._limit:
                self._values.clear()
            hit = self._values[key] = compute()
        return hit

    def clear(self) -> None:
        self._values.clear()
