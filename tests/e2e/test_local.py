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


def test_records_written_through_one_nodes_api_are_answered_by_every_node(
    tmp_path, upstream, shared_redis, redis_prefix
):
    store = f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"'
    with ExitStack() as stack:
        port_a, api_a = start(stack, node_config(tmp_path / "a" / "bns.toml", store), upstream)
        port_b, _api_b = start(stack, node_config(tmp_path / "b" / "bns.toml", store), upstream)

        def addresses(port: int, name: str, rdtype: str = "A") -> list[str]:
            response = dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=3)
            return [item.to_text() for rrset in response.answer for item in rrset]

        records = ["intranet.corp.example. 60 A 10.1.2.3", "wiki.corp.example. CNAME intranet.corp.example."]
        status, written = http(api_a, "PUT", "/v1/local/records", {"records": records})
        assert status == 200 and written == {"records": records}
        for port in (port_a, port_b):
            chain = ["intranet.corp.example.", "10.1.2.3"]
            eventually(lambda port=port, chain=chain: addresses(port, "wiki.corp.example") == chain, 3)
            assert addresses(port, "3.2.1.10.in-addr.arpa", "PTR") == ["intranet.corp.example."]  # made for it
        assert http(api_a, "GET", "/v1/local/records", token=READ) == (200, {"records": records})

        # A bad write is refused with its line, and what was written stays in force.
        status, refused = http(api_a, "PUT", "/v1/local/records", {"records": ["x.corp.example. A 10.0.0.300"]})
        assert status == 422 and refused["error"]["field"] == "records" and "line 1" in refused["error"]["message"]
        assert addresses(port_b, "intranet.corp.example") == ["10.1.2.3"]
        assert http(api_a, "PUT", "/v1/local/records", {"records": []})[0] == 200
        for port in (port_a, port_b):
            eventually(lambda port=port: addresses(port, "intranet.corp.example") != ["10.1.2.3"], 3)


def test_records_that_would_not_stand_beside_the_nodes_own_are_refused(tmp_path, upstream):
    config = node_config(tmp_path / "n" / "bns.toml", f'[store]\nfile = "{tmp_path / "policies.json"}"')
    config.write_text(config.read_text() + '[local]\nrecords = ["a.corp.example. CNAME b.corp.example."]\n')
    with ExitStack() as stack:
        _port, api = start(stack, config, upstream)
        status, refused = http(api, "PUT", "/v1/local/records", {"records": ["a.corp.example. A 10.0.0.1"]})
        assert status == 422 and "beside this node's local.records (lines 1–1)" in refused["error"]["message"]
        assert http(api, "GET", "/v1/local/records", token=READ) == (200, {"records": []})
