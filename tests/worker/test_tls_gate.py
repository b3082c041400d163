"""The bounds a new DoT or DoH connection is admitted within (tls.TlsGate): per client (an IPv4 address, an IPv6
/64), per worker, and who makes room at the worker's cap — an idle connection, else a handshake that has not
finished within HANDSHAKE_GRACE; the look for one is bounded."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from resolver.shared.certificates import Certificates
from resolver.worker.tls import EVICTION_SCAN, HANDSHAKE_GRACE, Handshake, TlsGate
from tests.conftest import answer_addresses, make_config
from tests.worker.test_encrypted import authority, closed_within, counters, over_dot, pair, serving, tls

__all__ = ["authority", "pair"]  # module fixtures shared with test_encrypted


class Connection:
    """What the gate sees of a connection (tls.Encrypted): idle since a time, or busy."""

    def __init__(self, idle_since: float | None = None) -> None:
        self.since = idle_since
        self.closed = False

    def opened(self, transport: Any, client_id: str | None) -> None:
        pass

    def idle_since(self) -> float | None:
        return self.since

    def close(self) -> None:
        self.closed = True

    def drain(self) -> None:
        pass


def gate_of(pair, clock, **settings: Any) -> TlsGate:
    config = make_config(["127.0.0.1:9"], tls={**tls(pair), **settings})
    return TlsGate(config.tls, Certificates(config.tls), clock)


def admit(gate: TlsGate, connection: Connection, address: str) -> bool:
    return gate.admit(connection, Handshake(gate, "dot", connection), address)


@pytest.mark.unit
def test_a_client_is_an_ipv4_address_or_an_ipv6_64(pair):
    gate = gate_of(pair, time.monotonic, max_per_client=1)
    assert admit(gate, Connection(), "2001:db8::1")
    assert not admit(gate, Connection(), "2001:db8::2")  # the same /64: one host, one customer
    assert admit(gate, Connection(), "2001:db8:0:1::1") and admit(gate, Connection(), "192.0.2.1")
    assert not admit(gate, Connection(), "::ffff:192.0.2.1")  # an IPv4 client of a dual-stack socket
    assert gate.cut["client_full"] == 2


@pytest.mark.unit
def test_at_the_cap_the_idlest_of_a_bounded_look_makes_room_and_busy_ones_wait_at_the_back(pair):
    now = [100.0]
    gate = gate_of(pair, lambda: now[0], max_connections=EVICTION_SCAN + 2)
    busy = [Connection() for _ in range(EVICTION_SCAN)]
    idle = [Connection(idle_since=50.0), Connection(idle_since=10.0)]
    for connection in busy + idle:
        assert admit(gate, connection, "192.0.2.1" if connection in idle else f"10.0.{len(gate.connections)}.1")
        gate.opened(connection)
    # The first look sees only busy ones: the newcomer is refused, and those looked at go to the back.
    assert not admit(gate, Connection(), "192.0.2.9") and gate.cut["worker_full"] == 1
    # The next look starts at the idle ones, and takes the longer idle.
    assert admit(gate, Connection(), "192.0.2.9")
    assert idle[1].closed and not idle[0].closed and not any(connection.closed for connection in busy)
    assert gate.cut["evicted"] == 1 and len(gate.connections) == EVICTION_SCAN + 2


@pytest.mark.integration
def test_a_connection_that_never_finishes_its_handshake_yields_its_slot_at_the_cap(upstream, pair, lists, authority):
    with serving(upstream, pair, lists, {"max_connections": 2, "handshake_timeout": 30}) as server:
        silent = [socket.create_connection(("127.0.0.1", server.dot_port)) for _ in range(2)]  # never say hello
        time.sleep(0.2)
        with pytest.raises(OSError):  # within the grace: the silent ones keep their slots
            over_dot(server, authority, "example.com")
        time.sleep(HANDSHAKE_GRACE)
        assert answer_addresses(over_dot(server, authority, "example.com"))  # the oldest silent one made room
        assert closed_within(silent[0], 3) < 1
        cut = counters(server)["cut"]
        assert (cut["evicted"], cut["worker_full"], cut["handshake_failed"], cut["handshake_timeout"]) == (1, 1, 0, 0)
        silent[1].close()


@pytest.mark.integration
@pytest.mark.logs("a dot connection failed as it opened")
def test_a_connection_that_fails_as_it_opens_gives_back_its_slot(upstream, pair, lists, authority, monkeypatch):
    with serving(upstream, pair, lists, {"max_connections": 1}) as server:
        assert server.worker is not None and server.worker.gate is not None
        gate = server.worker.gate
        monkeypatch.setattr(gate, "count_client_id", lambda client_id: 1 / 0)  # a defect, as it opens
        with pytest.raises((OSError, EOFError)):  # closed on the client
            over_dot(server, authority, "example.com")
        monkeypatch.undo()
        assert counters(server)["open"] == 0
        assert answer_addresses(over_dot(server, authority, "example.com"))  # its slot is free again
