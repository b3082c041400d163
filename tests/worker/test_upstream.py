"""The upstream client on its own, against the scripted upstream on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from bench.upstream import ScriptedUpstream
from resolver.shared.config import UpstreamSettings, parse_endpoint
from resolver.shared.dns import text_to_name
from resolver.worker.upstream import Forwarder

pytestmark = pytest.mark.integration
QUESTION = text_to_name("slot.example") + b"\x00\x01\x00\x01"


def forwarder_for(upstream: ScriptedUpstream, **settings: object) -> Forwarder:
    return Forwarder(UpstreamSettings(servers=(parse_endpoint(upstream.address),), **settings))  # type: ignore[arg-type]


def test_a_cancelled_query_frees_its_ids_and_sockets(upstream):
    """The pipeline cancels fetches at shutdown; a cancelled one must not hold its slot or its count."""

    async def scenario() -> tuple[int, int]:
        forwarder = forwarder_for(upstream, sockets=1, socket_queries=1, timeout=0.05, deadline=0.3)
        upstream.script.modes["slot.example"] = "drop"
        for _ in range(10):
            forwarder.query(QUESTION, False, False).cancel()
        await asyncio.sleep(0.1)  # each fetch's timer fires once and finds its caller gone
        left = forwarder.outstanding
        del upstream.script.modes["slot.example"]
        reply = await asyncio.wait_for(forwarder.query(QUESTION, False, False), 2)
        forwarder.close()
        return left, reply.rcode

    assert uvloop.run(scenario()) == (0, 0)


def test_each_socket_carries_at_most_socket_queries_queries(upstream):
    async def scenario() -> None:
        forwarder = forwarder_for(upstream, sockets=2, socket_queries=3)
        replies = await asyncio.gather(*(forwarder.query(QUESTION, False, False) for _ in range(30)))
        forwarder.close()
        assert all(reply.rcode == 0 for reply in replies)

    uvloop.run(scenario())
    ports = [seen.source_port for seen in upstream.seen]
    assert len(ports) == 30
    assert max(ports.count(port) for port in ports) <= 3


def test_an_upstream_that_is_not_listening_is_passed_over_at_once(upstream):
    """ICMP port unreachable on the connected socket ends that attempt: the next upstream is asked now, not
    after the attempt timeout."""

    async def scenario() -> tuple[float, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
            closed.bind(("127.0.0.1", 0))
            silent = parse_endpoint(f"127.0.0.1:{closed.getsockname()[1]}")
        forwarder = Forwarder(
            UpstreamSettings(servers=(silent, parse_endpoint(upstream.address)), timeout=5.0, deadline=9.0)
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await forwarder.query(QUESTION, False, False)
        forwarder.close()
        return loop.time() - started, reply.rcode

    took, rcode = uvloop.run(scenario())
    assert rcode == 0 and took < 1.0
