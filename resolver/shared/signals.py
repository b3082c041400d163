"""The signals of the node's child processes: stop on SIGTERM or SIGINT, reload on SIGHUP.

The supervisor blocks them across fork; a child unblocks them once its event loop has handlers, so a signal
sent in between is handled then, not lost or fatal (SIGHUP's default action ends a process)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT))
CHILD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}


def handle_signals(reload: Callable[[], None]) -> asyncio.Event:
    """Handle the child signals from now on: the event returned is set on a stop signal; SIGHUP calls
    `reload` (a failure is logged: the process runs on as it was)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)

    def reload_safely() -> None:
        try:
            reload()
        except Exception:
            log.exception("applying the reloaded configuration failed; still running with the old one")

    loop.add_signal_handler(signal.SIGHUP, reload_safely)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
    return stop
