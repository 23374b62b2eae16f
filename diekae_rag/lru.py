"""A small thread-safe least-recently-used map, for results kept per question or per passage."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, TypeVar

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
        self.put_many([(key, value)])
        return value

    def get_many(self, keys: Iterable[Hashable]) -> dict:
        """The kept values of those ``keys`` that are kept (each marked as just used)."""
        with self._lock:
            found = {key: self._data[key] for key in keys if key in self._data}
            for key in found:
                self._data.move_to_end(key)
        return found

    def put_many(self, items: Iterable[tuple[Hashable, V]]) -> None:
        """Keep each ``(key, value)``, dropping the least recently used beyond ``max_items``."""
        with self._lock:
            for key, value in items:
                self._data[key] = value
                self._data.move_to_end(key)
            while len(self._data) > self.max_items:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def drop(self, which: Callable[[Hashable], bool]) -> None:
        """Forget the keys for which ``which(key)`` holds."""
        with self._lock:
            for key in [k for k in self._data if which(k)]:
                del self._data[key]

    def clear(self) -> None:
        self.drop(lambda key: True)
