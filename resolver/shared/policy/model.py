"""Sites, groups, devices and policies as stored: JSON documents, validated field by field.

A site document holds a subscriber (a customer site) with its groups and devices:

    {"id": "smith", "name": "Smith family", "networks": ["198.51.100.8/29"], "cpe_ids": ["cpe-42"],
     "timezone": "Europe/London", "mode": "device", "policy": {...}, "paused_until": null,
     "default_group": "guests", "query_log": false,
     "groups": {"kids": {"name": "Kids", "policy": {...}, "paused_until": null}},
     "devices": {"tablet": {"name": "Tablet", "macs": ["02:00:00:00:00:01"], "client_ids": [],
                            "addresses": ["192.168.1.20"], "group": "kids", "policy": null,
                            "paused_until": null,
                            "passes": {"phish.example": "2026-11-23T21:00:00Z"}}}}

A policy:

    {"profile": "guest", "block": ["pornography"], "web_protect": true, "allow": ["school.example"],
     "deny": ["games.example"], "safe_search": true, "answer": "nxdomain", "canaries": true,
     "schedules": [{"name": "bedtime", "days": ["sun", "mon", "tue", "wed", "thu"],
                    "from": "21:00", "to": "07:00", "block": "all"}]}

Every field is optional except a site's id; a policy's fields override its profile's. `canaries` (on unless
false) answers the bypass canaries NXDOMAIN (resolver/shared/policy/decision.py). `paused_until` is
an RFC 3339 time, or "forever". A device's `passes` are the names its user chose to "continue anyway" to on
a Web Protect warning page, each until a time: they lift warnings only, never a block. Validation errors
name the field by its path (`devices.tablet.macs[0]: 'zz' is not a MAC address`) and nothing is stored.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from blocklists.catalog import Catalog
from blocklists.names import BadName, normalize
from resolver.shared.dns import name_to_text, text_to_name
from resolver.shared.errors import EXIT_REFUSED, BnsError
from resolver.shared.local_records import Record, parse_records
from resolver.shared.special_names import DEFAULT_ZONES, at_or_under

if TYPE_CHECKING:
    from resolver.shared.config import LimitsSettings

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MODES = ("network", "device")
ANSWERS = ("nxdomain", "nodata", "null", "page")
FOREVER = math.inf
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_TIME = re.compile(r"([01]\d|2[0-3]):([0-5]\d)\Z")
_MAC_TEXT = re.compile(r"[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}\Z")
MAX_LIST = 10_000  # items of any one list or table a document is read with (writes: the tighter limits.*)


class PolicyError(BnsError):
    """A document that cannot be stored: `field` is the path of the offending field."""

    http_status = 422
    exit_code = EXIT_REFUSED
    summary = "refused"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True, eq=False)
class Schedule:
    name: str
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after local midnight
    end: int  # a window ending at or before its start crosses midnight into the next day
    block_all: bool
    categories: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class PolicySpec:
    """A policy as written. None means "not set here": the profile's value, or the default."""

    profile: str | None = None
    block: tuple[str, ...] | None = None
    web_protect: bool | None = None
    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] | None = None
    schedules: tuple[Schedule, ...] | None = None
    safe_search: bool | None = None
    answer: str | None = None
    canaries: bool | None = None

    def over(self, base: PolicySpec) -> PolicySpec:
        """This spec's fields where set, `base`'s elsewhere (the profile's name itself is not carried)."""
        return PolicySpec(
            **{
                name: getattr(self, name) if getattr(self, name) is not None else getattr(base, name)
                for name in _SPEC_FIELDS
            }
        )


_SPEC_FIELDS = tuple(spec.name for spec in fields(PolicySpec) if spec.name != "profile")


@dataclass(frozen=True)
class Webhook:
    """Where a site's threat alerts are posted, and the key their signature is made with."""

    url: str
    secret: str


@dataclass(eq=False)
class Group:
    id: str
    name: str = ""
    policy: PolicySpec | None = None
    paused_until: float | None = None


@dataclass(eq=False)
class Device:
    id: str
    name: str = ""
    macs: tuple[bytes, ...] = ()
    client_ids: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    group: str | None = None
    policy: PolicySpec | None = None
    paused_until: float | None = None
    passes: tuple[tuple[str, float], ...] = ()  # (name, until): warnings lifted for the name and its subdomains


@dataclass(eq=False)
class Site:
    """A subscriber with its groups and devices, and the indexes a worker identifies devices with."""

    id: str
    name: str = ""
    networks: tuple[str, ...] = ()
    cpe_ids: tuple[str, ...] = ()
    timezone: str = "UTC"
    mode: str = "network"
    policy: PolicySpec | None = None
    paused_until: float | None = None
    default_group: str | None = None
    groups: dict[str, Group] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    version: int = 0
    webhook: Webhook | None = None
    query_log: bool = False  # keep the names its devices ask for (activity.query_log_hours), for its subscriber
    record_lines: tuple[str, ...] = ()  # its own names (`records`), answered to its devices only
    records: tuple[Record, ...] = ()
    zone: ZoneInfo = field(init=False)
    answers: Any = field(init=False, default=None, compare=False, repr=False)  # a worker's table of `records`
    by_mac: dict[bytes, Device] = field(init=False, default_factory=dict)
    by_client_id: dict[str, Device] = field(init=False, default_factory=dict)
    by_address: dict[str, Device] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.zone = ZoneInfo(self.timezone)
        for device in self.devices.values():
            for mac in device.macs:
                self.by_mac[mac] = device
            for client_id in device.client_ids:
                self.by_client_id[client_id] = device
            for address in device.addresses:
                self.by_address[address] = device


# --- reading documents ---------------------------------------------------------------------------------


def _require(condition: bool, path: str, reason: str) -> None:
    if not condition:
        raise PolicyError(path, reason)


# The helpers below run for every field of every site a worker loads: they test first and build their
# message only for a document at fault.


def _table(value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(path, f"must be an object, got {type(value).__name__}")
    if not value.keys() <= allowed:
        unknown = sorted(set(value) - allowed)
        raise PolicyError(
            f"{path}.{unknown[0]}" if path else unknown[0], f"unknown field; known: {', '.join(sorted(allowed))}"
        )
    return value


def _text(value: Any, path: str, limit: int = 200) -> str:
    if not isinstance(value, str):
        raise PolicyError(path, f"must be a string, got {value!r}")
    if len(value) > limit:
        raise PolicyError(path, f"longer than {limit} characters")
    return value


def is_id(text: str) -> bool:
    """Whether `text` is an id of a document (a site, group, device, CPE id or client id)."""
    return _ID.match(text) is not None


def _identifier(value: Any, path: str) -> str:
    text = _text(value, path)
    if not is_id(text):
        raise PolicyError(path, f"{text!r} is not an id (letters, digits, '.', '_', ':', '-'; up to 64)")
    return text


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(path, f"must be an object of id → entry, got {type(value).__name__}")
    if len(value) > MAX_LIST:
        raise PolicyError(path, f"more than {MAX_LIST} entries")
    return value


def _list(value: Any, path: str, most: int = MAX_LIST) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(path, f"must be a list, got {type(value).__name__}")
    if len(value) > most:
        raise PolicyError(path, f"more than {most} items")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(path, f"must be true or false, got {value!r}")
    return value


def parse_mac(text: str) -> bytes:
    """`02:00:5e:00:53:01`, `02-00-…`, `02005e005301` → 6 bytes. Raises ValueError."""
    text = text.strip().lower()
    if not _MAC_TEXT.match(text):
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def mac_text(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


def mac_from_option(payload: bytes) -> bytes | None:
    """The MAC in option 65001 (6 bytes) or 65073 (dnsmasq: `aa:bb:…` text or 8 base64 characters)."""
    if len(payload) == 6:
        return payload
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        return None
    try:
        return parse_mac(text)
    except ValueError:
        pass
    if len(text) == 8:
        try:
            decoded = base64.b64decode(text, validate=True)
        except binascii.Error:
            return None
        return decoded if len(decoded) == 6 else None
    return None


def parse_time(value: Any, path: str) -> float | None:
    """An RFC 3339 time with an offset, "forever", or null → epoch seconds, inf, or None."""
    if value is None:
        return None
    if value == "forever":
        return FOREVER
    text = _text(value, path)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PolicyError(path, f"{text!r} is not an RFC 3339 time such as 2026-11-23T21:00:00Z") from None
    _require(moment.tzinfo is not None, path, f"{text!r} has no UTC offset (add Z or +01:00)")
    return moment.timestamp()


def _domains(value: Any, path: str) -> tuple[str, ...]:
    names = []
    for index, item in enumerate(_list(value, path)):
        try:
            names.append(normalize(_text(item, f"{path}[{index}]", 253)))
        except BadName as bad:
            raise PolicyError(f"{path}[{index}]", str(bad)) from None
    return tuple(dict.fromkeys(names))


def _categories(value: Any, path: str, catalog: Catalog) -> tuple[str, ...]:
    categories = []
    for index, item in enumerate(_list(value, path)):
        _require(
            item in catalog,
            f"{path}[{index}]",
            f"{item!r} is not a category (known: {', '.join(c.id for c in catalog)})",
        )
        categories.append(item)
    return tuple(dict.fromkeys(categories))


def _minutes(value: Any, path: str) -> int:
    match = _TIME.match(_text(value, path))
    _require(match is not None, path, f"{value!r} is not a time of day such as 21:00")
    assert match is not None
    return int(match.group(1)) * 60 + int(match.group(2))


def _schedule(value: Any, path: str, catalog: Catalog) -> Schedule:
    entry = _table(value, path, {"name", "days", "from", "to", "block"})
    for required in ("name", "days", "from", "to", "block"):
        _require(required in entry, f"{path}.{required}", "missing")
    days = set()
    for index, day in enumerate(_list(entry["days"], f"{path}.days")):
        _require(day in DAYS, f"{path}.days[{index}]", f"{day!r} is not one of {', '.join(DAYS)}")
        days.add(DAYS.index(day))
    _require(bool(days), f"{path}.days", "names no day")
    block = entry["block"]
    categories: tuple[str, ...]
    if block == "all":
        block_all, categories = True, ()
    else:
        block_all, categories = False, _categories(block, f"{path}.block", catalog)
        _require(bool(categories), f"{path}.block", 'must be "all" or a non-empty list of categories')
    return Schedule(
        _text(entry["name"], f"{path}.name", 64),
        frozenset(days),
        _minutes(entry["from"], f"{path}.from"),
        _minutes(entry["to"], f"{path}.to"),
        block_all,
        categories,
    )


POLICY_FIELDS = {
    "profile",
    "block",
    "web_protect",
    "allow",
    "deny",
    "schedules",
    "safe_search",
    "answer",
    "canaries",
}


def parse_policy(value: Any, path: str, catalog: Catalog) -> PolicySpec | None:
    if value is None:
        return None
    entry = _table(value, path, POLICY_FIELDS)
    answer = entry.get("answer")
    _require(answer is None or answer in ANSWERS, f"{path}.answer", f"{answer!r} is not one of {', '.join(ANSWERS)}")
    schedules = None
    if "schedules" in entry:
        schedules = tuple(
            _schedule(item, f"{path}.schedules[{index}]", catalog)
            for index, item in enumerate(_list(entry["schedules"], f"{path}.schedules"))
        )
        names = [schedule.name for schedule in schedules]
        _require(len(set(names)) == len(names), f"{path}.schedules", "two schedules have the same name")
    return PolicySpec(
        profile=_identifier(entry["profile"], f"{path}.profile") if entry.get("profile") is not None else None,
        block=_categories(entry["block"], f"{path}.block", catalog) if "block" in entry else None,
        web_protect=_bool(entry["web_protect"], f"{path}.web_protect") if "web_protect" in entry else None,
        allow=_domains(entry["allow"], f"{path}.allow") if "allow" in entry else None,
        deny=_domains(entry["deny"], f"{path}.deny") if "deny" in entry else None,
        schedules=schedules,
        safe_search=_bool(entry["safe_search"], f"{path}.safe_search") if "safe_search" in entry else None,
        answer=answer,
        canaries=_bool(entry["canaries"], f"{path}.canaries") if "canaries" in entry else None,
    )


def _network(value: Any, path: str) -> str:
    try:
        return ipaddress.ip_network(_text(value, path), strict=False).compressed
    except ValueError as exc:
        raise PolicyError(path, str(exc)) from None


def _address(value: Any, path: str) -> str:
    try:
        return ipaddress.ip_address(_text(value, path)).compressed
    except ValueError as exc:
        raise PolicyError(path, str(exc)) from None


def _passes(value: Any, path: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict):
        raise PolicyError(path, f"must be an object of name → RFC 3339 time, got {type(value).__name__}")
    _require(len(value) <= MAX_LIST, path, f"more than {MAX_LIST} entries")
    passes = []
    for name, until in value.items():
        try:
            domain = normalize(_text(name, path, 253))
        except BadName as bad:
            raise PolicyError(f"{path}.{name}", str(bad)) from None
        moment = parse_time(until, f"{path}.{name}")
        _require(moment is not None and moment != FOREVER, f"{path}.{name}", "must be a time (a pass always ends)")
        assert moment is not None
        passes.append((domain, moment))
    return tuple(passes)


def _device(device_id: str, value: Any, path: str, catalog: Catalog) -> Device:
    entry = _table(
        value, path, {"name", "macs", "client_ids", "addresses", "group", "policy", "paused_until", "passes"}
    )
    macs = []
    for index, item in enumerate(_list(entry.get("macs", []), f"{path}.macs")):
        try:
            macs.append(parse_mac(_text(item, f"{path}.macs[{index}]")))
        except ValueError as exc:
            raise PolicyError(f"{path}.macs[{index}]", str(exc)) from None
    return Device(
        device_id,
        _text(entry.get("name", ""), f"{path}.name"),
        tuple(macs),
        tuple(
            _identifier(item, f"{path}.client_ids[{i}]")
            for i, item in enumerate(_list(entry.get("client_ids", []), f"{path}.client_ids"))
        ),
        tuple(
            _address(item, f"{path}.addresses[{i}]")
            for i, item in enumerate(_list(entry.get("addresses", []), f"{path}.addresses"))
        ),
        _identifier(entry["group"], f"{path}.group") if entry.get("group") is not None else None,
        parse_policy(entry.get("policy"), f"{path}.policy", catalog),
        parse_time(entry.get("paused_until"), f"{path}.paused_until"),
        _passes(entry.get("passes", {}), f"{path}.passes"),
    )


SITE_FIELDS = {
    "id",
    "name",
    "networks",
    "cpe_ids",
    "timezone",
    "mode",
    "policy",
    "paused_until",
    "default_group",
    "groups",
    "devices",
    "webhook",
    "query_log",
    "records",
}
MAX_RECORDS = 500
_SERVED_BEFORE_IDENTITY = tuple((zone, text_to_name(zone)) for zone in (*DEFAULT_ZONES, "resolver.arpa"))


MAX_SHARED_RECORDS = 10_000


def parse_shared_records(value: Any) -> tuple[str, ...]:
    """The operator's records written through the API (`PUT /v1/local/records`): zone-file lines as
    `local.records` takes them, answered to every client like those. Raises PolicyError naming the line."""
    return _records(value, MAX_SHARED_RECORDS, make_ptrs=True)[0]


def _records(value: Any, most: int, make_ptrs: bool) -> tuple[tuple[str, ...], list[Record]]:
    """(the lines, their records) of a `records` field, or PolicyError naming the line at fault."""
    lines = tuple(_text(item, f"records[{index}]", 512) for index, item in enumerate(_list(value, "records", most)))
    try:
        return lines, parse_records(lines, make_ptrs)
    except ValueError as exc:
        raise PolicyError("records", str(exc)) from None


def _site_records(value: Any) -> tuple[tuple[str, ...], tuple[Record, ...]]:
    """A site's own names: zone-file lines as `local.records` takes them (no PTR is made: the reverse zones of
    private addresses are answered before a device is known, for every site alike)."""
    lines, records = _records(value, MAX_RECORDS, make_ptrs=False)
    for index, record in enumerate(records):
        for zone, apex in _SERVED_BEFORE_IDENTITY:
            if at_or_under(record.owner, apex):
                raise PolicyError(
                    f"records[{index}]",
                    f"{name_to_text(record.owner)} is under {zone}, which is answered before the device is known: "
                    "give the site's names a domain of its own (or use local.records, for every site)",
                )
    return lines, tuple(records)


def parse_site(value: Any, catalog: Catalog, version: int = 0) -> Site:
    """A validated Site from its document. Raises PolicyError naming the first field at fault."""
    entry = _table(value, "", SITE_FIELDS)
    _require("id" in entry, "id", "missing")
    timezone = _text(entry.get("timezone", "UTC"), "timezone", 64)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise PolicyError("timezone", f"{timezone!r} is not a known time zone such as Europe/London") from None
    mode = entry.get("mode", "network")
    _require(mode in MODES, "mode", f"{mode!r} is not one of {', '.join(MODES)}")
    groups = {}
    for group_id, group in _mapping(entry.get("groups", {}), "groups").items():
        path = f"groups.{_identifier(group_id, 'groups')}"
        body = _table(group, path, {"name", "policy", "paused_until"})
        groups[group_id] = Group(
            group_id,
            _text(body.get("name", ""), f"{path}.name"),
            parse_policy(body.get("policy"), f"{path}.policy", catalog),
            parse_time(body.get("paused_until"), f"{path}.paused_until"),
        )
    devices = {}
    raw_devices = _mapping(entry.get("devices", {}), "devices")
    seen_macs: dict[bytes, str] = {}
    seen_ids: dict[str, str] = {}
    seen_addresses: dict[str, str] = {}
    for device_id, device in raw_devices.items():
        path = f"devices.{_identifier(device_id, 'devices')}"
        parsed = devices[device_id] = _device(device_id, device, path, catalog)
        _require(
            parsed.group is None or parsed.group in groups, f"{path}.group", f"no group {parsed.group!r} in this site"
        )
        # Checked with `if` rather than `_require`: the messages are built only for a document at fault.
        for index, mac in enumerate(parsed.macs):
            if mac in seen_macs:
                raise PolicyError(
                    f"{path}.macs[{index}]", f"{mac_text(mac)} already belongs to device {seen_macs[mac]}"
                )
            seen_macs[mac] = device_id
        for index, client_id in enumerate(parsed.client_ids):
            if client_id in seen_ids:
                raise PolicyError(
                    f"{path}.client_ids[{index}]", f"{client_id!r} already belongs to device {seen_ids[client_id]}"
                )
            seen_ids[client_id] = device_id
        for index, address in enumerate(parsed.addresses):
            if address in seen_addresses:
                raise PolicyError(
                    f"{path}.addresses[{index}]", f"{address} already belongs to device {seen_addresses[address]}"
                )
            seen_addresses[address] = device_id
    default_group = entry.get("default_group")
    _require(
        default_group is None or default_group in groups, "default_group", f"no group {default_group!r} in this site"
    )
    networks = tuple(
        dict.fromkeys(
            _network(item, f"networks[{i}]") for i, item in enumerate(_list(entry.get("networks", []), "networks"))
        )
    )
    cpe_ids = tuple(
        dict.fromkeys(
            _identifier(item, f"cpe_ids[{i}]") for i, item in enumerate(_list(entry.get("cpe_ids", []), "cpe_ids"))
        )
    )
    return Site(
        _identifier(entry["id"], "id"),
        _text(entry.get("name", ""), "name"),
        networks,
        cpe_ids,
        timezone,
        mode,
        parse_policy(entry.get("policy"), "policy", catalog),
        parse_time(entry.get("paused_until"), "paused_until"),
        default_group,
        groups,
        devices,
        version,
        _webhook(entry.get("webhook")),
        _bool(entry.get("query_log", False), "query_log"),
        *_site_records(entry.get("records", [])),
    )


def _webhook(value: Any) -> Webhook | None:
    if value is None:
        return None
    entry = _table(value, "webhook", {"url", "secret"})
    url = _text(entry.get("url"), "webhook.url", 2048)
    _require(url.startswith(("https://", "http://")), "webhook.url", "must be an http:// or https:// URL")
    secret = _text(entry.get("secret"), "webhook.secret", 256)
    _require(len(secret) >= 16 and secret.isprintable(), "webhook.secret", "must be 16 to 256 printable characters")
    return Webhook(url, secret)


def may_post_to(address: str, allow: tuple[str, ...]) -> bool:
    """Whether alerts may be posted to `address`: a public unicast address, or one in `allow` (the operator's
    admin.webhook_allow). A site's webhook must not make this node reach its own loopback or its neighbours."""
    ip = _embedded_ipv4(ipaddress.ip_address(address.split("%", 1)[0]))
    if any(ip in ipaddress.ip_network(network) for network in allow):
        return True
    return ip.is_global and not ip.is_multicast


# IPv6 prefixes that carry an IPv4 address in their last 32 bits and reach it: NAT64 (RFC 6052, RFC 8215) and
# the deprecated IPv4-compatible form. Python counts some of them as global whatever IPv4 address they hold.
_IPV4_CARRIERS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv6 address leads to (mapped, 6to4, Teredo's server, NAT64), else itself."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's own address: where the packets end up
    if any(ip in carrier for carrier in _IPV4_CARRIERS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip


def check_webhook_url(url: str, allow: tuple[str, ...]) -> None:
    """Raises PolicyError (webhook.url) unless alerts may be posted to `url` as written: no user name or
    password in it (the receiver checks the signature instead), and an address in it must pass may_post_to.
    A host name is checked when alerts are sent, on the addresses it resolves to then."""
    check_outbound_url(
        url,
        allow,
        "webhook.url",
        "admin.webhook_allow",
        "must not carry a user name or password (user:password@): the receiver checks X-BNS-Signature",
    )


def check_outbound_url(url: str, allow: tuple[str, ...], field: str, setting: str, credentials: str) -> None:
    """Raises PolicyError (`field`) unless this node may reach `url` as written: no user name or password in it
    (`credentials` says why), and an address in it must pass may_post_to with the networks of `setting`."""
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port
    except ValueError as exc:
        raise PolicyError(field, f"not a URL: {exc}") from None
    _require(parts.username is None and parts.password is None, field, credentials)
    _require(bool(host), field, "has no host")
    assert host is not None
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return
    _require(
        may_post_to(host, allow),
        field,
        f"{host} is not a public address; to reach it, add its network to {setting}",
    )


def parse_profile(name: str, value: Any, catalog: Catalog) -> PolicySpec:
    spec = parse_policy(value, f"profiles.{_identifier(name, 'profile')}", catalog)
    _require(spec is not None and spec.profile is None, f"profiles.{name}", "a profile is a policy without a profile")
    assert spec is not None
    return spec


# --- bounds on writes ------------------------------------------------------------------------------------

_UNITS = {
    "names_per_list": "names",
    "devices": "devices",
    "groups": "groups",
    "schedules_per_policy": "schedules",
    "passes_per_device": "passes",
}


def check_bounds(site: Site, before: dict[str, Any] | None, limits: LimitsSettings) -> None:
    """Raises PolicyError naming the first field a write would take over its bound (config `[limits]`), with
    the bound. A field already over its bound before the write (the bound was lowered since) may stay as
    large, or shrink. `before`: the document as stored until now."""
    document = site_document(site)
    old = _sizes(before) if before is not None else {}
    for path, (size, key) in _sizes(document).items():
        bound = getattr(limits, key)
        if size > bound and size > old.get(path, (0, key))[0]:
            raise PolicyError(path, f"{size} {_UNITS[key]}; at most {bound} (limits.{key})")
    stored = _measured(document)
    if stored > limits.document_bytes and (before is None or stored > _measured(before)):
        raise PolicyError(
            "", f"the site's document would be {stored} bytes; at most {limits.document_bytes} (limits.document_bytes)"
        )


def _measured(document: dict[str, Any]) -> int:
    """A document's size as the stores keep it (JSON), its pauses left out: pausing and resuming, a site's or
    a device's, must work whatever the site's size."""
    unpaused = {key: value for key, value in document.items() if key != "paused_until"}
    for kind in ("groups", "devices"):
        unpaused[kind] = {
            entity_id: {key: value for key, value in _entries(entity).items() if key != "paused_until"}
            for entity_id, entity in _entries(document.get(kind)).items()
        }
    return len(json.dumps(unpaused, sort_keys=True))


def _sizes(document: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Field path → (its size, the `limits` key that bounds it), in a document as stored. Read defensively:
    the document before a write may have been written by hand."""
    groups, devices = _entries(document.get("groups")), _entries(document.get("devices"))
    sizes = {"groups": (len(groups), "groups"), "devices": (len(devices), "devices")}
    policies = {"policy": document.get("policy")}
    for kind, entities in (("groups", groups), ("devices", devices)):
        for entity_id, entity in entities.items():
            policies[f"{kind}.{entity_id}.policy"] = _entries(entity).get("policy")
    for device_id, device in devices.items():
        sizes[f"devices.{device_id}.passes"] = (_count(_entries(device).get("passes")), "passes_per_device")
    for path, policy in policies.items():
        for name, key in (
            ("allow", "names_per_list"),
            ("deny", "names_per_list"),
            ("schedules", "schedules_per_policy"),
        ):
            sizes[f"{path}.{name}"] = (_count(_entries(policy).get(name)), key)
    return sizes


def _entries(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list | dict) else 0


# --- writing documents -----------------------------------------------------------------------------------


def policy_document(spec: PolicySpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    document: dict[str, Any] = {}
    if spec.profile is not None:
        document["profile"] = spec.profile
    for name in ("block", "allow", "deny"):
        if getattr(spec, name) is not None:
            document[name] = list(getattr(spec, name))
    for name in ("web_protect", "safe_search", "answer", "canaries"):
        if getattr(spec, name) is not None:
            document[name] = getattr(spec, name)
    if spec.schedules is not None:
        document["schedules"] = [
            {
                "name": s.name,
                "days": [DAYS[day] for day in sorted(s.days)],
                "from": f"{s.start // 60:02d}:{s.start % 60:02d}",
                "to": f"{s.end // 60:02d}:{s.end % 60:02d}",
                "block": "all" if s.block_all else list(s.categories),
            }
            for s in spec.schedules
        ]
    return document


def site_document(site: Site) -> dict[str, Any]:
    """The canonical document of a site (what is stored; parse_site of it gives the same site)."""
    return {
        "id": site.id,
        "name": site.name,
        "networks": list(site.networks),
        "cpe_ids": list(site.cpe_ids),
        "timezone": site.timezone,
        "mode": site.mode,
        "policy": policy_document(site.policy),
        "paused_until": time_document(site.paused_until),
        "default_group": site.default_group,
        "groups": {
            g.id: {"name": g.name, "policy": policy_document(g.policy), "paused_until": time_document(g.paused_until)}
            for g in site.groups.values()
        },
        "devices": {
            d.id: {
                "name": d.name,
                "macs": [mac_text(m) for m in d.macs],
                "client_ids": list(d.client_ids),
                "addresses": list(d.addresses),
                "group": d.group,
                "policy": policy_document(d.policy),
                "paused_until": time_document(d.paused_until),
                "passes": {name: time_document(until) for name, until in d.passes},
            }
            for d in site.devices.values()
        },
        "webhook": {"url": site.webhook.url, "secret": site.webhook.secret} if site.webhook else None,
        "query_log": site.query_log,
        "records": list(site.record_lines),
    }


def time_document(value: float | None) -> str | None:
    """parse_time's inverse: None, "forever", or an RFC 3339 time in UTC."""
    if value is None:
        return None
    if value == FOREVER:
        return "forever"
    return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")


def wire_names(names: tuple[str, ...] | None) -> frozenset[bytes]:
    return frozenset(text_to_name(name) for name in names or ())
