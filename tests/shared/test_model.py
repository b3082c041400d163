"""Site documents: validation with field paths, the canonical round trip; identity options and trust."""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime

import pytest

from blocklists.catalog import load_catalog
from resolver.shared.config import LimitsSettings
from resolver.shared.dns import OptionCode
from resolver.shared.identity import Claim, Identity, NetworkSet, confine, identity_from
from resolver.shared.policy.model import (
    PolicyError,
    check_bounds,
    check_webhook_url,
    mac_from_option,
    may_post_to,
    parse_site,
    site_document,
)

pytestmark = pytest.mark.unit
CATALOG = load_catalog()

GOOD = {
    "id": "smith",
    "name": "Smith",
    "networks": ["198.51.100.9/29", "2001:db8:1::/56"],
    "cpe_ids": ["cpe-1"],
    "timezone": "Europe/Paris",
    "mode": "device",
    "default_group": "kids",
    "policy": {"block": ["hate"], "safe_search": True, "canaries": False},
    "groups": {
        "kids": {
            "name": "Kids",
            "policy": {
                "profile": "guest",
                "allow": ["School.Example."],
                "deny": ["*.games.example"],
                "schedules": [
                    {"name": "night", "days": ["fri", "sat"], "from": "23:30", "to": "06:00", "block": "all"},
                    {"name": "study", "days": ["mon"], "from": "16:00", "to": "18:00", "block": ["hacking"]},
                ],
            },
            "paused_until": "2026-12-01T20:00:00+01:00",
        }
    },
    "devices": {
        "tab": {
            "name": "Tablet",
            "macs": ["02-00-00-00-00-0A"],
            "client_ids": ["a1b2"],
            "addresses": ["192.168.1.20"],
            "group": "kids",
            "paused_until": "forever",
        }
    },
}


def test_a_good_document_and_its_canonical_round_trip():
    site = parse_site(GOOD, CATALOG)
    assert site.networks == ("198.51.100.8/29", "2001:db8:1::/56")  # host bits dropped
    assert site.devices["tab"].macs == (bytes.fromhex("02000000000a"),)
    kids = site.groups["kids"].policy
    assert kids.allow == ("school.example",) and kids.deny == ("games.example",)
    assert kids.schedules[0].days == frozenset({4, 5}) and kids.schedules[0].start == 23 * 60 + 30
    assert site.groups["kids"].paused_until == datetime(2026, 12, 1, 19, 0, tzinfo=UTC).timestamp()
    canonical = site_document(site)
    again = site_document(parse_site(canonical, CATALOG))
    assert again == canonical
    assert canonical["devices"]["tab"]["macs"] == ["02:00:00:00:00:0a"]
    assert canonical["groups"]["kids"]["paused_until"] == "2026-12-01T19:00:00Z"
    assert (site.policy.canaries, kids.canaries, canonical["policy"]["canaries"]) == (False, None, False)
    assert "canaries" not in canonical["groups"]["kids"]["policy"]  # not set: the profile's, else on


def test_a_pass_round_trips_normalised():
    document = broken("devices.tab.passes", {"Phish.Example.": "2026-12-01T20:00:00+01:00"})
    site = parse_site(document, CATALOG)
    assert site.devices["tab"].passes == (("phish.example", datetime(2026, 12, 1, 19, 0, tzinfo=UTC).timestamp()),)
    assert site_document(site)["devices"]["tab"]["passes"] == {"phish.example": "2026-12-01T19:00:00Z"}


def broken(path: str, value: object) -> dict:
    """GOOD with the field at a dotted `path` replaced by `value` (a key of None deletes nothing)."""
    import copy

    document = copy.deepcopy(GOOD)
    target = document
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("timezone", "Mars/Olympus", "timezone: 'Mars/Olympus' is not a known time zone"),
        ("mode", "family", "mode: 'family' is not one of network, device"),
        ("networks", ["300.1.1.1/8"], "networks[0]:"),
        ("cpe_ids", ["has space"], "cpe_ids[0]: 'has space' is not an id"),
        ("default_group", "nobody", "default_group: no group 'nobody' in this site"),
        ("devices.tab.macs", ["zz:00"], "devices.tab.macs[0]: 'zz:00' is not a MAC address"),
        ("devices.tab.group", "ghosts", "devices.tab.group: no group 'ghosts' in this site"),
        ("devices.tab.addresses", ["not-an-ip"], "devices.tab.addresses[0]:"),
        ("devices.tab.paused_until", "tomorrow", "devices.tab.paused_until: 'tomorrow' is not an RFC 3339 time"),
        ("devices.tab.paused_until", "2026-12-01T20:00:00", "has no UTC offset"),
        ("devices.tab.colour", "red", "devices.tab.colour: unknown field"),
        ("groups.kids.policy.block", ["porn"], "groups.kids.policy.block[0]: 'porn' is not a category"),
        ("groups.kids.policy.web_protect", "yes", "groups.kids.policy.web_protect: must be true or false"),
        ("groups.kids.policy.answer", "silence", "groups.kids.policy.answer: 'silence' is not one of"),
        ("groups.kids.policy.canaries", None, "groups.kids.policy.canaries: must be true or false"),
        ("groups.kids.policy.allow", ["bad..name"], "groups.kids.policy.allow[0]: empty label"),
        ("groups.kids.policy.schedules.0.days", ["funday"], "schedules[0].days[0]: 'funday' is not one of"),
        ("groups.kids.policy.schedules.0.from", "25:00", "schedules[0].from: '25:00' is not a time of day"),
        ("groups.kids.policy.schedules.1.block", [], 'schedules[1].block: must be "all" or a non-empty list'),
        ("groups.kids.policy.schedules.1.name", "night", "schedules: two schedules have the same name"),
        ("policy", ["not", "an", "object"], "policy: must be an object"),
        ("name", 42, "name: must be a string"),
        ("devices.tab.passes", ["phish.example"], "devices.tab.passes: must be an object of name"),
        ("devices.tab.passes", {"bad..name": "2026-12-01T20:00:00Z"}, "devices.tab.passes.bad..name: empty label"),
        ("devices.tab.passes", {"phish.example": "forever"}, "devices.tab.passes.phish.example: must be a time"),
        ("devices.tab.passes", {"phish.example": "soon"}, "is not an RFC 3339 time"),
    ],
)
def test_bad_fields_are_named_by_their_path(path, value, message):
    with pytest.raises(PolicyError) as caught:
        parse_site(broken(path, value), CATALOG)
    assert message in str(caught.value)


PASS = "2026-12-01T20:00:00Z"
SMALL = LimitsSettings(
    names_per_list=3, devices=1, groups=1, schedules_per_policy=2, passes_per_device=2, document_bytes=4096
)
NIGHT = {"name": "late", "days": ["sun"], "from": "22:00", "to": "06:00", "block": "all"}


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "devices.tab.policy",
            {"allow": [f"{i}.example" for i in range(4)]},
            "devices.tab.policy.allow: 4 names; at most 3 (limits.names_per_list)",
        ),
        ("policy.deny", [f"{i}.example" for i in range(5)], "policy.deny: 5 names; at most 3 (limits.names_per_list)"),
        ("devices.b", {}, "devices: 2 devices; at most 1 (limits.devices)"),
        ("groups.teens", {}, "groups: 2 groups; at most 1 (limits.groups)"),
        (
            "groups.kids.policy.schedules",
            [*GOOD["groups"]["kids"]["policy"]["schedules"], NIGHT],
            "groups.kids.policy.schedules: 3 schedules; at most 2 (limits.schedules_per_policy)",
        ),
        (
            "devices.tab.passes",
            {f"n{i}.example": PASS for i in range(3)},
            "devices.tab.passes: 3 passes; at most 2 (limits.passes_per_device)",
        ),
        ("devices.tab.passes", {f"n{i}.example": PASS for i in range(2)}, None),  # at the bounds
    ],
)
def test_a_write_over_a_bound_is_refused_naming_the_field_and_the_bound(path, value, message):
    site = parse_site(broken(path, value), CATALOG)
    if message is None:
        check_bounds(site, None, SMALL)
        return
    with pytest.raises(PolicyError) as caught:
        check_bounds(site, None, SMALL)
    assert str(caught.value) == message


def test_the_whole_document_is_bounded_in_bytes_as_stored():
    document = broken("devices.tab.client_ids", [f"client-{i:04d}" for i in range(400)])
    site = parse_site(document, CATALOG)
    with pytest.raises(
        PolicyError,
        match=r"the site's document would be \d+ bytes; at most 4096 "
        r"\(limits.document_bytes\)",
    ) as caught:
        check_bounds(site, None, SMALL)
    assert caught.value.field == ""
    check_bounds(site, None, LimitsSettings())


def test_a_field_over_a_lowered_bound_may_stay_or_shrink_but_not_grow():
    """A site written under larger bounds: its subscriber may still pause, trim, delete; never grow it."""
    names = [f"{i}.example" for i in range(6)]
    before = site_document(parse_site(broken("policy.allow", names), CATALOG))
    paused = parse_site({**before, "paused_until": "forever"}, CATALOG)
    check_bounds(paused, before, SMALL)  # the list over its bound is as large as it was
    check_bounds(parse_site(broken("policy.allow", names[:4]), CATALOG), before, SMALL)
    with pytest.raises(PolicyError, match=r"policy.allow: 7 names; at most 3"):
        check_bounds(parse_site(broken("policy.allow", [*names, "7.example"]), CATALOG), before, SMALL)
    with pytest.raises(PolicyError, match=r"devices.tab.policy.allow: 4 names"):  # another list: its own bound
        check_bounds(parse_site(broken("devices.tab.policy", {"allow": names[:4]}), CATALOG), before, SMALL)


def test_a_mac_or_client_id_belongs_to_one_device():
    document = broken("devices.other", {"macs": ["02:00:00:00:00:0a"]})
    expected = r"devices\.other\.macs\[0\]: 02:00:00:00:00:0a already belongs to device tab"
    with pytest.raises(PolicyError, match=expected):
        parse_site(document, CATALOG)


def test_id_is_required():
    with pytest.raises(PolicyError, match="id: missing"):
        parse_site({"name": "x"}, CATALOG)


MAC = bytes.fromhex("020000abcdef")


@pytest.mark.parametrize(
    "payload",
    [MAC, b"02:00:00:ab:cd:ef", b"02-00-00-AB-CD-EF", base64.b64encode(MAC).rstrip(b"=")],
    ids=["binary-65001", "text-65073", "dashes", "base64-65073"],
)
def test_mac_options(payload):
    assert mac_from_option(payload) == MAC


@pytest.mark.parametrize("payload", [b"", b"\x01\x02", b"not a mac", b"\xff" * 8])
def test_bad_mac_options_are_no_mac(payload):
    assert mac_from_option(payload) is None


def ecs(address: bytes, family: int, prefix: int) -> bytes:
    return struct.pack("!HBB", family, prefix, 0) + address


def test_identity_from_options():
    options = {
        OptionCode.MAC: MAC,
        OptionCode.CPE_ID: b"cpe-77",
        OptionCode.ECS: ecs(bytes([192, 168, 1, 20]), 1, 32),
    }
    assert identity_from("10.0.0.1", options) == Identity("192.168.1.20", MAC, None, "cpe-77", "10.0.0.1")
    assert identity_from("10.0.0.1", {OptionCode.ECS: ecs(bytes([203, 0, 113]), 1, 24)}).address == "203.0.113.0"
    assert identity_from("10.0.0.1", None) == Identity("10.0.0.1")


def test_umbrella_option_as_dnsmasq_writes_it():
    payload = (
        b"ODNS\x01\x00"
        + struct.pack("!HI", 0x0008, 1234)
        + struct.pack("!H", 0x0010)
        + bytes([192, 0, 2, 7])
        + struct.pack("!H", 0x0040)
        + bytes.fromhex("0011223344556677")
    )
    identity = identity_from("10.0.0.1", {OptionCode.UMBRELLA: payload})
    assert identity == Identity("192.0.2.7", None, "0011223344556677", "umbrella-org-1234", "10.0.0.1")


def test_truncated_umbrella_option_gives_what_it_can():
    payload = b"ODNS\x01\x00" + struct.pack("!H", 0x0040) + b"\x00\x11"
    assert identity_from("10.0.0.1", {OptionCode.UMBRELLA: payload}) == Identity("10.0.0.1", router="10.0.0.1")


def test_a_router_in_a_site_is_believed_about_that_site_only():
    own = parse_site({"id": "alpha", "networks": ["198.51.100.8/29"], "cpe_ids": ["alpha-cpe"]}, CATALOG)
    router = "198.51.100.9"
    lan = Identity("192.168.1.20", MAC, None, "alpha-cpe", router)
    assert confine(lan, own, None) == (lan, ())  # its own CPE id, a LAN address no site holds: believed
    foreign = Identity("203.0.113.7", MAC, None, "bravo-cpe", router)
    believed, refused = confine(foreign, own, "bravo")
    assert believed == Identity(router, MAC, None, None, router)
    assert refused == (Claim.CPE_ID, Claim.ADDRESS)


def test_trusted_networks():
    trusted = NetworkSet(("127.0.0.1/32", "2001:db8::/32"))
    assert "127.0.0.1" in trusted and "2001:db8::5" in trusted
    assert "127.0.0.2" not in trusted and "garbage" not in trusted
    assert not NetworkSet(())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.1.1/hook",
        "http://100.64.0.1/hook",  # shared (CGNAT)
        "http://169.254.169.254/latest/meta-data",  # link-local: a cloud's metadata service
        "http://[fe80::1%25eth0]/hook",
        "http://0.0.0.0/hook",
        "http://[::]/hook",
        "http://224.0.0.1/hook",
        "http://[ff02::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",  # loopback written as IPv6
        "http://192.0.2.1/hook",  # documentation: nobody's
        "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 to the metadata service (Python calls it global)
        "http://[64:ff9b::a00:1]/hook",  # NAT64 to 10.0.0.1
        "http://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
        "http://[::7f00:1]/hook",  # IPv4-compatible 127.0.0.1
    ],
)
def test_a_webhook_to_an_address_that_is_not_public_is_refused_unless_allowed(url):
    """Issue 18: a site's webhook could point the node at its own loopback or its neighbours."""
    with pytest.raises(PolicyError) as refused:
        check_webhook_url(url, ())
    assert refused.value.field == "webhook.url" and "admin.webhook_allow" in refused.value.reason
    check_webhook_url(url, ("0.0.0.0/0", "::/0"))  # the operator's allowlist lets it through
    assert may_post_to("2606:4700:4700::1111", ()) and may_post_to("64:ff9b::808:808", ())  # public: 8.8.8.8


def test_a_webhook_url_with_credentials_is_refused_and_public_targets_pass():
    with pytest.raises(PolicyError) as refused:
        check_webhook_url("https://user:pass@hooks.example/x", ("0.0.0.0/0",))
    assert refused.value.field == "webhook.url" and "user name or password" in refused.value.reason
    for url in ("https://hooks.example/x", "https://8.8.8.8/x", "http://[2001:4860:4860::8888]:8443/x"):
        check_webhook_url(url, ())  # a name is checked when alerts are sent, on the addresses it has then
    assert may_post_to("127.0.0.1", ("127.0.0.0/8",)) and not may_post_to("127.0.0.1", ("10.0.0.0/8",))
