"""The `bns` command line's grammar as a user runs it: whole processes, straight to an embedded store where they
can (no node), and through one node's admin API for what only the API answers (alerts, activity, lists).

Every command is a noun then a verb, prints JSON with `--json`, and refuses bad input with exit 2 and a message
naming it, never a traceback. The old spellings still work for a release, saying what replaced them."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from bench.dga import dga_names
from blocklists.catalog import load_catalog
from resolver.shared.store.file_policies import FileStore
from tests.conftest import FIXTURES, Script, ScriptedUpstream, eventually
from tests.e2e.test_admin import ADMIN, READ, cli, http, node_config
from tests.e2e.test_process import bns, node

pytestmark = pytest.mark.e2e
MAC, OTHER_MAC = "02:00:00:00:00:07", "02:00:00:00:00:08"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"  # a time as people read it, to the second
EPOCH = re.compile(r"\b1\d{9}\.\d+")  # a time as people do not
DRUGS = FIXTURES / "formats" / "blocklistproject-drugs.dnsmasq.conf"
SITE = {
    "id": "home",
    "networks": ["192.0.2.0/24"],
    "mode": "device",
    "policy": {"block": ["drugs"]},
    "groups": {"kids": {"name": "Kids", "paused_until": "forever"}},
    "devices": {"tablet": {"macs": [MAC], "group": "kids"}, "tv": {"macs": [OTHER_MAC]}},
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(bns(*args), capture_output=True, text=True, timeout=60)


def store(policies: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command straight to the embedded store `policies` (no API)."""
    return run(*args, "--file", str(policies))


def document(policies: Path, *args: str) -> Any:
    """The JSON a command prints, straight to the store; it must succeed and say nothing on stderr."""
    result = store(policies, *args, "--json")
    assert result.returncode == 0 and not result.stderr, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def policies(tmp_path) -> Path:
    """An embedded store holding SITE, written here (`site import` is tested with the other verbs)."""
    path = tmp_path / "policies.json"

    async def write() -> None:
        store = FileStore(path, load_catalog())
        await store.import_sites([SITE])
        await store.close()

    asyncio.run(write())
    return path


def test_every_noun_and_verb_straight_to_the_store(policies):
    """site, group, device, policy, profile and why: each verb once, by its JSON."""
    assert document(policies, "group", "set", "home", "teens", "--name", "Teens")["groups"]["teens"]["name"] == "Teens"
    phone = document(policies, "device", "set", "home", "phone", "--mac", "02:00:00:00:00:09", "--group", "teens")
    assert phone["devices"]["phone"]["group"] == "teens"
    soon = time.time()
    tablet = document(policies, "device", "pause", "home", "tablet", "--for", "30m")["devices"]["tablet"]
    assert re.fullmatch(ISO, tablet["paused_until"]) and tablet["paused_until"] > time_text(soon + 29 * 60)
    kids = document(policies, "group", "pause", "home", "kids", "--until", "2099-01-01T00:00:00Z")["groups"]["kids"]
    assert kids["paused_until"] == "2099-01-01T00:00:00Z"
    assert document(policies, "site", "pause", "home")["paused_until"] == "forever"
    assert document(policies, "site", "unpause", "home")["paused_until"] is None
    assert document(policies, "group", "unpause", "home", "kids")["groups"]["kids"]["paused_until"] is None
    assert document(policies, "device", "unpause", "home", "tablet")["devices"]["tablet"]["paused_until"] is None

    denied = document(policies, "policy", "set", "home", "--device", "tv", "--policy", '{"deny": ["cdn.bad.example"]}')
    assert denied["devices"]["tv"]["policy"]["deny"] == ["cdn.bad.example"]
    why = document(
        policies,
        "why",
        "www.example.org",
        "--address",
        "192.0.2.9",
        "--mac",
        OTHER_MAC,
        "--cnames",
        "a.cdn.bad.example",
    )  # the README's `--cnames`: the chain an upstream answered with is judged too
    assert (why["verdict"], why["rule"], why["via"], why["device"]) == ("blocked", "deny", "a.cdn.bad.example", "tv")
    assert document(policies, "policy", "clear", "home", "--device", "tv")["devices"]["tv"]["policy"] is None
    assert document(policies, "profile", "set", "strict", "--policy", '{"block": ["drugs"]}') == {
        "deleted": False,
        "profile": "strict",
    }
    assert document(policies, "profile", "delete", "strict")["deleted"] is True
    assert document(policies, "site", "query-log", "home", "on")["query_log"] is True
    assert document(policies, "site", "query-log", "home", "off")["query_log"] is False
    assert set(document(policies, "group", "delete", "home", "kids")["groups"]) == {"teens"}
    assert "tv" not in document(policies, "device", "delete", "home", "tv")["devices"]
    assert document(policies, "why", "www.example.org", "--address", "192.0.2.9", "--mac", OTHER_MAC)["device"] is None
    assert document(policies, "site", "delete", "home") == {"deleted": "home"}
    sites = policies.parent / "sites.jsonl"
    sites.write_text(json.dumps(SITE) + "\n" + json.dumps({**SITE, "id": "shop", "networks": []}) + "\n")
    assert document(policies, "site", "import", str(sites)) == {"imported": 2}
    assert document(policies, "site", "show") == ["home", "shop"]


def time_text(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def test_what_people_read(policies):
    """Issue 19: `bns pause` printed the site, not the pause it made; `site show` joined devices with "," and
    no space; `bns why` printed epoch floats."""
    paused = store(policies, "device", "pause", "home", "tablet", "--for", "1h")
    assert paused.returncode == 0, paused.stderr
    assert re.fullmatch(rf"site +home\ndevice +tablet\npaused_until +{ISO}\n", paused.stdout), paused.stdout
    assert paused.stdout.split()[-1] >= time_text(time.time() + 3590)
    group = store(policies, "group", "unpause", "home", "kids")
    assert re.fullmatch(r"site +home\ngroup +kids\npaused_until +not paused\n", group.stdout), group.stdout

    shown = store(policies, "site", "show", "home").stdout
    assert f"tablet ({MAC}; group kids), tv ({OTHER_MAC}; group -)" in shown, shown
    why = store(policies, "why", "www.example.org", "--address", "192.0.2.9").stdout
    assert re.search(rf"^at +{ISO}$", why, re.MULTILINE) and re.search(rf"^valid_until +{ISO}$", why, re.MULTILINE)
    assert not EPOCH.search(why), why


@pytest.mark.parametrize(
    ("old", "note", "done"),
    [
        (
            ["pause", "home", "--device", "tablet", "--until", "2099-01-01T00:00:00Z"],
            "bns pause is now bns device|group|site pause",
            lambda site: site["devices"]["tablet"]["paused_until"] == "2099-01-01T00:00:00Z",
        ),
        (
            ["unpause", "home", "--group", "kids"],
            "bns unpause is now bns device|group|site unpause",
            lambda site: site["groups"]["kids"]["paused_until"] is None,
        ),
        (
            ["policy", "home", "--group", "kids", "--policy", '{"deny": ["x.example"]}'],
            "bns policy is now bns policy set|clear",
            lambda site: site["groups"]["kids"]["policy"]["deny"] == ["x.example"],
        ),
        (["policy", "home", "--clear"], "bns policy is now bns policy set|clear", lambda site: site["policy"] is None),
        (
            ["profile", "strict", "--policy", "{}"],
            "bns profile is now bns profile set|delete",
            lambda answer: answer == {"profile": "strict", "deleted": False},
        ),
        (
            ["profile", "strict", "--delete"],
            "bns profile is now bns profile set|delete",
            lambda answer: answer == {"profile": "strict", "deleted": True},
        ),
    ],
)
def test_an_old_spelling_still_works_and_says_what_replaced_it(policies, old, note, done):
    answered = store(policies, *old, "--json")
    assert answered.returncode == 0, answered.stderr
    assert answered.stderr == f"bns: {note}; this spelling goes in the next release\n"
    assert done(json.loads(answered.stdout)), answered.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Issue 19, defect 5: a raw traceback straight to the store, a 500 through the API.
        (["why", "x.com", "--address", "junk"], "address: 'junk' is not an IP address"),
        (["why", "x.com", "--address", "999.1.1.1"], "address: '999.1.1.1' is not an IP address"),
        (["why", "x.com", "--address", "127.0.0.1/24"], "address: '127.0.0.1/24' is not an IP address"),
        (["why", "x.com", "--address", "192.0.2.7", "--mac", "zz"], "mac: 'zz' is not a MAC address"),
        (["why", "x.com", "--address", "192.0.2.7", "--client-id", ""], "client_id: must be text"),
        (["why", "x.com", "--address", "192.0.2.7", "--cpe-id", "x" * 300], "cpe_id: must be text"),
        (["why", "x.com", "--address", "192.0.2.7", "--at", "forever"], "at: 'forever' is not a time"),
        (["why", "x.com", "--address", "192.0.2.7", "--at", "0001-01-01T00:00:00Z"], "at: '0001-01-01T00:00:00Z'"),
        # Issue 19, defect 6: a pause that has ended exited 0 and did nothing.
        (
            ["device", "pause", "home", "tablet", "--until", "2020-01-01T00:00:00Z"],
            "until: 2020-01-01T00:00:00Z has passed",
        ),
        (["pause", "home", "--device", "tablet", "--until", "2020-01-01T00:00:00Z"], "until: 2020-01-01T00:00:00Z"),
        (["group", "pause", "home", "kids", "--for", "0m"], "--for '0m': expected a number above 0"),
        (["site", "import", "missing.jsonl"], "site import missing.jsonl: No such file or directory"),
        (["policy", "set", "home", "--policy-file", "missing.json"], "--policy-file missing.json: No such file"),
        (["policy", "set", "home", "--policy", "{"], "--policy: not valid JSON"),
        (["activity", "home"], "without Redis, what devices did"),
    ],
)
def test_bad_input_is_refused_naming_it_without_a_traceback(policies, args, message):
    before = policies.read_text()
    refused = store(policies, *args)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert policies.read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["site", "show", "--redis", "not-a-url"], "store.redis: 'not-a-url'"),
        (["site", "show", "--api", "not-a-url"], "'not-a-url' (--api or $BNS_API) is not an http"),
        (["lists", "push", "missing.bns", "--api", "http://127.0.0.1:9"], "missing.bns: No such file or directory"),
        (["lists", "source", "add", "drugs", ".", "--api", "http://127.0.0.1:9"], ".: Is a directory"),
        (["lists", "compile", "--out", "/nonexistent/x.bns", "--source", f"drugs={DRUGS}"], "/nonexistent is not a"),
    ],
)
def test_bad_flags_are_refused_naming_them_without_a_traceback(args, message):
    refused = run(*args)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["config"],
        ["lists", "compile", "--out", "{tmp}/x.bns", "--source", f"drugs={DRUGS}"],
    ],
)
def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path, args):
    """Issue 19: `bns config | head -1` ended in a BrokenPipeError traceback. Here the reader is gone before the
    command writes anything: it ends as a command killed by SIGPIPE does (141), saying nothing."""
    words = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    process = subprocess.Popen(bns(*words), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    errors = process.stderr.read()
    assert process.wait(60) == 141, errors
    assert errors == ""


def test_lists_compile_and_show_print_json(tmp_path):
    out = tmp_path / "drugs.bns"
    compiled = run("lists", "compile", "--out", str(out), "--source", f"drugs={DRUGS}", "--json")
    assert compiled.returncode == 0, compiled.stderr
    report = json.loads(compiled.stdout)
    assert report["per_category"]["drugs"] == report["names"] > 4000 and report["sources"][0]["format"] == "dnsmasq"
    shown = run("lists", "show", str(out), "--match", "example.org", "--json")
    assert shown.returncode == 0, shown.stderr
    header = json.loads(shown.stdout)
    assert header["version"] == report["version"] and header["categories"]["drugs"]["count"] == report["names"]
    assert header["matches"] == [{"name": "example.org", "allowed": False, "categories": [], "via": None}]


def test_config_prints_json(tmp_path):
    listed = json.loads(run("config", "--json").stdout)
    assert {"key": "server.workers", "default": "0"}.items() <= next(
        setting for setting in listed if setting["key"] == "server.workers"
    ).items()
    good = tmp_path / "good.toml"
    good.write_text("[cache]\nsize = 5\n")
    checked = json.loads(run("config", "--check", str(good), "--json").stdout)
    assert {"file": str(good), "valid": True}.items() <= checked.items() and "lists" in checked


def test_alerts_and_activity_straight_to_redis(tmp_path, shared_redis, redis_prefix):
    config = tmp_path / "bns.toml"
    config.write_text(f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"\n')
    assert run("site", "set", "home", "--config", str(config)).returncode == 0
    assert run("alerts", "home", "--config", str(config)).stdout == "(none)\n"
    shown = run("activity", "home", "--config", str(config), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout) == {"hours": [], "top_blocked": []}, shown.stderr
    refused = run("activity", "home", "--hours", "0", "--config", str(config))
    assert refused.returncode == 2 and "hours: must be a number of hours from 1 to 168" in refused.stderr
    assert run("activity", "ghost", "--config", str(config)).returncode == 3


# --- through one node's admin API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[tuple[int, str]]:
    """One node for the module (its DNS port and its admin API), over an embedded store."""
    directory = tmp_path_factory.mktemp("cli-node")
    config = node_config(directory / "bns.toml", f'[store]\nfile = "{directory / "policies.json"}"')
    with (
        ScriptedUpstream(script=Script(ttl=300)) as upstream,
        node(
            "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "1",
            token=ADMIN,
        ) as (_process, port, admin),
    ):  # fmt: skip
        assert admin is not None
        yield port, admin


def test_alerts_activity_and_the_query_log_through_the_api(api):
    """What only the API could answer is a command now: `bns alerts`, `bns activity`, `bns site query-log`."""
    port, admin = api
    assert cli(admin, "site", "set", "shop", "--network", "127.0.0.0/8", "--mode", "device").returncode == 0
    names = dga_names()["necurs"][:10]
    for name in names:
        dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=3)

    def handed_over() -> bool:  # polled through the API: a command per poll would cost more than it tells
        alerts = http(admin, "GET", "/v1/sites/shop/alerts")[1]["alerts"]  # type: ignore[index]
        hours = http(admin, "GET", "/v1/sites/shop/activity")[1]["hours"]  # type: ignore[index]
        return len(alerts) >= 5 and sum(hour["queries"] for hour in hours) >= len(names)

    eventually(handed_over, 15)
    listed = json.loads(cli(admin, "alerts", "shop", "--json", token=READ).stdout)
    assert listed == http(admin, "GET", "/v1/sites/shop/alerts")[1]["alerts"]  # type: ignore[index]
    assert {alert["reason"] for alert in listed} == {"dga"}
    shown = cli(admin, "alerts", "shop", token=READ).stdout
    assert shown.startswith("AT ") and re.search(rf"^{ISO} +ip:127\.0\.0\.1 +127\.0\.0\.1 +dga ", shown, re.MULTILINE)
    counted = json.loads(cli(admin, "activity", "shop", "--device", "ip:127.0.0.1", "--hours", "1", "--json").stdout)
    assert sum(hour["queries"] for hour in counted["hours"]) >= len(names)
    assert json.loads(cli(admin, "activity", "shop", "--device", "mac:02:00:00:00:00:01", "--json").stdout) == {
        "hours": [],
        "top_blocked": [],
    }
    refused = cli(admin, "activity", "shop", "--hours", "0")
    assert refused.returncode == 2 and "hours: must be a number of hours from 1 to" in refused.stderr

    on = cli(admin, "site", "query-log", "shop", "on")
    assert on.returncode == 0 and re.search(r"^query_log +on$", on.stdout, re.MULTILINE), on.stderr
    assert http(admin, "GET", "/v1/sites/shop/queries", token=READ)[1]["enabled"] is True  # type: ignore[index]
    assert cli(admin, "site", "query-log", "shop", "off", "--json").returncode == 0
    assert http(admin, "GET", "/v1/sites/shop/queries", token=READ)[1]["enabled"] is False  # type: ignore[index]
    ghost = cli(admin, "site", "query-log", "ghost", "on")
    assert ghost.returncode == 3 and http(admin, "GET", "/v1/sites/ghost")[0] == 404  # not made by the way
    assert cli(admin, "site", "query-log", "shop", "on", token=READ).returncode == 4  # an operator's write


def test_bad_questions_and_ended_pauses_are_422_naming_the_field(api):
    """Issue 19, defects 5 and 6 through the API: `why` with a bad address was a 500 with a traceback in the
    node's log (the module's node fails if it logged one), and a pause that had ended was stored."""
    _port, admin = api
    assert cli(admin, "site", "set", "cafe", "--network", "198.51.100.0/24").returncode == 0
    for address in ("junk", "999.1.1.1", "127.0.0.1/24"):
        status, body = http(admin, "POST", "/v1/why", {"name": "x.com", "address": address})
        assert (status, body["error"]["field"]) == (422, "address"), body  # type: ignore[index]
        refused = cli(admin, "why", "x.com", "--address", address)
        assert refused.returncode == 2 and "address:" in refused.stderr and "Traceback" not in refused.stderr
    assert http(admin, "POST", "/v1/why", {"name": "x.com", "address": "192.0.2.1", "cpe_id": 7})[0] == 422
    for until in ("2020-01-01T00:00:00Z", None, 5):
        status, body = http(admin, "POST", "/v1/sites/cafe/pause", {"until": until})
        assert (status, body["error"]["field"]) == (422, "until"), body  # type: ignore[index]
    refused = cli(admin, "site", "pause", "cafe", "--until", "2020-01-01T00:00:00Z")
    assert refused.returncode == 2 and "until: 2020-01-01T00:00:00Z has passed" in refused.stderr
    assert http(admin, "GET", "/v1/sites/cafe")[1]["paused_until"] is None  # type: ignore[index]


def test_lists_and_their_sources_through_the_api_with_times_people_read(api, tmp_path):
    """Issue 19: `lists push` and `lists versions` printed epoch floats; `--json` keeps the API's numbers."""
    _port, admin = api
    out = tmp_path / "drugs.bns"
    assert run("lists", "compile", "--out", str(out), "--source", f"drugs={DRUGS}").returncode == 0
    pushed = cli(admin, "lists", "push", str(out))
    assert pushed.returncode == 0, pushed.stderr
    assert re.search(rf"^published_at +{ISO}$", pushed.stdout, re.MULTILINE) and not EPOCH.search(pushed.stdout)
    versions = cli(admin, "lists", "versions", token=READ)
    assert re.search(rf" {ISO}$", versions.stdout, re.MULTILINE) and not EPOCH.search(versions.stdout)
    published = json.loads(cli(admin, "lists", "versions", "--json", token=READ).stdout)["versions"]
    assert all(isinstance(version["published_at"], float) for version in published)

    added = cli(admin, "lists", "source-add", "drugs", str(DRUGS), "--json")  # the old spellings, once each
    assert added.returncode == 0 and "bns lists source-add is now bns lists source add" in added.stderr
    listed = cli(admin, "lists", "sources", "--json")
    assert listed.returncode == 0 and "bns lists sources is now bns lists source list" in listed.stderr
    assert [entry["id"] for entry in json.loads(listed.stdout)] == [json.loads(added.stdout)["id"]]
    removed = cli(admin, "lists", "source-remove", "drugs", json.loads(added.stdout)["id"])
    assert removed.returncode == 0 and "bns lists source-remove is now bns lists source remove" in removed.stderr
    assert json.loads(cli(admin, "lists", "source", "list", "--json").stdout) == []
