"""Seen devices, activity, the query log and fleet-wide alerts (issue 13, items 1 to 3), through whole `bns
serve` nodes sharing a real Redis (or on their own, without one), asked by real DNS clients from devices
behind a trusted router (the MAC option)."""

from __future__ import annotations

import json
import random
import time
from contextlib import ExitStack
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest
import redis

from bench.dga import dga_names
from resolver.shared.dns import OptionCode
from tests.conftest import eventually
from tests.e2e.test_admin import ADMIN, READ, cli, http, node_config, start

pytestmark = pytest.mark.e2e

TABLET = "3c:22:fb:00:00:01"  # an Apple OUI
PHONE = "02:00:00:00:00:33"  # locally administered: a private (randomised) address
SITE = {
    "name": "Home",
    "networks": ["127.0.0.0/8"],
    "mode": "device",
    "timezone": "UTC",
    "groups": {"kids": {"name": "Kids", "policy": {"deny": ["bad.example"]}}},
    "devices": {"tablet": {"name": "Tablet", "macs": [TABLET], "group": "kids"}},
}


def ask(port: int, name: str, mac: str | None = None, rdtype: str = "A") -> dns.message.Message:
    options = [dns.edns.GenericOption(OptionCode.MAC, bytes.fromhex(mac.replace(":", "")))] if mac else []
    query = dns.message.make_query(name, rdtype, use_edns=0, options=options)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=3)


def devices(api: str, token: str = READ) -> dict[str, dict]:
    status, body = http(api, "GET", "/v1/sites/home/devices", token=token)
    assert status == 200, body
    return {device["key"]: device for device in body["devices"]}  # type: ignore[index]


def metric(api: str, name: str) -> float:
    text = http(api, "GET", "/metrics", token=READ)[1]
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))  # type: ignore[union-attr]


def until_listed(api: str, check, within: float = 20) -> dict[str, dict]:
    """The device list once `check(list)` holds (workers hand over every 5 s, the admin takes every 2 s)."""
    found: dict[str, dict] = {}

    def listed() -> bool:
        found.clear()
        found.update(devices(api))
        return bool(check(found))

    try:
        eventually(listed, within)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the devices listed last: {found}") from None
    return found


@pytest.fixture
def redis_store(shared_redis, redis_prefix) -> str:
    return f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"'


def config(path: Path, store: str, **activity: object) -> Path:
    """A node's configuration (its workers hand their counts over every half second)."""
    return node_config(path, store, activity)


def test_every_device_seen_is_listed_with_its_vendor_counts_and_activity_and_can_be_named(
    tmp_path, upstream, redis_store
):
    with ExitStack() as stack:
        port_a, api_a = start(stack, config(tmp_path / "a" / "bns.toml", redis_store), upstream)
        port_b, api_b = start(stack, config(tmp_path / "b" / "bns.toml", redis_store), upstream)
        assert http(api_a, "PUT", "/v1/sites/home", SITE)[0] == 200
        for name in ("fine.example", "www.fine.example", "bad.example"):
            ask(port_a, name, TABLET)
        ask(port_b, "fine.example", TABLET)  # the other node's count adds up
        ask(port_a, "fine.example", PHONE)
        ask(port_b, "fine.example")  # no MAC: the router's own address

        tablet_key, phone_key = f"mac:{TABLET}", f"mac:{PHONE}"
        seen = until_listed(
            api_b,
            lambda found: (
                found.get(tablet_key, {}).get("queries") == 4 and phone_key in found and "ip:127.0.0.1" in found
            ),
        )
        tablet = seen[tablet_key]
        assert (tablet["device"], tablet["name"], tablet["vendor"], tablet["group"]) == (
            "tablet",
            "Tablet",
            "Apple, Inc.",
            "kids",
        )
        assert tablet["blocked"] == 1 and tablet["online"] and tablet["status"] == "ok"
        assert tablet["first_seen"] <= tablet["last_seen"]
        phone = seen[phone_key]
        assert (phone["device"], phone["vendor"], phone["group"], phone["queries"]) == (
            None,
            "private address",
            None,
            1,
        )
        assert "device:tablet" not in seen  # a configured device that was seen is listed once

        status, activity = http(api_a, "GET", f"/v1/sites/home/activity?device={tablet_key}", token=READ)
        assert status == 200
        (hour,) = activity["hours"]  # type: ignore[index]
        assert (hour["queries"], hour["allowed"], hour["blocked"], hour["categories"]) == (4, 3, 1, {"deny": 1})
        assert activity["top_blocked"] == [{"name": "bad.example", "verdict": "blocked", "count": 1}]  # type: ignore[index]
        site_wide = http(api_a, "GET", "/v1/sites/home/activity", token=READ)[1]
        assert site_wide["hours"][0]["queries"] == 6  # type: ignore[index]

        # The subscriber names the phone and puts it with the kids: it is a configured device from then on.
        token = http(api_a, "POST", "/v1/sites/home/tokens", {"days": 1})[1]["token"]  # type: ignore[index]
        named = http(
            api_a,
            "PATCH",
            f"/v1/sites/home/devices/seen/{phone_key}",
            {"name": "Anna's phone", "group": "kids"},
            token=token,
        )
        assert named[0] == 200, named
        assert named[1]["devices"]["anna-s-phone"]["macs"] == [PHONE]  # type: ignore[index]
        eventually(lambda: ask(port_a, "bad.example", PHONE).rcode() == dns.rcode.NXDOMAIN, 2)
        renamed = http(api_a, "PATCH", f"/v1/sites/home/devices/seen/{phone_key}", {"name": "Anna"}, token=token)
        assert set(renamed[1]["devices"]) == {"tablet", "anna-s-phone"}  # type: ignore[index]
        assert http(api_a, "PATCH", "/v1/sites/home/devices/seen/nonsense", {"name": "x"})[0] == 422
        assert http(api_a, "PATCH", f"/v1/sites/home/devices/seen/{phone_key}", {"colour": "red"})[0] == 422
        assert devices(api_a, token)[phone_key]["name"] == "Anna"

        # Forgetting the record keeps the configured device, listed as never seen.
        assert http(api_a, "DELETE", f"/v1/sites/home/devices/seen/{phone_key}", token=token)[0] == 200
        after = devices(api_a)
        assert phone_key not in after and after["device:anna-s-phone"]["first_seen"] is None


def test_a_flood_of_random_macs_keeps_each_sites_device_list_bounded(tmp_path, upstream, redis_store):
    with ExitStack() as stack:
        port, api = start(stack, config(tmp_path / "n" / "bns.toml", redis_store, devices_per_site=20), upstream)
        assert http(api, "PUT", "/v1/sites/home", SITE)[0] == 200
        ask(port, "fine.example", TABLET)
        until_listed(api, lambda found: f"mac:{TABLET}" in found)
        generator = random.Random(7)
        for _ in range(150):
            ask(port, "fine.example", "02:" + ":".join(f"{generator.randrange(256):02x}" for _ in range(5)))

        seen = until_listed(api, lambda found: len(found) <= 20 and metric(api, "bns_devices_evicted_total") >= 130)
        assert f"mac:{TABLET}" in seen  # the configured tablet, the least recently seen, is kept


def test_the_query_log_is_opt_in_kept_for_its_retention_only_and_goes_with_the_site(
    tmp_path, upstream, shared_redis, redis_prefix, redis_store
):
    store = redis.Redis.from_url(shared_redis.url)
    with ExitStack() as stack:
        port, api = start(stack, config(tmp_path / "n" / "bns.toml", redis_store, query_log_hours=0.001), upstream)
        assert http(api, "PUT", "/v1/sites/home", SITE)[0] == 200
        ask(port, "private.example", TABLET)
        until_listed(api, lambda found: f"mac:{TABLET}" in found)
        assert http(api, "GET", "/v1/sites/home/queries", token=READ)[1] == {
            "enabled": False,
            "retention_hours": 0.001,
            "queries": [],
        }
        assert not store.exists(f"{redis_prefix}qlog:home")  # off: nothing was kept, not merely hidden

        assert http(api, "PATCH", "/v1/sites/home", {"query_log": True})[0] == 200
        logged: list = []

        def listed() -> bool:
            ask(port, "fine.example", TABLET)
            ask(port, "bad.example", TABLET, "AAAA")
            logged[:] = http(api, "GET", "/v1/sites/home/queries", token=READ)[1]["queries"]  # type: ignore[index]
            return {(q["name"], q["type"], q["verdict"]) for q in logged} >= {
                ("fine.example", "A", "allowed"),
                ("bad.example", "AAAA", "blocked"),
            }

        eventually(listed, 20)
        assert {query["device"] for query in logged} == {f"mac:{TABLET}"}

        # After the retention (3.6 s) the log is empty, and the entries are gone from Redis too.
        eventually(lambda: http(api, "GET", "/v1/sites/home/queries", token=READ)[1]["queries"] == [], 20)  # type: ignore[index]
        eventually(lambda: store.zcard(f"{redis_prefix}qlog:home") == 0, 15)

        ask(port, "fine.example", TABLET)
        eventually(lambda: store.exists(f"{redis_prefix}qlog:home"), 15)
        assert http(api, "DELETE", "/v1/sites/home")[0] == 200
        left = [key for key in store.scan_iter(f"{redis_prefix}*home*")]
        assert left == [], left


def test_alerts_are_kept_fleet_wide_and_counts_survive_a_redis_restart(tmp_path, upstream, own_redis, redis_prefix):
    store = f'[store]\nredis = "{own_redis.url}"\nprefix = "{redis_prefix}"'
    with ExitStack() as stack:
        port_a, api_a = start(stack, config(tmp_path / "a" / "bns.toml", store), upstream)
        _port_b, api_b = start(stack, config(tmp_path / "b" / "bns.toml", store), upstream)
        assert http(api_a, "PUT", "/v1/sites/home", SITE)[0] == 200
        names = dga_names()["necurs"][:5]
        for name in names:
            ask(port_a, name, TABLET)

        def alerted() -> bool:
            alerts = http(api_b, "GET", "/v1/sites/home/alerts", token=READ)[1]["alerts"]  # type: ignore[index]
            return {(alert["reason"], alert["device"]) for alert in alerts} == {("dga", f"mac:{TABLET}")} and len(
                alerts
            ) == 5

        eventually(alerted, 20)  # flagged by node A's workers, listed by node B

        until_listed(api_a, lambda found: found.get(f"mac:{TABLET}", {}).get("queries") == 5)
        own_redis.kill()
        for _ in range(3):
            ask(port_a, "fine.example", TABLET)  # served from memory meanwhile; counted and kept for later
        ask(port_a, "fine.example", PHONE)
        time.sleep(3)  # a few hand-overs, which the admin process cannot write
        own_redis.start()
        seen = until_listed(
            api_a, lambda found: found.get(f"mac:{TABLET}", {}).get("queries") == 8 and f"mac:{PHONE}" in found, 45
        )
        assert seen[f"mac:{PHONE}"]["queries"] == 1


def test_without_redis_a_single_node_lists_its_devices(tmp_path, upstream):
    with ExitStack() as stack:
        port, api = start(
            stack, config(tmp_path / "n" / "bns.toml", f'[store]\nfile = "{tmp_path / "policies.json"}"'), upstream
        )
        assert http(api, "PUT", "/v1/sites/home", SITE)[0] == 200
        ask(port, "bad.example", TABLET)
        seen = until_listed(api, lambda found: found.get(f"mac:{TABLET}", {}).get("blocked") == 1)
        assert seen[f"mac:{TABLET}"]["vendor"] == "Apple, Inc."
        listed = cli(api, "device", "seen", "home")
        assert listed.returncode == 0 and "Apple, Inc." in listed.stdout and f"mac:{TABLET}" in listed.stdout
        named = cli(api, "device", "name", "home", "ip:127.0.0.1", "--name", "Router", "--json")
        assert named.returncode == 0, named.stderr
        assert json.loads(named.stdout)["devices"]["router"]["addresses"] == ["127.0.0.1"]
        assert cli(api, "device", "name", "home", "nonsense", "--name", "x").returncode == 2
        local = cli(api, "device", "seen", "home", "--file", str(tmp_path / "policies.json"), token=None)
        assert local.returncode != 0 and "ask its API" in local.stderr
        assert http(api, "DELETE", "/v1/sites/home")[0] == 200
        assert http(api, "GET", "/v1/sites/home/devices", token=ADMIN)[0] == 404
