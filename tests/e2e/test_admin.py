"""The admin API and the `bns` commands that call it, against whole `bns serve` nodes (two sharing a real
Redis where the issue asks for it), with real DNS clients."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import threading
import urllib.error
import urllib.request
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from bench.dga import dga_names
from resolver.admin.api import ROUTES
from resolver.shared.dns import OptionCode
from tests.conftest import FIXTURES, eventually
from tests.e2e.test_process import bns, node

pytestmark = pytest.mark.e2e
ADMIN = "admin-token-for-tests-0001"
READ = "read-token-for-tests-00001"
MAC = "02:00:00:00:00:09"
GORE = "14words.com"  # in tests/fixtures/violence-gore.txt.gz
WEAPON = "ameetecarms.com"  # in tests/fixtures/weapons.txt.gz


def cli(api: str, *args: str, token: str | None = ADMIN) -> subprocess.CompletedProcess[str]:
    extra = ["--api", api] + (["--token", token] if token else [])
    return subprocess.run(bns(*args, *extra), capture_output=True, text=True, timeout=60)


def http(
    api: str, method: str, path: str, body: object = None, token: str | None = ADMIN, data: bytes | None = None
) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(api + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        payload, status = exc.read(), exc.code
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


def ede_text(port: int, name: str, mac: str | None = None) -> str | None:
    """The EDE text of the answer (None when the name was not blocked)."""
    options = [dns.edns.GenericOption(OptionCode.MAC, bytes.fromhex(mac.replace(":", "")))] if mac else []
    response = dns.query.udp(
        dns.message.make_query(name, "A", use_edns=0, options=options), "127.0.0.1", port=port, timeout=3
    )
    texts = [option.text for option in response.options if option.otype == dns.edns.OptionType.EDE]
    return texts[0] if texts and response.rcode() == dns.rcode.NXDOMAIN else None


def every_worker(port: int, name: str, expected: str | None, mac: str | None = None, tries: int = 12) -> bool:
    return all(ede_text(port, name, mac) == expected for _ in range(tries))


def node_config(path: Path, store: str, activity: dict[str, object] | None = None, **admin: object) -> Path:
    """A node's configuration; its workers hand their activity over every half second unless `activity` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in admin.items())
    extra += "[activity]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in {"hand_over_seconds": 0.5, **(activity or {})}.items()
    )
    path.write_text(
        f'{store}\n[lists]\ncache_dir = "{path.parent / "lists"}"\ncheck_interval = 0.2\n'
        f'[identity]\ntrusted_networks = ["127.0.0.1/32"]\n'
        f'[admin]\ntokens = ["{ADMIN}"]\nread_tokens = ["{READ}"]\n{extra}'
    )
    return path


def compiled(tmp_path: Path, category: str) -> Path:
    out = tmp_path / f"{category}.bns"
    result = subprocess.run(
        bns("lists", "compile", "--out", str(out), "--source", f"{category}={FIXTURES / f'{category}.txt.gz'}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


def start(stack: ExitStack, config: Path, upstream) -> tuple[int, str]:
    _process, port, api = stack.enter_context(
        node("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2")
    )
    assert api is not None
    return port, api


@pytest.fixture
def redis_store(shared_redis, redis_prefix) -> str:
    return f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"'


def test_a_list_pushed_through_one_node_is_served_by_every_node(tmp_path, upstream, redis_store):
    gore, weapons = compiled(tmp_path, "violence-gore"), compiled(tmp_path, "weapons")
    with ExitStack() as stack:
        port_a, api_a = start(stack, node_config(tmp_path / "a" / "bns.toml", redis_store), upstream)
        port_b, api_b = start(stack, node_config(tmp_path / "b" / "bns.toml", redis_store), upstream)
        assert ede_text(port_a, GORE) is None

        pushed = cli(api_a, "lists", "push", str(gore), "--json")
        assert pushed.returncode == 0, pushed.stderr
        version = json.loads(pushed.stdout)["version"]
        took = max(
            eventually(lambda port=port: every_worker(port, GORE, "blocked: violence-gore"), 5)
            for port in (port_a, port_b)
        )
        assert took < 5

        corrupt = tmp_path / "corrupt.bns"
        corrupt.write_bytes(gore.read_bytes()[:-100] + b"\x00" * 100)
        refused = cli(api_b, "lists", "push", str(corrupt))
        assert refused.returncode == 2 and "checksum" in refused.stderr
        garbage = tmp_path / "garbage.bns"
        garbage.write_bytes(b"not an artifact at all")
        assert cli(api_b, "lists", "push", str(garbage)).returncode == 2
        versions = json.loads(cli(api_b, "lists", "versions", "--json", token=READ).stdout)
        assert versions["current"] == version and len(versions["versions"]) == 1

        port_c, api_c = start(stack, node_config(tmp_path / "c" / "bns.toml", redis_store), upstream)
        eventually(lambda: every_worker(port_c, GORE, "blocked: violence-gore"), 5)

        assert cli(api_a, "lists", "push", str(weapons)).returncode == 0
        for port in (port_a, port_b, port_c):
            eventually(
                lambda port=port: every_worker(port, WEAPON, "blocked: weapons") and every_worker(port, GORE, None), 5
            )
        assert cli(api_c, "lists", "rollback", version).returncode == 0
        for port in (port_a, port_b, port_c):
            eventually(lambda port=port: every_worker(port, GORE, "blocked: violence-gore"), 5)
        assert cli(api_c, "lists", "rollback", "0123456789abcdef").returncode == 3


def test_a_pause_and_a_token_revocation_through_one_node_hold_on_both_at_once(tmp_path, upstream, redis_store):
    with ExitStack() as stack:
        port_a, api_a = start(stack, node_config(tmp_path / "a" / "bns.toml", redis_store), upstream)
        port_b, api_b = start(stack, node_config(tmp_path / "b" / "bns.toml", redis_store), upstream)
        made = cli(api_a, "site", "set", "home", "--network", "127.0.0.0/8", "--mode", "device")
        assert made.returncode == 0, made.stderr
        assert cli(api_a, "group", "set", "home", "kids").returncode == 0
        assert cli(api_a, "device", "set", "home", "tablet", "--mac", MAC, "--group", "kids").returncode == 0
        assert every_worker(port_a, "a.example", None, MAC) and every_worker(port_b, "a.example", None, MAC)

        assert cli(api_a, "device", "pause", "home", "tablet", "--for", "30m").returncode == 0
        for port in (port_a, port_b):
            assert eventually(lambda port=port: every_worker(port, "b.example", "paused", MAC), 1.5) <= 1.5
        assert every_worker(port_a, "b.example", None)  # another client of the site is not paused

        assert cli(api_a, "device", "unpause", "home", "tablet").returncode == 0
        for port in (port_a, port_b):
            eventually(lambda port=port: every_worker(port, "c.example", None, MAC), 1.5)

        # Site tokens are checked against Redis on every request: what one node does, the other sees at once.
        revoked, kept = (http(api_a, "POST", "/v1/sites/home/tokens", {"days": 1})[1] for _ in range(2))
        assert http(api_b, "GET", "/v1/sites/home", token=revoked["token"])[0] == 200  # type: ignore[index]
        assert http(api_a, "DELETE", f"/v1/sites/home/tokens/{revoked['id']}")[0] == 200  # type: ignore[index]
        assert http(api_b, "GET", "/v1/sites/home", token=revoked["token"])[0] == 401  # type: ignore[index]
        assert http(api_b, "GET", "/v1/sites/home", token=kept["token"])[0] == 200  # type: ignore[index]
        assert http(api_a, "DELETE", "/v1/sites/home")[0] == 200
        assert http(api_b, "GET", "/v1/sites/home/alerts", token=kept["token"])[0] == 401  # type: ignore[index]


@pytest.fixture
def file_node(tmp_path, upstream):
    config = node_config(
        tmp_path / "n" / "bns.toml",
        f'[store]\nfile = "{tmp_path / "policies.json"}"',
        max_upload=131072,
        webhook_allow=["127.0.0.0/8"],  # its webhook test's receiver is on this machine
    )
    with ExitStack() as stack:
        yield start(stack, config, upstream)


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [
        ("GET", "/v1/sites", None, 401),
        ("GET", "/v1/sites", "wrong-token-0000000000000", 401),
        ("GET", "/v1/sites", READ, 200),
        ("GET", "/health", None, 200),  # a probe's: the status alone
        ("GET", "/health", "wrong-token-0000000000000", 401),
        ("GET", "/metrics", READ, 200),
        ("PUT", "/v1/sites/x", READ, 403),
        ("POST", "/v1/lists/rollback", READ, 403),
        ("PUT", "/v1/sites/x", ADMIN, 200),
    ],
)
def test_auth_matrix(file_node, method, path, token, status):
    _port, api = file_node
    got, body = http(api, method, path, {} if method != "GET" else None, token=token)
    assert got == status
    if status >= 400:
        assert body["error"]["status"] == status and body["error"]["message"]


def test_health_tells_a_probe_the_status_and_a_token_why(file_node):
    """Issue 19: /health wanted a token, so no load balancer or container probe could use it."""
    _port, api = file_node
    assert http(api, "GET", "/health", token=None) == (200, {"status": "ok"})
    status, details = http(api, "GET", "/health", token=READ)
    assert status == 200 and details["status"] == "ok" and details["store"] == "up"
    assert {"ready", "lists_version", "uptime"} <= set(details)
    operation = http(api, "GET", "/openapi.json", token=READ)[1]["paths"]["/health"]["get"]
    assert operation["x-role"] == "public" and {} in operation["security"]


def test_a_site_token_outlives_a_restart_of_a_node_without_redis_or_pages_secret(tmp_path, upstream):
    """Issue 19: without Redis and pages.secret, site tokens were signed with a key made per run, so every
    subscriber's link died at the node's next restart, and nothing said so. The key is made once, kept in the
    node's cache directory (0600), and said so. The policy file's relative path is the config file's (issue 19
    too): the CLI run from elsewhere with --config reads the store the node writes."""
    config = node_config(tmp_path / "n" / "bns.toml", '[store]\nfile = "policies.json"')
    args = ("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "1")
    with node(*args) as (process, _port, api):
        assert http(api, "PUT", "/v1/sites/home", {"mode": "device"})[0] == 200
        status, issued = http(api, "POST", "/v1/sites/home/tokens", {"days": 30})
        assert status == 200 and http(api, "GET", "/v1/sites/home", token=issued["token"])[0] == 200
        assert f"made the key that signs site tokens and continue tokens, kept in {tmp_path}" in process.log
    key = tmp_path / "n" / "lists" / "pages.key"
    assert key.stat().st_mode & 0o777 == 0o600
    shown = subprocess.run(
        bns("site", "show", "--config", str(config)), capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert shown.returncode == 0 and "home" in shown.stdout, shown.stderr
    with node(*args) as (process, _port, api):
        assert http(api, "GET", "/v1/sites/home", token=issued["token"])[0] == 200
        assert "made the key" not in process.log


def test_cli_exit_codes_say_what_happened(file_node):
    _port, api = file_node
    assert cli(api, "site", "show", token=None).returncode == 4
    assert cli(api, "site", "set", "x", "--mode", "device", token=READ).returncode == 4
    assert cli(api, "site", "show", "ghost").returncode == 3
    refused = cli(api, "device", "set", "ghost", "tv", "--mac", "zz")
    assert refused.returncode == 3
    assert cli(api, "site", "set", "home", "--network", "127.0.0.0/8").returncode == 0
    refused = cli(api, "device", "set", "home", "tv", "--mac", "zz")
    assert refused.returncode == 2 and "devices.tv.macs[0]" in refused.stderr
    assert cli("http://127.0.0.1:9", "site", "show").returncode == 1
    shown = cli(api, "site", "show", "home")
    assert shown.returncode == 0 and "127.0.0.0/8" in shown.stdout


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("PUT", "/v1/sites/home/devices/tv", {"macs": ["nope"]}, 422, "devices.tv.macs[0]"),
        ("PUT", "/v1/sites/home/policy", {"block": ["gambling"]}, 422, "policy.block[0]"),
        ("PUT", "/v1/sites/home/groups/kids/policy", {"schedules": [{"name": "x"}]}, 404, None),
        ("PUT", "/v1/sites/home/policy", {"schedules": [{"name": "x"}]}, 422, "policy.schedules[0].days"),
        ("PUT", "/v1/sites/home/policy", {"answer": "silence"}, 422, "policy.answer"),
        ("PATCH", "/v1/sites/home", {"timezone": "Mars/Olympus"}, 422, "timezone"),
        ("PATCH", "/v1/sites/home", {"networks": ["10.0.0.0/33"]}, 422, "networks[0]"),
        ("PATCH", "/v1/sites/home", {"colour": "red"}, 422, "colour"),
        ("PUT", "/v1/sites/home/devices/tv", {"group": "nobody"}, 422, "devices.tv.group"),
        ("POST", "/v1/sites/home/pause", {"minutes": -5}, 422, "minutes"),
        ("POST", "/v1/sites/home/pause", {"until": "tomorrow"}, 422, "until"),
        ("POST", "/v1/sites/home/devices/ghost/pause", {}, 404, None),
        ("PATCH", "/v1/sites/ghost", {"mode": "device"}, 404, None),
        ("POST", "/v1/why", {"address": "127.0.0.1"}, 422, "name"),
        ("POST", "/v1/why", {"name": "a.example", "address": "127.0.0.1", "mac": "zz"}, 422, "mac"),
        ("POST", "/v1/lists/rollback", {}, 422, "version"),
        ("POST", "/v1/lists/rollback", {"version": "feedfeedfeedfeed"}, 404, None),
    ],
)
def test_every_resource_refuses_bad_writes_naming_the_field(file_node, method, path, body, status, field):
    _port, api = file_node
    assert http(api, "PUT", "/v1/sites/home", {"networks": ["127.0.0.0/8"], "mode": "device"})[0] == 200
    before = http(api, "GET", "/v1/sites/home")[1]
    got, answer = http(api, method, path, body)
    assert got == status, answer
    if field is not None:
        assert answer["error"]["field"] == field
    assert http(api, "GET", "/v1/sites/home")[1] == before  # nothing half-written


def test_bad_json_and_oversized_uploads_are_refused(file_node):
    _port, api = file_node
    got, answer = http(api, "PUT", "/v1/sites/home", data=b"{not json")
    assert got == 422 and "not JSON" in answer["error"]["message"]
    got, answer = http(api, "POST", "/v1/lists", data=b"x" * 140_000)
    assert got == 413 and "max_upload" in answer["error"]["message"]


def test_without_redis_publish_swaps_the_local_list(file_node, tmp_path):
    _port, api = file_node
    small = tmp_path / "small.bns"
    result = subprocess.run(
        bns(
            "lists",
            "compile",
            "--out",
            str(small),
            "--source",
            f"drugs={FIXTURES / 'formats' / 'blocklistproject-drugs.dnsmasq.conf'}",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got, answer = http(api, "POST", "/v1/lists", data=small.read_bytes())
    assert got == 201, answer
    eventually(lambda: http(api, "GET", "/health", token=READ)[1]["lists_version"] == answer["version"], 5)
    assert http(api, "GET", "/v1/lists", token=READ)[1]["current"] == answer["version"]


def test_the_openapi_document_lists_exactly_the_routes_served(file_node):
    _port, api = file_node
    got, document = http(api, "GET", "/openapi.json", token=READ)
    assert got == 200 and document["openapi"].startswith("3.")
    served = {(route.method.lower(), route.path) for route in ROUTES}
    documented = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert served == documented
    for route in ROUTES:  # and each one answers (not 404/405) with an admin token
        path = route.path.replace("{site}", "home").replace("{group}", "g").replace("{device}", "d")
        path = path.replace("{profile}", "p")
        got, _ = http(api, route.method, path, {} if route.method != "GET" else None)
        assert got not in (405,) and (got != 404 or "{" in route.path), (route.method, route.path, got)


def test_why_agrees_with_the_answers(tmp_path, upstream, redis_store):
    gore = compiled(tmp_path, "violence-gore")
    with ExitStack() as stack:
        port, api = start(stack, node_config(tmp_path / "a" / "bns.toml", redis_store), upstream)
        assert cli(api, "lists", "push", str(gore)).returncode == 0
        eventually(lambda: every_worker(port, GORE, "blocked: violence-gore"), 5)
        site = {
            "networks": ["127.0.0.0/8"],
            "mode": "device",
            "default_group": "others",
            "groups": {
                "kids": {
                    "policy": {"block": ["violence-gore"], "deny": ["games.example"], "allow": ["ok.14words.com"]}
                },
                "others": {"policy": {"block": []}},
            },
            "devices": {"tablet": {"macs": [MAC], "group": "kids"}},
        }
        assert http(api, "PUT", "/v1/sites/home", site)[0] == 200
        for mac in (MAC, None):
            for name in (GORE, "www." + GORE, "ok.14words.com", "games.example", "x.games.example", "a.example"):
                seen: list[tuple[object, ...]] = []

                def agreed(name: str = name, mac: str | None = mac, seen: list = seen) -> bool:
                    answered = ede_text(port, name, mac)
                    asked = {"name": name, "address": "127.0.0.1", **({"mac": mac} if mac else {})}
                    why = http(api, "POST", "/v1/why", asked, token=READ)[1]
                    verdict = why["ede_text"] if why["verdict"] == "blocked" else None
                    seen.append((name, mac, verdict, answered))
                    return verdict == answered

                try:
                    eventually(agreed, 2)
                except AssertionError:
                    raise AssertionError(f"why and the answer disagree: {seen[-1]}") from None
        why = http(api, "POST", "/v1/why", {"name": "x.games.example", "address": "127.0.0.1", "mac": MAC})[1]
        assert (why["level"], why["rule"], why["entry"], why["device"]) == ("group", "deny", "games.example", "tablet")
        why = http(api, "POST", "/v1/why", {"name": "www." + GORE, "address": "127.0.0.1", "mac": MAC})[1]
        assert (why["rule"], why["entry"], why["categories"]) == ("category", GORE, ["violence-gore"])
        counted = 'bns_queries_total{verdict="blocked",category="violence-gore",reason=""}'
        eventually(lambda: counted in http(api, "GET", "/metrics", token=READ)[1], 3)  # counters: every second
        metrics = http(api, "GET", "/metrics", token=READ)[1]
        assert "bns_store_up 1" in metrics


def test_the_admin_process_yields_the_cpu_to_the_workers_without_starving(tmp_path, upstream):
    """Issue 19: under SCHED_IDLE the admin process got no CPU while the workers took every core, and /health,
    the API and the app starved (p99 of /health 1.9 s against a busy worker, bench/admin_load.py); niced, it
    answers within tens of milliseconds and the workers still come first."""
    config = node_config(tmp_path / "n" / "bns.toml", f'[store]\nfile = "{tmp_path / "policies.json"}"')
    with node("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2") as (
        process,
        _port,
        api,
    ):
        assert http(api, "GET", "/health", token=READ)[0] == 200
        children = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        admin = children[-1]  # spawned after the workers
        assert os.sched_getscheduler(admin) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, admin) == 10
        assert all(os.sched_getscheduler(worker) == os.SCHED_OTHER for worker in children[:-1])


def test_site_import_and_profile_deletion_through_the_api(file_node):
    _port, api = file_node
    sites = [{"id": "i1", "networks": ["192.0.2.0/25"]}, {"id": "i2", "networks": ["192.0.2.128/25"]}]
    assert http(api, "POST", "/v1/sites", sites) == (200, {"imported": 2})
    status, listed = http(api, "GET", "/v1/sites")
    assert status == 200 and {"i1", "i2"} <= set(listed)  # type: ignore[arg-type]
    clash = [{"id": "i3", "networks": ["192.0.2.0/25"]}]  # i1's network: the whole import is refused
    status, body = http(api, "POST", "/v1/sites", clash)
    assert status == 422 and "i1" in body["error"]["message"]  # type: ignore[index]
    assert http(api, "GET", "/v1/sites/i3")[0] == 404
    assert http(api, "PUT", "/v1/profiles/strict", {"deny": ["bad.example"]})[0] == 200
    site = {
        "networks": ["192.0.2.0/25"],
        "mode": "device",
        "default_group": "g",
        "groups": {"g": {"policy": {"profile": "strict"}}},
    }
    assert http(api, "PUT", "/v1/sites/i1", site)[0] == 200
    question = {"name": "bad.example", "address": "192.0.2.5"}
    assert http(api, "POST", "/v1/why", question)[1]["verdict"] == "blocked"  # type: ignore[index]
    assert http(api, "DELETE", "/v1/profiles/strict")[0] == 200
    assert http(api, "POST", "/v1/why", question)[1]["verdict"] == "allowed"  # type: ignore[index]


def test_a_sites_threat_alerts_are_listed_and_counted(file_node):
    port, api = file_node
    site = {"name": "Shop", "networks": ["127.0.0.0/8"], "mode": "device", "timezone": "UTC"}
    assert http(api, "PUT", "/v1/sites/shop", site)[0] == 200
    names = dga_names()["necurs"][:10]
    for name in names:
        dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=3)

    alerts: list = []

    def listed() -> bool:
        status, body = http(api, "GET", "/v1/sites/shop/alerts", token=READ)
        alerts[:] = body["alerts"]  # type: ignore[index]
        return status == 200 and len(alerts) >= 9  # each worker hands its alerts over every 5 s

    eventually(listed, 15)
    assert {alert["reason"] for alert in alerts} == {"dga"} and {alert["site"] for alert in alerts} == {"shop"}
    assert {alert["name"] for alert in alerts} <= set(names) and alerts[0]["at"] >= alerts[-1]["at"]
    assert http(api, "GET", "/v1/sites/elsewhere/alerts", token=READ) == (200, {"alerts": []})

    def counted() -> bool:  # the workers' counters (every second) and their hand-overs agree
        kept = http(api, "GET", "/v1/sites/shop/alerts", token=READ)[1]["alerts"]  # type: ignore[index]
        return f'bns_threat_alerts_total{{reason="dga"}} {len(kept)}' in http(api, "GET", "/metrics", token=READ)[1]  # type: ignore[operator]

    eventually(counted, 10)


PATH_VALUES = {
    "site": "home",
    "group": "kids",
    "device": "tablet",
    "profile": "p",
    "category": "drugs",
    "key": "ip:192.0.2.1",
    "id": "t",
}


def allowed_for(route, who: str) -> bool:
    if who == "operator":
        return True
    if who == "read-only":
        return route.role in ("read", "public")
    if who == "own site":
        return route.subscriber
    return route.subscriber and "{site}" not in route.path  # another site's token: nothing of this site


def test_every_route_with_operator_read_only_own_site_and_other_site_credentials(file_node):
    _port, api = file_node
    for site in ("home", "other"):
        assert http(api, "PUT", f"/v1/sites/{site}", {"networks": [], "mode": "device", "timezone": "UTC"})[0] == 200
    tokens = {
        site: http(api, "POST", f"/v1/sites/{site}/tokens", {"days": 1})[1]["token"] for site in ("home", "other")
    }
    credentials = {"other site": tokens["other"], "own site": tokens["home"], "read-only": READ, "operator": ADMIN}
    routes = sorted(ROUTES, key=lambda route: route.method == "DELETE" and route.path == "/v1/sites/{site}")
    seen = []
    for who, token in credentials.items():  # the operator last: its deletes must not hide the others' verdicts
        for route in routes:
            path = route.path
            for name, value in PATH_VALUES.items():
                path = path.replace("{" + name + "}", value)
            path = path.replace("{source}", "s").replace("{job}", "j")
            status, body = http(api, route.method, path, None if route.method == "GET" else {}, token=token)
            seen.append((who, route.method, route.path, status))
            if allowed_for(route, who):
                assert status not in (401, 403), (who, route.method, route.path, status, body)
            else:
                assert status == 403, (who, route.method, route.path, status, body)
    assert len(seen) == 4 * len(ROUTES)


def test_a_site_token_pauses_its_own_device_and_nothing_else(file_node):
    port, api = file_node
    site = {"networks": ["127.0.0.0/8"], "mode": "device", "timezone": "UTC", "devices": {"tablet": {"macs": [MAC]}}}
    assert http(api, "PUT", "/v1/sites/home", site)[0] == 200
    token = http(api, "POST", "/v1/sites/home/tokens", {"days": 1})[1]["token"]
    assert http(api, "POST", "/v1/sites/home/devices/tablet/pause", {"minutes": 30}, token=token)[0] == 200
    assert eventually(lambda: every_worker(port, "fine.example", "paused", mac=MAC), 2) < 2
    assert http(api, "PUT", "/v1/sites/home", site, token=token)[0] == 403  # networks are the operator's
    assert http(api, "GET", "/v1/sites", token=token)[0] == 403
    assert http(api, "GET", "/v1/sites/home", token=token + "x")[0] == 401  # tampered
    assert http(api, "POST", "/v1/sites/home/tokens", {"days": 400})[0] == 422
    assert http(api, "POST", "/v1/sites/nowhere/tokens", {"days": 1})[0] == 404


def test_a_site_token_outlives_neither_its_site_nor_its_revocation(file_node):
    """Issue 18: a token kept after its site was deleted read the site's alerts, then those of the site made
    again under its id for another subscriber, and paused that one's camera."""
    _port, api = file_node
    charlie = {"networks": [], "mode": "device", "devices": {"camera": {"macs": [MAC]}}}
    assert http(api, "PUT", "/v1/sites/charlie", charlie)[0] == 200
    made = cli(api, "site", "token", "charlie", "--days", "2", "--json")
    assert made.returncode == 0, made.stderr
    issued = json.loads(made.stdout)
    assert set(issued) == {"site", "token", "id", "expires"}
    old = issued["token"]
    assert http(api, "GET", "/v1/sites/charlie/alerts", token=old) == (200, {"alerts": []})
    bad = http(api, "GET", "/v1/sites/charlie/alerts", token="site.forged.mac")
    assert bad[0] == 401
    assert http(api, "DELETE", "/v1/sites/charlie")[0] == 200
    assert http(api, "GET", "/v1/sites/charlie/alerts", token=old) == bad  # as any bad token: nothing more
    assert http(api, "PUT", "/v1/sites/charlie", charlie)[0] == 200  # another subscriber's charlie
    assert http(api, "GET", "/v1/sites/charlie", token=old) == bad
    assert http(api, "POST", "/v1/sites/charlie/devices/camera/pause", {"minutes": 30}, token=old) == bad
    assert http(api, "GET", "/v1/sites/charlie")[1]["devices"]["camera"]["paused_until"] is None  # type: ignore[index]

    shown = cli(api, "site", "token", "charlie")  # for people: the expiry in ISO, and the app's sign-in link
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines["expires"]), lines
    assert lines["link"] == f"{api}/app/#token={lines['token']}"
    kept = http(api, "POST", "/v1/sites/charlie/tokens", {})[1]
    listed = http(api, "GET", "/v1/sites/charlie/tokens", token=READ)[1]["tokens"]  # type: ignore[index]
    assert sorted(token["id"] for token in listed) == sorted([lines["id"], kept["id"]])  # type: ignore[index]
    revoked = cli(api, "site", "token", "revoke", "charlie", lines["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert http(api, "GET", "/v1/sites/charlie", token=lines["token"]) == bad
    assert http(api, "GET", "/v1/sites/charlie", token=kept["token"])[0] == 200  # type: ignore[index]
    gone = cli(api, "site", "token", "revoke", "charlie", lines["id"])
    assert gone.returncode == 3 and "no live token" in gone.stderr
    assert cli(api, "site", "token", "charlie", "too-many").returncode == 2


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[bytes, str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append((body, self.headers["X-BNS-Signature"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        return None


def test_a_sites_alerts_reach_its_webhook_signed(file_node):
    port, api = file_node
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        secret = "webhook-secret-for-tests"
        url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
        site = {"networks": ["127.0.0.0/8"], "mode": "device", "webhook": {"url": url, "secret": secret}}
        assert http(api, "PUT", "/v1/sites/shop", site)[0] == 200
        assert http(api, "PUT", "/v1/sites/shop", {**site, "webhook": {"url": "ftp://x", "secret": secret}}) == (
            422,
            {"error": {"status": 422, "field": "webhook.url", "message": "must be an http:// or https:// URL"}},
        )
        names = dga_names()["ramnit"][:5]
        for name in names:
            dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=3)
        eventually(lambda: sum(len(json.loads(body)["alerts"]) for body, _ in _Hook.received) >= 4, 10)
        for body, signature in _Hook.received:
            assert signature == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert json.loads(body)["site"] == "shop"
    finally:
        server.shutdown()
