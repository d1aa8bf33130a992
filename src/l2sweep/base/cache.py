"""The one per-process cache: what a sweep's jobs in one process reuse (engine, batches, data)."""

from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")


class ProcessCache:
    """One value per kind, kept between jobs: a new key for a kind replaces its old value.

    Example:
        >>> engine = CACHE.get("engine", (k, shapes), lambda: build_engine(k, shapes))
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Hashable, Any]] = {}

    def get(self, kind: str, key: Hashable, make: Callable[[], T]) -> T:
        """The value of ``kind`` for ``key``: the kept one, or ``make()``'s (then kept)."""
        entry = self._entries.get(kind)
        if entry is None or entry[0] != key:
            self._entries.pop(kind, None)  # freed before the new one is made
            entry = self._entries[kind] = (key, make())
        return entry[1]

    def clear(self) -> None:
        """Forgets every kept value."""
        self._entries.clear()


CACHE = ProcessCache()
