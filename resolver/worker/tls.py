"""What DoT and DoH connections have in common before they carry a query: the bounds a new connection is
admitted within, its TLS handshake, the client id its server name gives, and how a query of theirs is let in.

- A new connection counts against `tls.max_connections` (per worker) and `tls.max_per_client` (per client: an
  IPv4 address, an IPv6 /64) from its first byte, handshake included. At the worker's cap an idle open
  connection makes room (RFC 7766 §6.2.3's rule, as for TCP), else a handshake unfinished after
  HANDSHAKE_GRACE (a client that connects and says nothing must not keep others out for the whole
  `tls.handshake_timeout`); when there is neither, or the client is at its own cap, the new one is closed at
  once. Finding the one to close looks at no more than EVICTION_SCAN connections, so that a worker at its cap
  spends no more on a new connection than below it.
- The handshake (TLS 1.2+, the ALPN and the certificate of certificates.py) must end within
  `tls.handshake_timeout`; then the connection is handed to its transport (dot.py, doh.py).
- A client id is the first label of the server name asked for under `tls.name` (`{id}.dns.example.net`), or
  the DoH path's last segment (`/dns-query/{id}`, which wins). Malformed, it is "": as good as none (the
  query is its address's, as on port 53; pipeline.Resolver.answer).
- Access control is port 53's (access.py), but for a client id: a source outside `server.allow` that gives one
  is answered as the device the id names, REFUSED if it names none (pipeline.answer_stranger).

Every bound cut is counted (the gate's `cut`, with its `handshakes`, `malformed_ids` and DoH `statuses`: the
worker's counters, bns_tls_* in metrics).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from resolver.shared.certificates import Certificates
from resolver.shared.config import TlsSettings
from resolver.shared.hosts import host_of
from resolver.shared.logs import Throttled
from resolver.shared.policy.model import is_id
from resolver.worker.access import REFUSED, AccessControl
from resolver.worker.listener import answer_safely, refusal_for
from resolver.worker.pipeline import Resolver
from resolver.worker.tls_transport import TlsTransport
from resolver.worker.wire import Malformed, Peer

_failures = Throttled(logging.getLogger(__name__))

# A client id as a server name's first label: a DNS label (RFC 1035 §2.3.1), lowercase as TLS clients send it.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MALFORMED = ""  # the client id of a request that gave a malformed one


def client_id_of_name(server_name: str | None, name: str) -> str | None:
    """The client id a TLS server name gives under `name` (tls.name): None for `name` itself, another name or
    none; MALFORMED for more than one label or one that is not a DNS label."""
    if server_name is None:
        return None
    asked = server_name.lower().rstrip(".")
    if not asked.endswith("." + name):
        return None
    label = asked[: -len(name) - 1]
    return label if _LABEL.fullmatch(label) else MALFORMED


def client_id_of_path(segment: str) -> str:
    """The client id of a DoH path's last segment (what follows `tls.doh_path/`): an id as a device's client ids
    are written (policy/model.py), else MALFORMED."""
    return segment if is_id(segment) else MALFORMED


def answer_encrypted(
    resolver: Resolver, access: AccessControl, message: bytes, peer: Peer, client_id: str | None
) -> bytes | asyncio.Future[bytes] | None:
    """The answer to a DoT or DoH query (None: none at all), access control included (the module's docstring)."""
    if access[peer[0]] != REFUSED:
        return answer_safely(resolver, message, peer, True, client_id)
    if client_id is None:
        return refusal_for(resolver, access, message, peer, True)
    try:
        return resolver.answer_stranger(message, peer, client_id)
    except Malformed:
        return None  # as port 53 to a stranger: no FORMERR
    except Exception:
        _failures.exception("query failed inside the pipeline")
        return None


class Encrypted(Protocol):
    """A DoT or DoH connection, as the gate sees it."""

    def opened(self, transport: asyncio.Transport, client_id: str | None) -> None:
        """Its handshake is done: it serves from now on (`client_id`: its server name's)."""

    def idle_since(self) -> float | None:
        """When it last finished a query, if it has none in flight (None: busy, or not open yet)."""

    def close(self) -> None:
        """Close it now (what it has in flight is dropped)."""

    def drain(self) -> None:
        """Stop reading; close once what it has read is answered."""


HANDSHAKE_GRACE = 1.0  # seconds a handshake holds its slot against a newcomer when the worker is full
EVICTION_SCAN = 64  # connections looked at to find one to close at the worker's cap


class TlsGate:
    """A worker's DoT and DoH connections (handshaking or open), their bounds, and the counters of both."""

    def __init__(self, settings: TlsSettings, certificates: Certificates, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.certificates = certificates
        self.clock = clock
        # Handshaking or open: what the bounds count. In the order last looked at for eviction: one found busy
        # goes to the back, so that each scan starts at those not looked at for longest.
        self.connections: OrderedDict[Encrypted, None] = OrderedDict()
        self.open: set[Encrypted] = set()  # past their handshake
        self.stopping = False  # the worker drains: a handshake that ends now is closed
        self._handshaking: OrderedDict[Encrypted, Handshake] = OrderedDict()
        self._hosts: dict[Encrypted, str] = {}
        self._per_host: dict[str, int] = {}
        # metrics: handshakes done by listener, connections cut by why, malformed client ids, DoH statuses
        self.handshakes = {"dot": 0, "doh": 0}
        self.cut = {
            "worker_full": 0,  # tls.max_connections, and no idle connection or slow handshake to close instead
            "client_full": 0,  # tls.max_per_client
            "evicted": 0,  # idle, or handshaking past HANDSHAKE_GRACE: closed to make room at tls.max_connections
            "handshake_timeout": 0,  # tls.handshake_timeout
            "handshake_failed": 0,  # the client gave up, or offered nothing we take
            "idle": 0,  # tls.idle_timeout
            "streams": 0,  # HTTP/2: more streams than tls.max_streams
            "flood": 0,  # HTTP/2: resets, settings or pings beyond their budget
            "protocol": 0,  # HTTP/2 or HTTP/1.1 that does not parse
        }
        self.malformed_ids = 0
        self.statuses: dict[int, int] = {}

    def open_count(self) -> int:
        return len(self.connections)

    def admit(self, connection: Encrypted, handshake: Handshake, address: str) -> bool:
        """Count a new connection in, or say no (counted) when it has no room."""
        host = host_of(address)
        if self._per_host.get(host, 0) >= self.settings.max_per_client:
            self.cut["client_full"] += 1
            return False
        if len(self.connections) >= self.settings.max_connections and not self._make_room():
            self.cut["worker_full"] += 1
            return False
        self.connections[connection] = None
        self._handshaking[connection] = handshake
        self._hosts[connection] = host
        self._per_host[host] = self._per_host.get(host, 0) + 1
        return True

    def opened(self, connection: Encrypted) -> None:
        """Its handshake is done."""
        self._handshaking.pop(connection, None)
        self.open.add(connection)

    def release(self, connection: Encrypted) -> None:
        """A connection is gone (called again for the same one, nothing happens)."""
        self.connections.pop(connection, None)
        self._handshaking.pop(connection, None)
        self.open.discard(connection)
        host = self._hosts.pop(connection, None)
        if host is not None:
            left = self._per_host[host] - 1
            if left:
                self._per_host[host] = left
            else:
                del self._per_host[host]

    def _make_room(self) -> bool:
        """Close a connection for a new one: the longest idle of the first EVICTION_SCAN open ones not looked at
        for longest, else the oldest handshake past HANDSHAKE_GRACE. False if there is neither."""
        victim: Encrypted | None = None
        oldest = math.inf
        looked_at = []
        for connection in itertools.islice(self.connections, EVICTION_SCAN):
            looked_at.append(connection)
            since = connection.idle_since()
            if since is not None and since < oldest:
                victim, oldest = connection, since
        for connection in looked_at:
            if connection is not victim:
                self.connections.move_to_end(connection)
        if victim is not None:
            self.release(victim)
            victim.close()
        elif self._handshaking:
            connection, handshake = next(iter(self._handshaking.items()))
            if self.clock() - handshake.began < HANDSHAKE_GRACE:
                return False
            self.release(connection)
            handshake.abort()
        else:
            return False
        self.cut["evicted"] += 1
        return True

    def count_client_id(self, client_id: str | None) -> str | None:
        if client_id == MALFORMED:
            self.malformed_ids += 1
        return client_id

    def accepting(self, kind: str, connection: Callable[[], Encrypted]) -> Callable[[], TlsTransport]:
        """The protocol factory of a DoT (`kind` "dot") or DoH ("doh") listening socket."""
        timeout = self.settings.handshake_timeout
        return lambda: TlsTransport(self.certificates.fronts[kind], timeout, Handshake(self, kind, connection()))


class Handshake:
    """A new connection's first moments: admitted or closed, then its TLS handshake (tls_transport.py), then
    its transport."""

    def __init__(self, gate: TlsGate, kind: str, connection: Encrypted) -> None:
        self._gate = gate
        self._kind = kind
        self._connection = connection
        self._transport: TlsTransport | None = None
        self.began = gate.clock()
        self._evicted = False

    def begin(self, transport: TlsTransport) -> bool:
        self._transport = transport
        return self._gate.admit(self._connection, self, transport.get_extra_info("peername")[0])

    def abort(self) -> None:
        """Closed unfinished to make room (counted by the gate as evicted, not as a failed handshake)."""
        self._evicted = True
        if self._transport is not None:
            self._transport.abort()

    def ended(self, transport: TlsTransport, error: BaseException | None) -> None:
        gate = self._gate
        connection = self._connection
        if error is not None:
            gate.release(connection)
            if not self._evicted:
                gate.cut["handshake_timeout" if isinstance(error, TimeoutError) else "handshake_failed"] += 1
            return
        if gate.stopping or self._evicted:
            gate.release(connection)
            transport.close()
            return
        try:
            gate.handshakes[self._kind] += 1
            gate.opened(connection)
            tls: ssl.SSLObject = transport.get_extra_info("ssl_object")
            name = gate.count_client_id(client_id_of_name(gate.certificates.server_name(tls), gate.settings.name))
            transport.set_protocol(connection)
            connection.opened(transport, name)  # type: ignore[arg-type]
        except Exception:  # a connection that cannot start must not keep its slot, nor reach the loop's handler
            _failures.exception(f"a {self._kind} connection failed as it opened")
            gate.release(connection)
            transport.abort()
