"""Many timers on one loop timer (resolver/worker/alarms.py), on a loop whose clock the test moves."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resolver.worker.alarms import Alarms

pytestmark = pytest.mark.unit


class ClockLoop(asyncio.AbstractEventLoop):
    """Just what Alarms uses of a loop: its clock, which the test sets, and timers, which `advance` fires."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self)
        self.timers.append(handle)
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass

    def get_debug(self) -> bool:
        return False

    def advance(self, to: float) -> None:
        """Move the clock to `to`, firing every timer due on the way, in order, each at its time."""
        while True:
            due = sorted((h for h in self.timers if not h.cancelled() and h.when() <= to), key=lambda h: h.when())
            if not due:
                break
            self.timers.remove(due[0])
            self.now = due[0].when()
            due[0]._run()
        self.now = to


def test_an_alarm_set_by_a_ringing_one_does_not_delay_an_earlier_one():
    """Issue 19: a callback that set a later alarm re-armed the loop timer for it, so an earlier alarm
    already set waited for the later one (a SERVFAIL at 2.5 s instead of 2.0 s; the compiled build also
    logged a TypeError every time)."""
    loop = ClockLoop()
    alarms = Alarms(loop)
    rung: list[tuple[int, float]] = []

    def ring(token: int) -> None:
        rung.append((token, loop.now))
        if token == 1:
            alarms.at(0.5, ring, 3)  # a hedge's follow-up: later than what is already waiting

    alarms.at(0.1, ring, 1)
    alarms.at(0.2, ring, 2)
    loop.advance(1.0)
    assert rung == [(1, 0.1), (2, 0.2), (3, 0.5)]
    assert len(alarms) == 0


def test_alarms_ring_in_order_on_one_timer_and_due_ones_together():
    loop = ClockLoop()
    alarms = Alarms(loop)
    rung: list[int] = []
    for when, token in ((0.3, 3), (0.1, 1), (0.2, 2), (0.1005, 4)):
        alarms.at(when, rung.append, token)
    assert sum(not handle.cancelled() for handle in loop.timers) == 1
    loop.advance(0.1)
    assert rung == [1, 4]  # within the clock's resolution of due: rung with it
    loop.advance(1.0)
    assert rung == [1, 4, 2, 3]
