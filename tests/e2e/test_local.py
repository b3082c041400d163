"""Names that never leave the network, on a real node: a forwarded zone's health in the admin API."""

from __future__ import annotations

from contextlib import ExitStack

import dns.message
import dns.query
import dns.rcode
import pytest

from bench.upstream import Script, ScriptedUpstream
from tests.conftest import eventually
from tests.e2e.test_admin import READ, http, node_config, start

pytestmark = pytest.mark.e2e


def test_a_forwarded_zone_whose_server_stops_answering_is_down_in_the_api(tmp_path, upstream):
    with ScriptedUpstream(script=Script(ttl=0, modes={"down.corp.example": "drop"})) as corp, ExitStack() as stack:
        config = node_config(tmp_path / "n" / "bns.toml", f'[store]\nfile = "{tmp_path / "policies.json"}"')
        config.write_text(config.read_text() + f'[local.forward]\n"corp.example" = ["{corp.address}"]\n')
        port, api = start(stack, config, upstream)

        def ask(name: str) -> int:
            query = dns.message.make_query(name, "A")
            return dns.query.udp(query, "127.0.0.1", port=port, timeout=6).rcode()

        def forwards() -> list[dict[str, object]]:
            status, found = http(api, "GET", "/v1/local/forwards", token=READ)
            assert status == 200
            return found  # type: ignore[return-value]

        assert ask("www.corp.example") == dns.rcode.NOERROR
        eventually(lambda: forwards() and forwards()[0]["replies"] >= 1, 5)
        (zone,) = forwards()
        assert zone == {"zone": "corp.example", "servers": 1, "down": 0, "state": "up", "replies": zone["replies"],
                        "send_errors": 0}  # fmt: skip
        for _ in range(2):  # one worker's failures mark the server down for that worker
            assert ask("down.corp.example") == dns.rcode.SERVFAIL
        eventually(lambda: forwards()[0]["state"] == "down", 5)
        assert forwards()[0]["down"] == 1
