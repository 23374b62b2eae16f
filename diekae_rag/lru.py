"""A small thread-safe least-recently-used map, for results kept per question or per passage."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

V = TypeVar("V")


class LRU:
    """Keeps the last ``max_items`` results; a missing one is computed outside the lock."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: Hashable, make: Callable[[], V], reuse: bool = True) -> V:
        """The kept value of ``key`` (unless ``reuse`` is False), else ``make()``, which is then kept."""
        with self._lock:
            if reuse and key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_items:
                self._data.popitem(last=False)
        return value

    def drop(self, which: Callable[[Hashable], bool]) -> None:
        """Forget the keys for which ``which(key)`` holds."""
        with self._lock:
            for key in [k for k in self._data if which(k)]:
                del self._data[key]

    def clear(self) -> None:
        self.drop(lambda key: True)
