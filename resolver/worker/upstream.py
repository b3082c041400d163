"""Forwarding to upstream resolvers, with the spoofing resistance of RFC 5452.

Every query gets a random ID and leaves from one of a pool of connected UDP sockets, each bound by the kernel
to a random source port and replaced after `socket_queries` uses. A reply is taken only if it arrives on
that socket (the kernel checks address and port), carries the ID we sent and repeats our question; anything
else is ignored and the real reply is still awaited. A truncated reply is asked again over TCP.

Attempts are hedged, not abandoned: when an upstream has not answered within `timeout`, the next one is
asked too and the first usable reply wins, so an upstream that is merely slow (a cold recursion can take a
second) still answers. An upstream that keeps failing is skipped for a while; when every upstream fails the
caller gets UpstreamFailed at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import struct
from collections.abc import Iterator

from resolver.shared.config import Endpoint, UpstreamSettings
from resolver.shared.dns import Rcode
from resolver.shared.errors import BnsError
from resolver.worker.wire import ScannedReply, is_truncated, reply_matches, scan_reply, upstream_query

log = logging.getLogger(__name__)

_U16 = struct.Struct("!H")


class UpstreamFailed(BnsError):
    """No upstream gave a usable answer before the deadline."""


class Overloaded(BnsError):
    """Too many upstream queries in flight: the query is refused at once rather than queued."""


class _UdpChannel(asyncio.DatagramProtocol):
    """One connected UDP socket and the queries waiting for a reply on it, by ID."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}
        self.uses = 0
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.opened.done():
            self.opened.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        waiter = self.pending.get(data[0] << 8 | data[1])
        if waiter is None or not reply_matches(data, waiter[1]):
            return  # late, duplicate or forged: the real reply may still come
        del self.pending[data[0] << 8 | data[1]]
        if not waiter[0].done():
            waiter[0].set_result(data)
        self._close_if_idle()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected socket: the upstream is not listening; fail fast.
        self._fail_all(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(exc or ConnectionError("upstream socket closed"))

    def _fail_all(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for future, _question in pending.values():
            if not future.done():
                future.set_exception(exc)

    def new_id(self) -> int:
        while True:
            query_id = secrets.randbits(16)
            if query_id not in self.pending:
                return query_id

    def forget(self, query_id: int) -> None:
        self.pending.pop(query_id, None)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.retired and not self.pending and self.transport is not None:
            self.transport.close()


class Upstream:
    """One upstream server: its sockets and its health."""

    def __init__(self, endpoint: Endpoint, settings: UpstreamSettings) -> None:
        self.endpoint = endpoint
        self._settings = settings
        self._channels: list[_UdpChannel | None] = [None] * settings.sockets
        self.failures = 0
        self.down_until = 0.0

    def is_down(self, now: float) -> bool:
        return self.down_until > now

    def record_success(self) -> None:
        if self.down_until:
            log.info("upstream %s answers again", self.endpoint)
        self.failures = 0
        self.down_until = 0.0

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self._settings.down_after and not self.is_down(now):
            if not self.down_until:
                log.warning("upstream %s marked down after %d failures", self.endpoint, self.failures)
            self.down_until = now + self._settings.down_for

    async def exchange(self, question: bytes, do: bool, cd: bool) -> ScannedReply:
        """Ask over UDP, again over TCP if truncated; scan the reply. Raises OSError, EOFError or Malformed;
        the caller bounds the time by cancelling."""
        reply = await self._exchange_udp(question, do, cd)
        if is_truncated(reply):
            reply = await self._exchange_tcp(question, do, cd)
        return scan_reply(reply, question)

    async def _channel(self) -> _UdpChannel:
        slot = random.randrange(len(self._channels))
        channel = self._channels[slot]
        if channel is None or (channel.transport is not None and channel.transport.is_closing()):
            channel = self._channels[slot] = _UdpChannel()
            try:
                # A socket connected here (a UDP connect is immediate and needs no name lookup), so the
                # endpoint is ready in the same loop iteration; the kernel picks a random source port.
                sock = socket.socket(self.endpoint.family, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    sock.connect((self.endpoint.host, self.endpoint.port))
                    await asyncio.get_running_loop().create_datagram_endpoint(lambda: channel, sock=sock)
                except BaseException:
                    sock.close()
                    raise
            except BaseException:
                # Opening failed or was cancelled (a hedge won, the deadline passed): free the slot and
                # release the queries that wait on this channel instead of leaving them stuck.
                if self._channels[slot] is channel:
                    self._channels[slot] = None
                if not channel.opened.done():
                    channel.opened.set_exception(ConnectionError(f"opening a socket to {self.endpoint} failed"))
                    channel.opened.exception()
                raise
        elif channel.transport is None:
            await channel.opened  # another query is opening this slot's socket
        channel.uses += 1
        if channel.uses >= self._settings.socket_queries:
            channel.retired = True  # the next query in this slot opens a socket on a new random port
            self._channels[slot] = None
        return channel

    async def _exchange_udp(self, question: bytes, do: bool, cd: bool) -> bytes:
        channel = await self._channel()
        query_id = channel.new_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        channel.pending[query_id] = (future, question)
        try:
            assert channel.transport is not None
            channel.transport.sendto(upstream_query(query_id, question, do, cd))
            return await future
        finally:
            channel.forget(query_id)

    async def _exchange_tcp(self, question: bytes, do: bool, cd: bool) -> bytes:
        reader, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        try:
            query_id = secrets.randbits(16)
            message = upstream_query(query_id, question, do, cd)
            writer.write(_U16.pack(len(message)) + message)
            while True:
                length = _U16.unpack(await reader.readexactly(2))[0]
                reply = await reader.readexactly(length)
                if reply[:2] == _U16.pack(query_id) and reply_matches(reply, question):
                    return reply
        finally:
            writer.close()

    def close(self) -> None:
        for channel in self._channels:
            if channel is not None and channel.transport is not None:
                channel.transport.close()


class Forwarder:
    """Sends a question to the upstreams in order of preference, healthy ones first, until the deadline."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self.upstreams = [Upstream(endpoint, settings) for endpoint in settings.servers]
        self.outstanding = 0
        self.replies = 0  # accepted replies, and the seconds spent waiting for them (metrics)
        self.reply_seconds = 0.0

    def _order(self, now: float) -> Iterator[Upstream]:
        """Healthy upstreams in configured order, then the ones marked down; round and round."""
        ordered = [u for u in self.upstreams if not u.is_down(now)] + [u for u in self.upstreams if u.is_down(now)]
        while True:
            yield from ordered

    async def query(self, question: bytes, do: bool, cd: bool) -> ScannedReply:
        """A sound reply to `question`, scanned. SERVFAIL/REFUSED from one upstream makes us try the next;
        if nobody does better, such a reply is returned. Raises UpstreamFailed or Overloaded."""
        if self.outstanding >= self._settings.max_outstanding:
            raise Overloaded(f"{self.outstanding} upstream queries in flight")
        self.outstanding += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.deadline
        order = self._order(loop.time())
        pending: dict[asyncio.Task[ScannedReply], tuple[Upstream, float]] = {}
        refusal: ScannedReply | None = None
        refused_by: set[Upstream] = set()
        launched = 0
        launch = True
        try:
            while (remaining := deadline - loop.time()) > 0:
                if len(refused_by) == len(self.upstreams):
                    break  # every upstream has said no: waiting longer will not change that
                if launch:
                    upstream = next(order)
                    pending[loop.create_task(upstream.exchange(question, do, cd))] = (upstream, loop.time())
                    launched += 1
                wait = min(self._settings.timeout, remaining)
                if not pending:
                    await asyncio.sleep(wait)
                    launch = True
                    continue
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    launch = True  # silent for `timeout`: ask the next one too, keep listening to this one
                    continue
                answer: ScannedReply | None = None
                for task in done:  # every finished attempt is accounted for, even after an answer
                    upstream, started = pending.pop(task)
                    if task.exception() is not None:
                        log.debug("upstream %s failed: %r", upstream.endpoint, task.exception())
                        upstream.record_failure(loop.time())
                        continue
                    upstream.record_success()
                    self.replies += 1
                    self.reply_seconds += loop.time() - started
                    scanned = task.result()
                    if scanned.rcode not in (Rcode.SERVFAIL, Rcode.REFUSED):
                        answer = answer or scanned
                    else:
                        refusal = scanned
                        refused_by.add(upstream)
                if answer is not None:
                    return answer
                # An attempt ended without an answer: on the first pass fail over at once; after that the
                # timer paces retries, so an upstream that refuses instantly cannot start a tight loop.
                launch = launched < len(self.upstreams)
        finally:
            self.outstanding -= 1
            now = loop.time()
            for task, (upstream, started) in pending.items():
                task.cancel()
                if now - started >= self._settings.timeout:
                    upstream.record_failure(now)  # it had its chance and stayed silent
        if refusal is not None:
            return refusal
        raise UpstreamFailed(f"no upstream answered within {self._settings.deadline} s")

    def close(self) -> None:
        for upstream in self.upstreams:
            upstream.close()
