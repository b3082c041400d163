"""The upstream client on its own, against the scripted upstream on loopback."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import uvloop

from resolver.shared.config import UpstreamSettings, parse_endpoint
from resolver.shared.dns import text_to_name
from resolver.worker.upstream import Upstream

pytestmark = pytest.mark.integration
QUESTION = text_to_name("slot.example") + b"\x00\x01\x00\x01"


@pytest.mark.parametrize("yields", [0, 1, 2, 3])
def test_a_query_cancelled_while_its_socket_opens_does_not_block_the_slot(upstream, yields):
    """Hedging and deadlines cancel attempts; one cancelled mid-open must not leave its slot stuck."""

    async def scenario() -> int:
        client = Upstream(parse_endpoint(upstream.address), UpstreamSettings(sockets=1, socket_queries=1))
        for _ in range(10):
            attempt = asyncio.ensure_future(client.exchange(QUESTION, False, False))
            for _ in range(yields):
                await asyncio.sleep(0)
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await attempt
        reply = await asyncio.wait_for(client.exchange(QUESTION, False, False), 2)
        client.close()
        return reply.rcode

    assert uvloop.run(scenario()) == 0
