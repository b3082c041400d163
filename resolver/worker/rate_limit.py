"""Response rate limiting (RRL) of UDP answers, after BIND's and Knot's: what makes bns a poor reflector.

A reflection attack sends small queries with a victim's address as the source and lets the server's larger
answers flood the victim. UDP proves no source address, so the answers a source prefix (a /24, a /56) gets
are budgeted: per second, `responses_per_second` of each distinct response (the question for NOERROR;
NXDOMAIN per registered domain, so random names under one do not make fresh budgets; all other errors
alike). Beyond the budget an answer is dropped, except every `slip`-th, which goes out truncated with no
records: a real client behind a spoofed-looking prefix retries over TCP, which needs a real address and is
never limited. Refusals of strangers are budgeted the same way, and never slipped.

Budgets are token buckets refilled at the rate and holding at most one second's worth, kept per worker (a
source's queries reach one worker while its source port stays the same) and forgotten oldest half first.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from resolver.shared.config import RateLimitSettings
from resolver.shared.dns import Rcode
from resolver.shared.memo import make_room
from resolver.worker.wire import registered_domain

SEND, SLIP, DROP = 0, 1, 2

_HEADER = 12


class ResponseRateLimiter:
    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, int, bytes], list[float]] = {}
        self._prefixes: dict[str, str] = {}
        self.slipped = 0
        self.dropped = 0
        self.configure(settings)

    def configure(self, settings: RateLimitSettings) -> None:
        """New settings (start-up, SIGHUP); the budgets spent so far are kept."""
        self._settings = settings
        self._rate = float(settings.responses_per_second)
        self._slip = settings.slip
        self.limiting = settings.responses_per_second > 0

    def judge(self, reply: bytes, source: str) -> int:
        """SEND, SLIP (send it truncated) or DROP the UDP answer `reply` to `source`."""
        rcode = reply[3] & 0x0F
        name_end = reply.find(0, _HEADER) + 1  # 0: no question (and the slices below must not end before 12)
        if rcode == Rcode.NOERROR and name_end:
            response = reply[_HEADER : name_end + 4].lower()
        elif rcode == Rcode.NXDOMAIN and name_end:
            # one budget per domain: random names under it make no fresh budget, blocked names elsewhere do
            response = registered_domain(reply[_HEADER:name_end].lower())
        else:
            response = b""  # every other error shares one budget per prefix
        prefix = self._prefixes.get(source)
        if prefix is None:
            prefix = self._prefix(source)
        key = (prefix, rcode, response)
        now = self._clock()
        rate = self._rate
        bucket = self._buckets.get(key)
        if bucket is None:
            make_room(self._buckets, self._settings.table_size)
            self._buckets[key] = [rate - 1.0, now, 0.0]
            return SEND
        tokens = min(rate, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return SEND
        bucket[0] = tokens
        bucket[2] += 1
        if self._slip and bucket[2] % self._slip == 0:
            self.slipped += 1
            return SLIP
        self.dropped += 1
        return DROP

    def _prefix(self, source: str) -> str:
        settings = self._settings
        try:
            address = ipaddress.ip_address(source.split("%", 1)[0])
        except ValueError:
            return source
        length = settings.ipv4_prefix if address.version == 4 else settings.ipv6_prefix
        prefix = ipaddress.ip_network((address, length), strict=False).compressed
        make_room(self._prefixes, self._settings.table_size)
        self._prefixes[source] = prefix
        return prefix
