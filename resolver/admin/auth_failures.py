"""Failed authentication on the admin API, per source: slowed, logged, in bounded memory.

A source (an IPv4 address; an IPv6 /64, what one host or one customer holds) may fail BURST times; each
failure is then forgiven after REFILL seconds. Once it has none left, its requests are answered 429 with
Retry-After *before* their token is checked, so guessing goes no faster than one guess per REFILL seconds,
however many requests are sent; a right token from that source waits too (checking it would answer the
guess). Requests from other sources are never slowed. Only a presented token that opens nothing is a
failure (a wrong admin, read-only or site token); a request with no token is refused without counting.

The sources are kept in an LRU of MAX_SOURCES: an attacker with more addresses than that makes us forget
the oldest (each forgotten source may fail BURST times again), never grow. Failures are logged at most once
per LOG_EVERY seconds, with the count of those not logged; the token is never logged, nor any part of it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from resolver.shared.hosts import host_of

log = logging.getLogger(__name__)

BURST = 10
REFILL = 6.0  # seconds: ten guesses a minute, once the burst is spent
MAX_SOURCES = 10_000
LOG_EVERY = 10.0


class AuthFailures:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._owed: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source → (failures owed, when)
        self._next_log = 0.0
        self._held = 0  # failures and refusals not logged since the last line

    def __len__(self) -> int:
        """Sources remembered."""
        return len(self._owed)

    def _owing(self, source: str, now: float) -> float:
        owed, since = self._owed.get(source, (0.0, now))
        return max(0.0, owed - (now - since) / REFILL)

    def wait(self, address: str | None) -> int:
        """Whole seconds the source of `address` must wait before a token of its is checked; 0: check now."""
        source = host_of(address)
        now = self._clock()
        over = self._owing(source, now) + 1 - BURST
        if over <= 0:
            return 0
        self._note(f"admin API: {source} failed to authenticate {BURST} times; answering it 429 for now", now)
        return math.ceil(over * REFILL)

    def failed(self, address: str | None, what: str) -> None:
        """A token from `address` opened nothing (`what`: the request, as METHOD PATH)."""
        source = host_of(address)
        now = self._clock()
        self._owed[source] = (self._owing(source, now) + 1, now)
        self._owed.move_to_end(source)
        if len(self._owed) > MAX_SOURCES:
            self._owed.popitem(last=False)
        self._note(f"admin API: a token from {source} opened nothing ({what})", now)

    def _note(self, line: str, now: float) -> None:
        if now < self._next_log:
            self._held += 1
            return
        held = f" ({self._held} more failed or refused attempts since the last line)" if self._held else ""
        log.warning("%s%s", line, held)
        self._held = 0
        self._next_log = now + LOG_EVERY
