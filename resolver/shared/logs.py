"""Log lines that cannot flood: a failure repeated per query is logged once per interval, with a count."""

from __future__ import annotations

import logging
import time

_INTERVAL = 10.0


class Throttled:
    """Logs an unexpected failure (or a warning) at most once per interval, with a count of the ones it held
    back."""

    def __init__(self, log: logging.Logger, interval: float = _INTERVAL) -> None:
        self._log = log
        self._interval = interval
        self._next = 0.0
        self._held = 0

    def exception(self, what: str, exc_info: BaseException | bool = True) -> None:
        """`what`, with the exception being handled (or the one given) and its traceback."""
        if self._due():
            self._log.error("%s (%d similar failures not logged)", what, self._held, exc_info=exc_info)
            self._held = 0

    def warning(self, message: str, *args: object) -> None:
        if self._due():
            self._log.warning(message + " (%d similar not logged)", *args, self._held)
            self._held = 0

    def _due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return False
        self._next = now + self._interval
        return True
