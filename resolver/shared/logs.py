"""Log lines that cannot flood: a failure repeated per query is logged once per interval, with a count."""

from __future__ import annotations

import logging
import time

_INTERVAL = 10.0


class Throttled:
    """Logs an unexpected failure at most once per interval, with a count of the ones it held back."""

    def __init__(self, log: logging.Logger, interval: float = _INTERVAL) -> None:
        self._log = log
        self._interval = interval
        self._next = 0.0
        self._held = 0

    def exception(self, what: str, exc_info: BaseException | bool = True) -> None:
        """`what`, with the exception being handled (or the one given) and its traceback."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        self._log.error("%s (%d similar failures not logged)", what, self._held, exc_info=exc_info)
        self._held = 0
        self._next = now + self._interval
