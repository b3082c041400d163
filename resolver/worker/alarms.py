"""Many timers on one event-loop timer.

A forwarder sets a timer for every question it sends upstream (hedge after `timeout`, give up at the
deadline) and nearly all of them are overtaken by the reply. A loop timer each costs more than a cache hit
(uvloop: ~2.5 µs to set and cancel); a heap entry costs a push, and an alarm overtaken is skipped when due
rather than cancelled.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable

# A loop timer may fire up to its clock's resolution early: an alarm this close to due is due.
_EARLY = 0.001


class Alarms:
    """Calls `callback(token)` at `when` (loop time); the callback decides whether it still matters."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Callable[[int], None], int]] = []
        self._order = itertools.count()  # ties go in the order set, and callbacks are never compared
        self._armed_for = math.inf
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, callback: Callable[[int], None], token: int) -> None:
        heapq.heappush(self._heap, (when, next(self._order), callback, token))
        if when < self._armed_for:  # most alarms are later than the one armed: no call
            self._arm()

    def _ring(self) -> None:
        self._handle, self._armed_for = None, math.inf
        heap = self._heap
        now = self._loop.time() + _EARLY
        while heap and heap[0][0] <= now:
            _when, _order, callback, token = heapq.heappop(heap)
            callback(token)
        self._arm()

    def _arm(self) -> None:
        """The loop timer set for the earliest alarm. A callback run by `_ring` may have set one already, for
        the later alarm it added: the earlier ones must not wait for it."""
        heap = self._heap
        if heap and heap[0][0] < self._armed_for:
            if self._handle is not None:
                self._handle.cancel()
            self._armed_for = heap[0][0]
            self._handle = self._loop.call_at(self._armed_for, self._ring)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._heap.clear()
