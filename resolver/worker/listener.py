"""UDP and TCP listeners: bytes in, bytes out. The one place where failures become rcodes or silence, and
where a source is let in (access.py) and its UDP answers rate limited (rate_limit.py).

TCP follows RFC 7766: two-byte length framing, pipelined queries answered as each completes (so out of
order), an idle timeout, a cap on open connections, and a cap on queries in flight per connection that
pauses reading instead of dropping anything. While the client does not read its answers (the transport pauses
writing), no query is read or answered. DoT (dot.py) is the same connection over TLS.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from resolver.shared.config import ServerSettings
from resolver.shared.dns import Rcode
from resolver.shared.logs import Throttled
from resolver.worker.access import LIMITED, REFUSED, AccessControl
from resolver.worker.pipeline import Resolver
from resolver.worker.rate_limit import SEND, SLIP, ResponseRateLimiter
from resolver.worker.wire import HEADER_LEN, Malformed, Peer, error_answer

_U16 = struct.Struct("!H")
# What DoT and DoH connections may hold of answers their client has not read yet before they stop reading its
# queries (the transport's high-water mark; TLS transports default to far more).
WRITE_BUFFER_LIMIT = 65536
_failures = Throttled(logging.getLogger(__name__))


def servfail_for(data: bytes) -> bytes | None:
    """SERVFAIL for a query a stage failed on unexpectedly (echoing what `error_answer` can read of it)."""
    if len(data) < HEADER_LEN or data[2] & 0x80:
        return None
    return error_answer(data, Malformed(Rcode.SERVFAIL, "internal error"))


def answer_safely(
    resolver: Resolver, data: bytes, client: Peer, tcp: bool, client_id: str | None = None
) -> bytes | asyncio.Future[bytes] | None:
    """Run the pipeline; nothing raises out of here."""
    try:
        return resolver.answer(data, client, tcp, client_id)
    except Malformed as error:
        return error_answer(data, error) if error.rcode is not None else None
    except Exception:
        _failures.exception("query failed inside the pipeline")
        return servfail_for(data)


def result_safely(future: asyncio.Future[bytes], data: bytes) -> bytes | None:
    """The answer a finished future holds, or SERVFAIL if its stage failed (nothing if it was cancelled)."""
    if future.cancelled():
        return None  # shutting down past the drain timeout: the client will retry elsewhere
    try:
        return future.result()
    except Malformed as error:
        return error_answer(data, error) if error.rcode is not None else None
    except Exception:
        _failures.exception("query failed while resolving")
        return servfail_for(data)


class InFlight:
    """The futures of one worker that still owe a client an answer; a graceful stop waits for them."""

    def __init__(self) -> None:
        self.futures: set[asyncio.Future[bytes]] = set()

    def track(self, future: asyncio.Future[bytes]) -> None:
        self.futures.add(future)
        future.add_done_callback(self.futures.discard)

    async def drained(self, timeout: float) -> None:
        if self.futures:
            await asyncio.wait(set(self.futures), timeout=timeout)


def refusal_for(
    resolver: Resolver,
    access: AccessControl,
    data: bytes,
    client: Peer,
    tcp: bool,
    limiter: ResponseRateLimiter | None = None,
) -> bytes | None:
    """The answer to a source outside server.allow: REFUSED, or nothing (silence, a query not worth one, or
    over UDP beyond the rate limit: a forged source must not turn refusals into a flood either)."""
    access.refused += 1
    if access.silent:
        return None
    try:
        refusal = resolver.refusal(data, client, tcp)
    except Exception:
        return None
    if limiter is not None and limiter.limiting and limiter.judge(refusal, client[0]) != SEND:
        return None
    return refusal


class UdpListener(asyncio.DatagramProtocol):
    def __init__(
        self, resolver: Resolver, in_flight: InFlight, access: AccessControl, limiter: ResponseRateLimiter
    ) -> None:
        self._resolver = resolver
        self._in_flight = in_flight
        self._access = access
        self._limiter = limiter
        self._transport: asyncio.DatagramTransport | None = None
        self.draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Peer) -> None:
        if self.draining:
            return  # stopping: a query read now could not be answered in time; the client retries elsewhere
        access = self._access[addr[0]]
        if access == REFUSED:
            refusal = refusal_for(self._resolver, self._access, data, addr, False, self._limiter)
            if refusal is not None:
                self._transport.sendto(refusal, addr)  # type: ignore[union-attr]
            return
        # answer_safely's work, written out: one call less per datagram on the busiest path.
        reply: bytes | asyncio.Future[bytes] | None
        try:
            reply = self._resolver.answer(data, addr, False)
        except Malformed as error:
            reply = error_answer(data, error) if error.rcode is not None else None
        except Exception:
            _failures.exception("query failed inside the pipeline")
            reply = servfail_for(data)
        if type(reply) is bytes:
            if access == LIMITED:
                reply = self._limited(reply, data, addr)
                if reply is None:
                    return
            self._transport.sendto(reply, addr)  # type: ignore[union-attr]
            return
        if reply is None:
            return
        self._in_flight.track(reply)  # type: ignore[arg-type]
        reply.add_done_callback(lambda future: self._send(future, data, addr, access))  # type: ignore[union-attr]

    def _send(self, future: asyncio.Future[bytes], data: bytes, addr: Peer, access: int) -> None:
        reply = result_safely(future, data)
        if reply is not None and access == LIMITED:
            reply = self._limited(reply, data, addr)
        if reply is not None and self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(reply, addr)

    def _limited(self, reply: bytes, data: bytes, addr: Peer) -> bytes | None:
        """`reply`, its truncated form, or nothing, as the source's budget allows (rate_limit.py)."""
        verdict = self._limiter.judge(reply, addr[0])
        if verdict == SEND:
            return reply
        if verdict == SLIP:
            try:
                return self._resolver.truncation(data, addr, reply)
            except Exception:
                return None
        return None

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors about clients that went away: nothing to do

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class TcpConnection(asyncio.Protocol):
    """One client connection: framing, pipelining, back-pressure and the idle timer. Its bounds are
    `server.tcp_*` unless given (DoT: `tls.idle_timeout`)."""

    def __init__(
        self,
        resolver: Resolver,
        settings: ServerSettings,
        connections: set[Any],
        in_flight: InFlight,
        access: AccessControl,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float | None = None,
    ) -> None:
        self._resolver = resolver
        self._access = access
        self._settings = settings
        self._max_in_flight = settings.tcp_max_in_flight
        self._idle_timeout = settings.tcp_idle_timeout if idle_timeout is None else idle_timeout
        self._connections = connections
        self._in_flight_futures = in_flight
        self._clock = clock
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._peer: Peer = ("", 0)
        self._in_flight = 0
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._peer = transport.get_extra_info("peername")[:2]
        if not self._admitted():
            transport.close()
            return
        self._connections.add(self)
        self._last_active = self._clock()
        self._schedule_idle_check(self._idle_timeout)

    def _admitted(self) -> bool:
        """Whether to keep a new connection: not from a source refused in silence, and within the cap."""
        # Before eviction: a refused source must not push out an idle connection of a client.
        if self._access[self._peer[0]] == REFUSED and self._access.silent:
            return False
        # At the cap and every connection busy: refuse; the client tries elsewhere.
        return len(self._connections) < self._settings.tcp_max_connections or self._evict_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._closing = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        # Only whole queries count as activity: a client trickling one byte at a time stays idle and is
        # closed by the idle timer instead of holding a connection for ever.
        self._buffer += data
        self._process_buffer()

    def eof_received(self) -> bool:
        # The client has sent all it will; answer what is in flight, then close (RFC 7766 §6.2.4).
        self._closing = True
        self._close_when_done()
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._process_buffer()  # the queries read before writing paused, then reading again
        if self._closing:
            self._close_when_done()

    def _evict_idle(self) -> bool:
        """Make room for a new connection by closing the longest-idle one with nothing in flight
        (RFC 7766 §6.2.3: under pressure, idle connections go first). False if every one is busy."""
        idle = [c for c in self._connections if c._in_flight == 0 and not c._closing]
        if not idle:
            return False
        victim = min(idle, key=lambda connection: connection._last_active)
        victim._closing = True
        self._connections.discard(victim)
        if victim._transport is not None:
            victim._transport.close()
        return True

    def drain(self) -> None:
        """Stop reading; close once every query already read is answered."""
        self._closing = True
        self._update_reading()
        self._close_when_done()

    def _process_buffer(self) -> None:
        buffer = self._buffer
        # Not while writing is paused: a client that never reads must not have every query already read answered
        # into the transport's buffer; they wait, as bytes, until it reads (resume_writing).
        while len(buffer) >= 2 and self._in_flight < self._max_in_flight and not self._writing_paused:
            length = buffer[0] << 8 | buffer[1]
            if length < HEADER_LEN:
                self._transport.close()  # type: ignore[union-attr]  # a frame that cannot be a query
                return
            if len(buffer) < length + 2:
                break
            message = bytes(buffer[2 : length + 2])
            del buffer[: length + 2]
            self._last_active = self._clock()
            self._dispatch(message)
        self._update_reading()

    def _reply(self, message: bytes) -> bytes | asyncio.Future[bytes] | None:
        # Judged per message, so a reload's new rules reach open connections; TCP is never rate limited: a
        # connection proves its source address.
        if self._access[self._peer[0]] == REFUSED:
            return refusal_for(self._resolver, self._access, message, self._peer, True)
        return answer_safely(self._resolver, message, self._peer, True)

    def _dispatch(self, message: bytes) -> None:
        reply = self._reply(message)
        if reply is None:
            return
        if type(reply) is bytes:
            self._write(message, reply)
            return
        self._in_flight += 1
        self._in_flight_futures.track(reply)  # type: ignore[arg-type]
        reply.add_done_callback(lambda future: self._answered(future, message))  # type: ignore[union-attr]

    def _answered(self, future: asyncio.Future[bytes], message: bytes) -> None:
        self._in_flight -= 1
        reply = result_safely(future, message)
        if reply is not None:
            self._write(message, reply)
        self._last_active = self._clock()
        self._process_buffer()
        if self._closing:
            self._close_when_done()

    def _write(self, message: bytes, reply: bytes) -> None:
        """Send `reply`, the answer to `message` (which DoT reads to pad it)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(_U16.pack(len(reply)) + reply)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pause = self._closing or self._writing_paused or self._in_flight >= self._max_in_flight
        if pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def _close_when_done(self) -> None:
        """Close once nothing is in flight and no whole query waits in the buffer (a partial one never will)."""
        buffer = self._buffer
        whole_query_waiting = len(buffer) >= 2 and len(buffer) >= (buffer[0] << 8 | buffer[1]) + 2
        if self._in_flight == 0 and not whole_query_waiting and self._transport is not None:
            self._transport.close()  # flushes what is buffered first

    def _schedule_idle_check(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        idle_for = self._clock() - self._last_active
        timeout = self._idle_timeout
        if self._in_flight == 0 and idle_for >= timeout:
            self._close_idle()
            return
        self._schedule_idle_check(max(timeout - idle_for, 0.05))

    def _close_idle(self) -> None:
        if self._transport is not None:
            self._transport.close()
