"""A Sentinel deployment loses its primary while a node serves queries and takes policy writes.

Real redis-server (a primary and two replicas) and redis-sentinel processes; a whole `bns serve` node with
`store.redis = "sentinel://…"`. The primary is killed outright under load: a replica is promoted, the node
follows it, queries keep being answered, writes resume, and every write the API acknowledged is there."""

from __future__ import annotations

import time
from pathlib import Path

import dns.message
import pytest

from bench.faults import TOKEN, Hammer, Writer, api_call, mac, mac_option, new_address, site_devices, write_config
from tests.e2e.test_process import node

pytestmark = pytest.mark.e2e


def test_the_loss_of_the_primary_loses_no_query_and_no_acknowledged_write(
    tmp_path: Path, upstream, sentinel_deployment, redis_prefix
):
    deployment = sentinel_deployment
    config = write_config(
        tmp_path / "node.toml",
        store={"redis": deployment.url, "prefix": redis_prefix},
        lists={"cache_dir": str(tmp_path / "cache")},
        admin={"tokens": [TOKEN]},
        identity={"trusted_networks": ["127.0.0.1/32"]},
    )
    with node(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2", timeout=30
    ) as (_process, port, api):
        assert api is not None
        site = {"networks": ["127.0.0.0/8"], "mode": "device", "devices": {"d0": {"macs": [mac(0)]}}}
        assert api_call(api, "PUT", "/v1/sites/home", site) == 200
        known = Hammer(
            port, lambda _number: dns.message.make_query("cached.example", "A", use_edns=0, options=[mac_option(0)])
        )
        new = Hammer(port, lambda number: dns.message.make_query(f"new{number}.example", "A"), new_address)
        with known, new, Writer(api, "home") as writer:
            time.sleep(2)
            old_primary = deployment.primary_port()
            assert old_primary is not None
            deployment.server_on(old_primary).kill()
            killed = time.monotonic()
            while deployment.primary_port() in (old_primary, None):
                assert time.monotonic() - killed < 30, "no replica was promoted"
                time.sleep(0.05)
            promoted = time.monotonic()
            while writer.first_success_after(promoted) == float("inf"):
                assert time.monotonic() - promoted < 15, "writes never resumed"
                time.sleep(0.05)
            time.sleep(2)
        devices = site_devices(api, "home")
    resumed = writer.first_success_after(promoted)
    print(
        f"failover: promoted {promoted - killed:.1f} s after the kill, writes resumed {resumed - promoted:.2f} s "
        f"after; known clients {dict(known.outcomes)}, new clients {dict(new.outcomes)}"
    )
    for hammer in (known, new):
        assert hammer.outcomes["lost"] == 0 and hammer.outcomes["SERVFAIL"] == 0, hammer.outcomes
        assert hammer.outcomes["resolved"] > 200
    assert resumed - promoted <= 5.0
    assert writer.devices(200) and writer.devices(200) <= devices  # every acknowledged write is there
    assert not writer.devices(503) & devices  # "not written" was true
    assert {status for _at, _number, status in writer.results} <= {200, 503, 504}  # never a lie, never a crash
