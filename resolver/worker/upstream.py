"""Forwarding to upstream resolvers, with the spoofing resistance of RFC 5452.

Every query gets a random ID and leaves from a connected UDP socket the kernel bound to a random source
port: by default a socket of its own, closed as soon as its query ends (`socket_queries` = 1), else one of
a pool of `sockets` replaced after `socket_queries` uses. Its name goes out in randomly mixed letter case
(0x20) unless the upstream is in `keep_case`. A reply is taken only if it arrives on that socket (the kernel
checks address and port), carries the ID we sent and repeats our question, name letter for letter; anything
else is counted by reason, ignored, and the real reply still awaited. A truncated reply is asked again over
TCP, in lowercase: an off-path forger cannot answer on a connection it cannot see.

Attempts are hedged, not abandoned: when an upstream has not answered within `timeout`, the next one is
asked too and the first usable reply wins, so an upstream that is merely slow (a cold recursion can take a
second) still answers. An upstream that keeps failing is skipped for a while; when every upstream fails the
caller gets UpstreamFailed at the deadline.

A question in flight is a `_Fetch` driven by callbacks: the event loop reads the sockets itself and hands
each reply to the fetch that sent it, and one timer paces hedges and the deadline. A cache miss costs one
future, not a task per attempt (the miss path is a third of the CPU a forwarding resolver spends).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
from typing import Protocol

from resolver.shared.config import Endpoint, UpstreamSettings
from resolver.shared.dns import Rcode
from resolver.shared.errors import BnsError
from resolver.worker.alarms import Alarms
from resolver.worker.wire import (
    HEADER_LEN,
    Malformed,
    Rejected,
    ScannedReply,
    mix_case,
    reply_fault,
    scan_reply,
    upstream_query,
)

log = logging.getLogger(__name__)

_U16 = struct.Struct("!H")
_MAX_REPLY = 65535
# Datagrams read per wakeup of one socket: enough to empty it under load without starving the others.
_READS_PER_WAKEUP = 32
_FLAG_TC = 0x02  # in the high flags byte
_REFUSALS = frozenset((Rcode.SERVFAIL, Rcode.REFUSED))
_EARLY = 0.001  # an alarm may ring up to a millisecond early (the loop clock's resolution)


class UpstreamFailed(BnsError):
    """No upstream gave a usable answer before the deadline."""


class Overloaded(BnsError):
    """Too many upstream queries in flight: the query is refused at once rather than queued."""


# An ID is not given again within this many queries, so 1,000 queries carry 1,000 IDs (drawn freely, about 8
# would repeat). Leaving out the last 1,024 of 65,536 costs a guesser 0.02 bits.
_ID_REUSE_AFTER = 1024


class _Randomness:
    """Query IDs (RFC 5452 §9.2) and 0x20 case bits from the kernel's CSPRNG, read 8 KB at a time: one
    getrandom call per few hundred queries rather than two per query. A forked child starts a pool of its
    own."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        self._recent_ids: set[int] = set()
        self._id_ring = [-1] * _ID_REUSE_AFTER  # the last IDs given, oldest at `_ring_at`
        self._ring_at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._at = b"", 0

    def take(self, size: int) -> bytes:
        at = self._at
        if at + size > len(self._pool):
            self._pool = os.urandom(8192)
            at = 0
        self._at = at + size
        return self._pool[at : at + size]

    def query_id(self) -> int:
        recent = self._recent_ids
        query_id = int.from_bytes(self.take(2))
        while query_id in recent:
            query_id = int.from_bytes(self.take(2))
        ring, at = self._id_ring, self._ring_at
        recent.discard(ring[at])
        recent.add(query_id)
        ring[at] = query_id
        self._ring_at = (at + 1) % _ID_REUSE_AFTER
        return query_id


_random = _Randomness()


class _Socket:
    """One connected UDP socket to one upstream, read by the event loop, and the attempts awaiting a reply
    on it by ID."""

    __slots__ = ("_loop", "_sock", "closed", "pending", "retired", "upstream", "uses")

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        endpoint = upstream.endpoint
        sock = socket.socket(endpoint.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            # A UDP connect is immediate (no packet, no name lookup): the kernel picks a random source port
            # and from then on drops datagrams from any other address or port.
            sock.connect((endpoint.host, endpoint.port))
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._loop = loop
        self._sock = sock
        self.upstream = upstream
        self.pending: dict[int, tuple[_Fetch, float]] = {}
        self.uses = 0
        self.retired = False
        self.closed = False

    def send(self, fetch: _Fetch, started: float) -> int:
        """Send `fetch`'s question under a fresh random ID; the ID. Raises OSError."""
        pending = self.pending
        query_id = _random.query_id()
        while query_id in pending:
            query_id = _random.query_id()
        self._sock.send(upstream_query(query_id, fetch.question_for(self.upstream), fetch.do, fetch.cd))
        pending[query_id] = (fetch, started)
        self.uses += 1
        return query_id

    def forget(self, query_id: int) -> bool:
        """Stop waiting for `query_id`; whether it was still awaited."""
        awaited = self.pending.pop(query_id, None) is not None
        self._close_if_done()
        return awaited

    def _close_if_done(self) -> None:
        # A retired socket closes as soon as nothing is pending on it: it holds a descriptor and a port.
        if self.retired and not self.pending:
            self.close()

    def _readable(self) -> None:
        upstream = self.upstream
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = self._sock.recv(_MAX_REPLY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # ICMP port unreachable for an earlier datagram: the upstream is not listening; fail fast.
                self._fail_all(error)
                return
            # Anything refused here may be forged: it is counted and ignored, and the real reply may still come.
            if len(data) < HEADER_LEN:
                upstream.rejected[Rejected.MALFORMED] += 1
                continue
            query_id = data[0] << 8 | data[1]
            waiter = self.pending.get(query_id)
            if waiter is None:
                upstream.rejected[Rejected.WRONG_ID] += 1
                continue
            fetch = waiter[0]
            fault = reply_fault(data, fetch.question_for(upstream), upstream.mixes_case)
            if fault is not None:
                upstream.rejected[fault] += 1
                continue
            del self.pending[query_id]
            self._close_if_done()
            fetch.replied(upstream, waiter[1], data)
            if self.closed:
                return

    def _fail_all(self, error: OSError) -> None:
        pending, self.pending = self.pending, {}
        for fetch, _started in pending.values():
            fetch.attempt_failed(self.upstream, error)
        self._close_if_done()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


class Upstream:
    """One upstream server: its sockets, whether it is asked in mixed case, and its health. `rejected`
    counts the replies refused on its sockets (shared by the forwarder's upstreams)."""

    def __init__(self, endpoint: Endpoint, settings: UpstreamSettings, rejected: dict[Rejected, int]) -> None:
        self.endpoint = endpoint
        self._settings = settings
        self._sockets: list[_Socket | None] = [None] * settings.sockets
        self.mixes_case = settings.case_randomization and endpoint not in settings.keep_case
        self.rejected = rejected
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

    def send(self, fetch: _Fetch, loop: asyncio.AbstractEventLoop, started: float) -> tuple[_Socket, int]:
        """Send `fetch`'s question over UDP from a socket of the pool, a new one (on a new port) in a slot whose
        socket has carried `socket_queries`; (socket, ID). Raises OSError."""
        sockets = self._sockets
        slot = random.randrange(len(sockets))
        sock = sockets[slot]
        if sock is None or sock.closed:
            sock = sockets[slot] = _Socket(self, loop)
        query_id = sock.send(fetch, started)
        if sock.uses >= self._settings.socket_queries:
            sock.retired = True  # the next query in this slot opens a socket on a new random port
            sockets[slot] = None
        return sock, query_id

    async def ask_tcp(self, question: bytes, do: bool, cd: bool) -> bytes:
        """The reply over TCP (for a truncated UDP one). Raises OSError or EOFError; the caller bounds the
        time by cancelling."""
        reader, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        try:
            query_id = _random.query_id()
            message = upstream_query(query_id, question, do, cd)
            writer.write(_U16.pack(len(message)) + message)
            while True:
                length = _U16.unpack(await reader.readexactly(2))[0]
                reply = await reader.readexactly(length)
                fault = Rejected.WRONG_ID if reply[:2] != message[:2] else reply_fault(reply, question, False)
                if fault is None:
                    return reply
                self.rejected[fault] += 1
        finally:
            writer.close()

    def close(self) -> None:
        for sock in self._sockets:
            if sock is not None:
                sock.close()


class _Fetch:
    """One question asked upstream: its attempts, its one timer, and the future its caller awaits.

    Its alarm rings `timeout` after the last attempt was sent (ask the next upstream too) or at the deadline
    (give up). Whatever ends the fetch, `_end` releases its IDs; if the caller cancels the future, the next
    event of the fetch (a reply or the alarm) does so."""

    __slots__ = (
        "_attempts",
        "_deadline",
        "_forwarder",
        "_launched",
        "_loop",
        "_order",
        "_refusal",
        "_refused_by",
        "_tcp",
        "cd",
        "do",
        "future",
        "mixed",
        "question",
    )

    def __init__(
        self, forwarder: Forwarder, question: bytes, do: bool, cd: bool, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._forwarder = forwarder
        self._loop = loop
        self.question = question
        # Once per fetch, not per attempt: a hedge repeats the same letters, and a reply to either matches.
        self.mixed = mix_case(question, _random.take(len(question))) if forwarder.mixes_case else question
        self.do = do
        self.cd = cd
        self.future: asyncio.Future[ScannedReply] = loop.create_future()
        now = loop.time()
        self._deadline = now + forwarder.settings.deadline
        self._order = forwarder.order(now)
        self._attempts: list[tuple[_Socket, int, Upstream, float]] = []
        self._launched = 0
        self._refusal: ScannedReply | None = None
        self._refused_by: set[Upstream] = set()
        self._tcp: asyncio.Task[bytes] | None = None
        self._launch()

    def question_for(self, upstream: Upstream) -> bytes:
        """The question as `upstream` is asked it: in mixed case unless it is in `keep_case`."""
        return self.mixed if upstream.mixes_case else self.question

    def _alarm(self, launched: int) -> None:
        """The alarm set by launch number `launched`: it matters only if no launch came after it."""
        if self._attempts is None or launched != self._launched:
            return
        if self.future.done():
            self._end()  # the caller cancelled
        elif self._loop.time() + _EARLY >= self._deadline:
            self._give_up()
        else:
            self._launch()  # silent for `timeout`: ask the next one too, keep listening for the first

    def _launch(self) -> None:
        """Ask the next upstream in the order, and set the alarm."""
        loop, order = self._loop, self._order
        now = loop.time()
        upstream = order[self._launched % len(order)]
        self._launched += 1
        try:
            sock, query_id = upstream.send(self, loop, now)
        except OSError as error:  # no descriptor or port left (EMFILE, EADDRINUSE), no route: a failed attempt
            log.debug("upstream %s: sending failed: %r", upstream.endpoint, error)
            self._forwarder.send_errors += 1
            upstream.record_failure(now)
        else:
            self._attempts.append((sock, query_id, upstream, now))
        self._forwarder.alarms.at(
            min(now + self._forwarder.settings.timeout, self._deadline), self._alarm, self._launched
        )

    def replied(self, upstream: Upstream, started: float, data: bytes) -> None:
        """A reply that matches our question, from `upstream` over UDP."""
        if self.future.done():
            self._end()
            return
        if data[2] & _FLAG_TC:
            tcp = self._tcp = self._loop.create_task(upstream.ask_tcp(self.question, self.do, self.cd))
            tcp.add_done_callback(lambda _: self._replied_tcp(upstream, started, tcp))
            return
        self._take(upstream, started, data)

    def _replied_tcp(self, upstream: Upstream, started: float, tcp: asyncio.Task[bytes]) -> None:
        if tcp.cancelled() or self.future.done():
            return
        error = tcp.exception()
        if error is not None:
            self.attempt_failed(upstream, error)
        else:
            self._take(upstream, started, tcp.result())

    def _take(self, upstream: Upstream, started: float, data: bytes) -> None:
        try:
            scanned = scan_reply(data, self.question)
        except Malformed as error:
            upstream.rejected[Rejected.MALFORMED] += 1
            self.attempt_failed(upstream, error)
            return
        upstream.record_success()
        forwarder = self._forwarder
        # RFC 4035 §3.2.3, RFC 6840 §5.8: nothing validated the hop from the upstream to us, so its AD bit is
        # believed only when upstream.trust_ad says so; decided once per reply, before it is cached, so a
        # cache hit pays nothing for it.
        scanned.ad = scanned.ad and forwarder.settings.trust_ad
        forwarder.replies += 1
        forwarder.reply_seconds += self._loop.time() - started
        if scanned.rcode not in _REFUSALS:
            self._finish(scanned)
            return
        self._refusal = scanned
        self._refused_by.add(upstream)
        if len(self._refused_by) == len(forwarder.upstreams):
            self._finish(scanned)  # every upstream has said no: waiting longer will not change that
        else:
            self._next_after_failure()

    def attempt_failed(self, upstream: Upstream, error: BaseException) -> None:
        """An attempt ended without a reply we can use (its socket failed, its reply was malformed)."""
        if self.future.done():
            self._end()
            return
        log.debug("upstream %s failed: %r", upstream.endpoint, error)
        upstream.record_failure(self._loop.time())
        self._next_after_failure()

    def _next_after_failure(self) -> None:
        # On the first pass fail over at once; after that the timer paces retries, so an upstream that
        # fails instantly cannot start a tight loop.
        if self._launched < len(self._order):
            self._launch()

    def _give_up(self) -> None:
        if self._refusal is not None:
            self._finish(self._refusal)
        elif not self.future.done():
            self.future.set_exception(
                UpstreamFailed(f"no upstream answered within {self._forwarder.settings.deadline} s")
            )
        self._end()

    def _finish(self, scanned: ScannedReply) -> None:
        if not self.future.done():
            self.future.set_result(scanned)
        self._end()

    def _end(self) -> None:
        """Release what the fetch holds; an upstream that stayed silent for `timeout` counts a failure."""
        attempts = self._attempts
        if attempts is None:
            return
        self._attempts = None  # type: ignore[assignment]
        self._forwarder.outstanding -= 1
        if self._tcp is not None:
            self._tcp.cancel()
        now = self._loop.time()
        timeout = self._forwarder.settings.timeout
        for sock, query_id, upstream, started in attempts:
            if sock.forget(query_id) and now - started + _EARLY >= timeout:
                upstream.record_failure(now)  # it had its chance and stayed silent


class Forwarding(Protocol):
    """What the query path and its counters use of a forwarder (the tests' scripted upstream has as much)."""

    settings: UpstreamSettings
    rejected: dict[Rejected, int]
    send_errors: int
    replies: int
    reply_seconds: float

    def query(self, question: bytes, do: bool, cd: bool) -> asyncio.Future[ScannedReply]: ...

    def close(self) -> None: ...


class Forwarder:
    """Sends a question to the upstreams in order of preference, healthy ones first, until the deadline."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        # For metrics: replies refused by reason, attempts that could not be sent, accepted replies and the
        # seconds spent waiting for them.
        self.rejected = dict.fromkeys(Rejected, 0)
        self.send_errors = 0
        self.replies = 0
        self.reply_seconds = 0.0
        self.upstreams = [Upstream(endpoint, settings, self.rejected) for endpoint in settings.servers]
        self.mixes_case = any(upstream.mixes_case for upstream in self.upstreams)
        self.outstanding = 0
        self._alarms: Alarms | None = None

    @property
    def alarms(self) -> Alarms:
        if self._alarms is None:  # made on first use: the forwarder is built before the loop runs
            self._alarms = Alarms(asyncio.get_running_loop())
        return self._alarms

    def order(self, now: float) -> list[Upstream]:
        """Healthy upstreams in configured order, then the ones marked down (asked round and round)."""
        upstreams = self.upstreams
        down = [upstream for upstream in upstreams if upstream.down_until > now]
        if not down:
            return upstreams
        return [upstream for upstream in upstreams if upstream not in down] + down

    def query(self, question: bytes, do: bool, cd: bool) -> asyncio.Future[ScannedReply]:
        """A sound reply to `question`, scanned. SERVFAIL/REFUSED from one upstream makes us try the next;
        if nobody does better, such a reply is the result. Raises Overloaded; the future may hold
        UpstreamFailed."""
        if self.outstanding >= self.settings.max_outstanding:
            raise Overloaded(f"{self.outstanding} upstream queries in flight")
        self.outstanding += 1
        return _Fetch(self, question, do, cd, asyncio.get_running_loop()).future

    def close(self) -> None:
        for upstream in self.upstreams:
            upstream.close()
        if self._alarms is not None:
            self._alarms.close()
