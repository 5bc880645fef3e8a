"""Wake waiters when something they may be waiting for changed (an advert arrived, a reputation moved)."""

from __future__ import annotations

from collections.abc import Callable

import trio

__all__ = ["Changes"]


class Changes:
    """Every :meth:`notify` wakes every :meth:`wait_for` to re-check its predicate."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checking after every :meth:`notify` (put a timeout around it)."""
        while not predicate():
            await self._changed.wait()
