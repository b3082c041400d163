"""Configuration: every default in one place, strict TOML loading, command-line overrides.

Each section is a frozen dataclass; each key carries its default, its limits and a one-line description in
`setting(...)`. Loading refuses unknown keys and bad values with a message that names the key, the reason
and what is allowed, so a typo fails at start-up instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from resolver.shared.dns import name_to_text, text_to_name
from resolver.shared.errors import ConfigError
from resolver.shared.local_records import TYPES, parse_records
from resolver.shared.policy.model import MAX_LIST
from resolver.shared.special_names import check_not_served
from resolver.shared.store.redis import check_redis_url, describe

DNS_PORT = 53


@dataclass(frozen=True)
class Endpoint:
    """An IP address and port: a listen address or an upstream server."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, default_port: int = DNS_PORT) -> Endpoint:
    """Parse `1.2.3.4`, `1.2.3.4:53`, `::1` or `[::1]:53`; raise ValueError saying what is wrong."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (names are not resolved here)") from None
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
        port = int(port_text)
    return Endpoint(address.compressed, port)


def setting(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    convert: Callable[[Any], Any] | None = None,
    live: bool = False,
    show: Callable[[Any], object] | None = None,
    path: bool = False,
) -> Any:
    """A config key: its default, its description, the limits `load_config` enforces, whether a running
    server applies a change of it on SIGHUP (`live`) or needs a restart, how a log line may show its
    value (`show`: `hidden` for a secret), and whether it names a file or directory (`path`: relative to the
    configuration file's directory)."""
    meta = {
        "doc": doc,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "convert": convert,
        "live": live,
        "show": show,
        "path": path,
    }
    return field(default=default, metadata=meta)


def hidden(_value: Any) -> str:
    """How a secret setting is shown: never its value, in a log line, an error or an answer."""
    return "(hidden)"


def _endpoints(items: Any) -> tuple[Endpoint, ...]:
    endpoints = _endpoint_list(items)
    if not endpoints:
        raise ValueError("must name at least one address")
    return endpoints


def _endpoint_list(items: Any, default_port: int = DNS_PORT) -> tuple[Endpoint, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError(f'must be a list of strings such as ["127.0.0.1:{default_port}", "[::1]:{default_port}"]')
    return tuple(parse_endpoint(item, default_port) for item in items)


DOT_PORT, DOH_PORT = 853, 443  # RFC 7858 §3.1; HTTPS


def _networks(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('must be a list of networks such as ["192.0.2.0/24", "2001:db8::/48"]')
    try:
        return tuple(ipaddress.ip_network(item, strict=False).compressed for item in items)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


# Loopback, the private and shared (CGNAT) ranges, link-local: where the customers of a network filter are.
# Anything else is the internet, and answering it makes an open resolver (a reflector for amplification).
PRIVATE_NETWORKS = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)


@dataclass(frozen=True)
class ServerSettings:
    listen: tuple[Endpoint, ...] = setting(
        (Endpoint("127.0.0.1", 5300),),
        "addresses to answer on, UDP and TCP each; ports below 1024 need privileges",
        convert=_endpoints,
    )
    workers: int = setting(
        0, "worker processes sharing the port (SO_REUSEPORT); 0 = one per core", minimum=0, maximum=256
    )
    tcp_idle_timeout: float = setting(
        10.0, "seconds a TCP connection with nothing in flight stays open", minimum=0.1, maximum=3600
    )
    tcp_max_connections: int = setting(
        1000, "open TCP connections per worker; more are closed at once", minimum=1, maximum=1_000_000
    )
    tcp_max_in_flight: int = setting(
        100, "queries in flight per TCP connection before reading pauses", minimum=1, maximum=65535
    )
    drain_timeout: float = setting(5.0, "seconds to finish in-flight queries on SIGTERM", minimum=0, maximum=600)
    allow: tuple[str, ...] = setting(
        PRIVATE_NETWORKS,
        "networks whose queries are answered (besides the networks of the sites in the policy store); "
        'any other source gets `refused_answer`; ["0.0.0.0/0", "::/0"] answers everyone',
        convert=_networks,
        live=True,
    )
    refuse: tuple[str, ...] = setting(
        (),
        "networks refused although `allow` holds them (the longest matching network decides)",
        convert=_networks,
        live=True,
    )
    refused_answer: str = setting(
        "refused",
        "what a source outside `allow` gets: refused (REFUSED with EDE 18 Prohibited) or silence",
        choices=("refused", "silence"),
        live=True,
    )

    @property
    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class UpstreamSettings:
    servers: tuple[Endpoint, ...] = setting(
        (Endpoint("9.9.9.9", DNS_PORT), Endpoint("149.112.112.112", DNS_PORT)),
        "upstream resolvers, tried in this order (the first healthy one answers)",
        convert=_endpoints,
        live=True,
    )
    timeout: float = setting(
        0.5, "seconds to wait for one upstream before trying the next", minimum=0.01, maximum=30, live=True
    )
    deadline: float = setting(
        2.0, "seconds after which a query that no upstream answered gets SERVFAIL", minimum=0.01, maximum=60, live=True
    )
    max_outstanding: int = setting(
        1000,
        "upstream queries in flight per worker; beyond it, SERVFAIL at once",
        minimum=1,
        maximum=1_000_000,
        live=True,
    )
    max_per_zone: int = setting(
        100,
        "upstream queries in flight per worker for names under one domain (its last two labels, three under "
        "co.uk and the like); beyond it, SERVFAIL at once: a flood of random names under one domain cannot "
        "take every slot",
        minimum=1,
        maximum=1_000_000,
        live=True,
    )
    max_per_client: int = setting(
        100,
        "queries one client (a source address; a device behind a router of identity.trusted_networks) may have "
        "waiting for upstreams per worker; beyond it, SERVFAIL at once",
        minimum=1,
        maximum=1_000_000,
        live=True,
    )
    down_after: int = setting(3, "consecutive failures that mark an upstream down", minimum=1, maximum=1000, live=True)
    down_for: float = setting(
        5.0, "seconds a down upstream is skipped before it is tried again", minimum=0.1, maximum=3600, live=True
    )
    socket_queries: int = setting(
        1,
        "queries a UDP socket carries, each on the socket's random source port, before a new socket (and port) "
        "takes over; 1: every query has a socket of its own, closed when its query ends (RFC 5452 §9.2)",
        minimum=1,
        maximum=1_000_000,
        live=True,
    )
    trust_ad: bool = setting(
        False,
        "keep the upstream's AD bit (only for a validating upstream on a trusted path, RFC 6840 §5.8)",
        live=True,
    )
    sockets: int = setting(
        8,
        "with socket_queries above 1: UDP sockets per upstream per worker that queries share",
        minimum=1,
        maximum=1024,
        live=True,
    )
    case_randomization: bool = setting(
        True,
        "0x20: send question names upstream in randomly mixed letter case and take only a reply that repeats "
        "the name letter for letter",
        live=True,
    )
    keep_case: tuple[Endpoint, ...] = setting(
        (),
        "upstreams (as in upstream.servers) that do not repeat a name's letter case: asked in lowercase, "
        "their replies compared ignoring case",
        convert=_endpoint_list,
        live=True,
    )


@dataclass(frozen=True)
class CacheSettings:
    size: int = setting(
        100_000, "answers kept per worker (least recently used are evicted)", minimum=0, maximum=100_000_000
    )
    min_ttl: int = setting(0, "lowest TTL given to a cached positive answer, in seconds", minimum=0, maximum=86400)
    max_ttl: int = setting(86400, "highest TTL kept for a positive answer", minimum=0, maximum=604800)
    negative_max_ttl: int = setting(3600, "highest TTL kept for NXDOMAIN/NODATA (RFC 2308)", minimum=0, maximum=86400)
    servfail_ttl: int = setting(
        5, "seconds a SERVFAIL is kept (RFC 2308 §7: at most 5 minutes)", minimum=0, maximum=300
    )
    serve_stale: bool = setting(
        True,
        "answer from expired data, TTL 30 and EDE 3 (Stale Answer), when no upstream answers (RFC 8767)",
        live=True,
    )
    stale_max: int = setting(
        86400, "seconds past its expiry an answer may still be served stale", minimum=0, maximum=7 * 86400, live=True
    )
    client_timeout: float = setting(
        1.8,
        "seconds a client waits for an upstream before it is answered stale, if an expired answer is held",
        minimum=0.1,
        maximum=30,
        live=True,
    )


def _category_ids(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('must be a list of category ids such as ["pornography", "drugs"]')
    return tuple(items)


def _addresses(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('must be a list of IP addresses such as ["192.0.2.10", "2001:db8::10"]')
    try:
        return tuple(ipaddress.ip_address(item).compressed for item in items)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class ListsSettings:
    path: str = setting(
        "",
        "compiled list artifact to serve (`bns lists compile`), where published lists are "
        "installed too; empty: <cache_dir>/published.bns, served once something is published",
        live=True,
        path=True,
    )
    catalog: str = setting("", "category catalogue TOML; empty: the packaged one", path=True)
    check_interval: float = setting(
        1.0, "seconds between checks for a newly installed artifact", minimum=0.05, maximum=3600, live=True
    )
    hot_names: int = setting(
        200_000, "names whose categories each worker keeps at hand (a dict lookup)", minimum=1, maximum=100_000_000
    )
    cache_dir: str = setting(
        "",
        "the node's private directory: the served artifacts are copied there before they are mapped, and it "
        "keeps the node's own state (published versions and list sources without Redis, the last verified "
        "list, the pages' key when pages.secret is empty and there is no Redis); empty: bns-lists-<uid> in "
        "the temporary directory, which a reboot may empty",
        path=True,
    )
    ready_timeout: float = setting(
        10.0,
        "seconds a node following published lists (store.redis) waits at start "
        "for Redis to confirm the current list before it serves the verified "
        "list it already holds; a node holding none waits for Redis",
        minimum=0,
        maximum=3600,
    )


ANSWER_MODES = ("nxdomain", "nodata", "null", "page")


@dataclass(frozen=True)
class PolicySettings:
    """The global default policy: what every client gets (until per-device policies exist for it)."""

    block: tuple[str, ...] | None = setting(
        None,
        "categories answered as blocked; default: those the catalogue marks `block`",
        convert=_category_ids,
        live=True,
    )
    warn: tuple[str, ...] | None = setting(
        None,
        "categories answered with a warning (Web Protect); default: those marked `warn`",
        convert=_category_ids,
        live=True,
    )
    answer: str = setting(
        "nxdomain",
        "how a blocked name is answered: nxdomain, nodata, null (0.0.0.0 and ::) or page (the block page's address)",
        choices=ANSWER_MODES,
        live=True,
    )
    block_page: tuple[str, ...] = setting((), 'block page addresses (for answer = "page")', convert=_addresses)
    warning_page: tuple[str, ...] = setting(
        (), "warning page addresses; without one, warnings answer as blocks", convert=_addresses
    )
    blocked_ttl: int = setting(10, "TTL of blocked answers, in seconds", minimum=0, maximum=86400, live=True)


def _redis_url(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError('must be a string such as "redis://127.0.0.1:6379/0"')
    return check_redis_url(text)


@dataclass(frozen=True)
class StoreSettings:
    redis: str = setting(
        "",
        "Redis URL holding the policies (redis://host:port/db, rediss:// for TLS, unix:///path?db=0, or "
        "sentinel://host:26379,host:26379/service for a Sentinel deployment); empty: the "
        "embedded file",
        convert=_redis_url,
        show=describe,
    )
    file: str = setting("bns-policies.json", "the embedded policy file when there is no Redis; empty: none", path=True)
    prefix: str = setting("bns:", "prefix of every Redis key and of the change channel")
    site_cache: int = setting(
        20_000, "sites each worker keeps in memory (least recently used go first)", minimum=1, maximum=10_000_000
    )
    client_cache: int = setting(
        100_000, "clients each worker keeps in memory with their effective policy", minimum=1, maximum=10_000_000
    )
    cold_wait: float = setting(
        0.01,
        "seconds a query from a new client waits for the store before it is answered by `cold_policy`",
        minimum=0.0,
        maximum=5.0,
        live=True,
    )
    cold_policy: str = setting(
        "best_known",
        "a new client the store cannot tell about in time: best_known (the "
        "policy of its site if this worker holds it, else the global "
        "default) or servfail",
        choices=("best_known", "servfail"),
        live=True,
    )
    write_replicas: int = setting(
        -1,
        "replicas that must confirm a policy write (Redis WAIT) before it is "
        "reported done; -1: 1 with Sentinel, else 0",
        minimum=-1,
        maximum=16,
    )


@dataclass(frozen=True)
class LimitsSettings:
    """Bounds on what a write may store in a site document. Every worker holding a site parses its whole
    document again, between two DNS answers, at each change of it (about 40 µs per kB): these bounds keep
    that a few milliseconds. They are the same for every writer (a site token, an operator's token, the CLI
    straight to the store, an import, a warning page's pass): the workers' cost does not depend on who wrote
    the document, and a site an operator made large is parsed again at each of its subscriber's pauses. A
    write that would take a count over its bound is refused (422) and writes nothing; one that leaves a count
    already over its bound (the bound was lowered) no larger than it was is let through."""

    names_per_list: int = setting(
        1000,
        "names in one allow or deny list of a policy (a home's or a shop's hundreds, not a blocklist)",
        minimum=1,
        maximum=MAX_LIST,
    )
    devices: int = setting(500, "configured devices in one site", minimum=1, maximum=MAX_LIST)
    groups: int = setting(50, "groups in one site", minimum=1, maximum=MAX_LIST)
    schedules_per_policy: int = setting(20, "schedules in one policy", minimum=1, maximum=MAX_LIST)
    passes_per_device: int = setting(
        100,
        'names a device may "continue anyway" to at once (its passes; ended ones are dropped when one is added)',
        minimum=1,
        maximum=MAX_LIST,
    )
    document_bytes: int = setting(
        128 * 1024,
        "bytes of a site's whole document as stored (JSON): 128 KiB holds a small business (60 devices, 5 "
        "groups of 450 names: 66 kB) twice, and parses in about 5 ms; a larger site needs more, which each "
        "change of it then costs every worker holding it",
        minimum=4096,
        maximum=64 * 2**20,
    )


@dataclass(frozen=True)
class IdentitySettings:
    trusted_networks: tuple[str, ...] = setting(
        (), "sources whose EDNS identity options (MAC, CPE-ID, ECS, Umbrella) are believed", convert=_networks
    )


@dataclass(frozen=True)
class RateLimitSettings:
    """Response rate limiting (RRL) of UDP answers, as in BIND, Knot and Unbound: it makes bns a poor reflector."""

    responses_per_second: int = setting(
        100,
        "UDP answers per second to one client prefix for one response (name and type; all NXDOMAIN alike; all "
        "errors alike); beyond it answers are dropped or slipped; 0 = off",
        minimum=0,
        maximum=1_000_000,
        live=True,
    )
    slip: int = setting(
        2,
        "every Nth rate-limited answer goes out truncated (TC=1, no records: a real client retries over TCP, "
        "which is not limited); 0 = drop them all",
        minimum=0,
        maximum=100,
        live=True,
    )
    limit_sites: bool = setting(
        False,
        "rate limit the sites' networks and identity.trusted_networks too (by default the operator's known "
        "customers and routers are exempt: a school behind one address asks more than any stranger)",
        live=True,
    )
    ipv4_prefix: int = setting(24, "IPv4 sources sharing one budget: this prefix length", minimum=8, maximum=32)
    ipv6_prefix: int = setting(56, "IPv6 sources sharing one budget: this prefix length", minimum=16, maximum=128)
    exempt: tuple[str, ...] = setting(
        PRIVATE_NETWORKS,
        "sources never rate limited (a reflection attack spoofs the victim's public address)",
        convert=_networks,
        live=True,
    )
    table_size: int = setting(
        100_000, "budgets kept per worker (the oldest half is forgotten when full)", minimum=1000, maximum=10_000_000
    )


ADMIN_PORT = 5380
MIN_TOKEN_LENGTH = 16


def _optional_endpoint(text: Any) -> Endpoint | None:
    if not isinstance(text, str):
        raise ValueError(f'must be a string such as "127.0.0.1:{ADMIN_PORT}", or "" for none')
    return parse_endpoint(text, ADMIN_PORT) if text else None


def _tokens(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError("must be a list of strings")
    for index, token in enumerate(items):
        if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
            raise ValueError(
                f"[{index}]: a token must be at least {MIN_TOKEN_LENGTH} printable characters without spaces"
            )
        if token.startswith("site."):
            raise ValueError(f"[{index}]: tokens starting with 'site.' are the site tokens the API makes")
    return tuple(items)


def _directories(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) and item.startswith("/") for item in items):
        raise ValueError('must be a list of absolute directories such as ["/srv/bns/lists"]')
    return tuple(items)


@dataclass(frozen=True)
class AdminSettings:
    listen: Endpoint | None = setting(  # noqa: RUF009  (Endpoint is frozen: sharing the default is safe)
        Endpoint("127.0.0.1", ADMIN_PORT), 'address of the admin HTTP API; "" for none', convert=_optional_endpoint
    )
    tokens: tuple[str, ...] = setting(
        (),
        "bearer tokens of the admin role (and $BNS_ADMIN_TOKENS, comma-separated)",
        convert=_tokens,
        live=True,
        show=hidden,
    )
    read_tokens: tuple[str, ...] = setting(
        (), "bearer tokens of the read-only role (and $BNS_READ_TOKENS)", convert=_tokens, live=True, show=hidden
    )
    max_upload: int = setting(
        256 * 2**20,
        "largest upload in bytes (an artifact, a list source); also the most a list source on the API may "
        "decompress to",
        minimum=1024,
        maximum=2**32,
    )
    max_json: int = setting(
        2**20,
        "largest JSON request body in bytes (every route but the uploads), refused from its Content-Length "
        "before it is read, or as soon as a chunked body passes it; at least limits.document_bytes, so that a "
        "site at its bound can be written (an import of many sites needs more, or goes straight to the store)",
        minimum=1024,
        maximum=2**32,
    )
    source_roots: tuple[str, ...] = setting(
        (),
        "directories under which the API may register list sources by path; empty: uploads only",
        convert=_directories,
    )
    webhook_allow: tuple[str, ...] = setting(
        (),
        "networks sites' webhooks may post to although they are not public (loopback, private, link-local…); "
        "empty: public addresses only",
        convert=_networks,
    )
    niceness: int = setting(
        10,
        "niceness of the admin process (API, app, pages, list follower, builds): against a busy worker it gets "
        "about a tenth of the core, enough to answer within a second (bench/admin_load.py); 19 gives it about "
        "a seventieth",
        minimum=0,
        maximum=19,
    )
    idle_scheduling: bool = setting(
        False,
        "run the admin process under SCHED_IDLE (Linux): a worker takes the CPU from it at once, but while the "
        "workers are busy /health and the API may wait seconds for it",
    )


@dataclass(frozen=True)
class FeedSettings:
    check_interval: float = setting(
        60.0,
        "seconds between looks for feeds that are due; a fleet's nodes take over the feeds within one look "
        "when the node fetching them dies",
        minimum=1,
        maximum=86400,
        live=True,
    )
    interval: float = setting(
        6 * 3600.0, "a feed's refresh interval when it names none, in seconds", minimum=1, maximum=30 * 86400
    )
    jitter: float = setting(
        0.1,
        "share of a feed's interval added at random to each wait, so that a fleet of many installations does "
        "not download at once",
        minimum=0,
        maximum=1,
        live=True,
    )
    timeout: float = setting(120.0, "seconds a download may take in all", minimum=1, maximum=3600, live=True)
    max_bytes: int = setting(
        64 * 2**20,
        "largest feed in bytes, as downloaded and again as decompressed (a gzip bomb stops there)",
        minimum=1024,
        maximum=2**30,  # what the compiler reads of a source
        live=True,
    )
    parallel: int = setting(4, "downloads at once", minimum=1, maximum=64, live=True)
    max_shrink: float = setting(
        0.5,
        "share of its names a feed may lose in one refresh; a download that loses more is refused (the last "
        "good copy stays) until forced (`bns lists feed refresh ID --force`)",
        minimum=0,
        maximum=1,
        live=True,
    )
    allow: tuple[str, ...] = setting(
        (),
        "networks feeds may be fetched from although they are not public (loopback, private…); empty: public "
        "addresses only",
        convert=_networks,
        live=True,
    )


@dataclass(frozen=True)
class ActivitySettings:
    """What is kept of each site's devices and their queries, for the subscriber (the store: Redis, else the
    admin process's memory)."""

    devices_per_site: int = setting(
        1000,
        "seen devices kept per site; beyond, the least recently seen device not configured in the site is "
        "forgotten (a flood of random MACs cannot grow it)",
        minimum=1,
        maximum=100_000,
    )
    days: int = setting(
        7, "days of hourly activity (counts by verdict and category, top blocked names) kept", minimum=1, maximum=90
    )
    query_log_hours: float = setting(
        24.0,
        "hours a query stays in the log of a site that opted in (its `query_log` field); older ones are deleted",
        minimum=0.001,
        maximum=24 * 90,
    )
    query_log_size: int = setting(
        1000, "queries kept per site in its log, at most (the oldest go first)", minimum=1, maximum=1_000_000
    )
    alerts_per_site: int = setting(
        1000, "threat alerts kept per site (the oldest go first)", minimum=1, maximum=100_000
    )
    hand_over_seconds: float = setting(
        5.0,
        "how often each worker hands what it counted to the admin process (what the API shows lags by about this)",
        minimum=0.1,
        maximum=60.0,
    )


def _secret(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError("must be a string")
    if text and (len(text) < MIN_TOKEN_LENGTH or not text.isprintable()):
        raise ValueError(f'must be at least {MIN_TOKEN_LENGTH} printable characters, or "" for a generated one')
    return text


MAX_DEVICE_NETWORK = 256  # addresses of one pages.device_networks network: a listening socket each


def _device_networks(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('must be a list of networks such as ["198.51.100.0/28", "2001:db8:5::/124"]')
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in items:
        try:
            network = ipaddress.ip_network(item)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if network.num_addresses > MAX_DEVICE_NETWORK:
            raise ValueError(
                f"{network.compressed} has {network.num_addresses} addresses; at most {MAX_DEVICE_NETWORK} a "
                "network, since the pages listen on each address with a socket of its own (more networks may "
                "be listed; a bigger pool would need one wildcard listening socket and an AnyIP route, which "
                "bns does not do)"
            )
        for other in networks:
            if network.overlaps(other):
                raise ValueError(f"{network.compressed} overlaps {other.compressed}")
        networks.append(network)
    return tuple(network.compressed for network in networks)


@dataclass(frozen=True)
class PagesSettings:
    """The block and warning pages, served on the policy.block_page and policy.warning_page addresses."""

    serve: bool = setting(True, "serve the block and warning pages on those addresses")
    port: int = setting(80, "TCP port of the pages (browsers go to port 80)", minimum=1, maximum=65535)
    pass_minutes: float = setting(
        60.0, 'how long "continue anyway" opens a warned name for the device', minimum=1, maximum=7 * 24 * 60
    )
    offer_minutes: float = setting(
        10.0, 'how long a warning page\'s "continue anyway" button stays valid', minimum=1, maximum=24 * 60
    )
    secret: str = setting(
        "",
        "key that signs the button's tokens and the site tokens (and $BNS_PAGES_SECRET); empty: one shared "
        "through Redis, or without Redis one made once and kept in <lists.cache_dir>/pages.key",
        convert=_secret,
        show=hidden,
    )
    device_networks: tuple[str, ...] = setting(
        (),
        "networks (each at most 256 addresses) whose every address shows the warning page too: a device behind "
        "a router of identity.trusted_networks, known to its site by MAC or client id, is sent to an address "
        "of its own here, so that its page can offer it the button; needs policy.warning_page and pages.serve",
        convert=_device_networks,
    )


def _server_name(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError('must be a string such as "dns.example.net"')
    name = text.strip().rstrip(".").lower()
    labels = name.split(".") if name else []
    if name and (len(name) > 253 or len(labels) < 2 or not all(_DNS_LABEL.fullmatch(label) for label in labels)):
        raise ValueError(f"{text!r} is not a host name such as dns.example.net")
    return name


_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _doh_path(text: Any) -> str:
    if not isinstance(text, str) or not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", text):
        raise ValueError('must be a URL path such as "/dns-query"')
    return text


@dataclass(frozen=True)
class TlsSettings:
    """DNS over TLS (RFC 7858) and over HTTPS (RFC 8484): more listeners of the DNS workers, answering through
    the same pipeline, cache and decision as UDP and TCP."""

    dot_listen: tuple[Endpoint, ...] = setting(
        (),
        'addresses to serve DNS over TLS on (port 853 unless given: ["0.0.0.0", "[::]"]); empty: none',
        convert=lambda items: _endpoint_list(items, DOT_PORT),
    )
    doh_listen: tuple[Endpoint, ...] = setting(
        (),
        "addresses to serve DNS over HTTPS on, HTTP/2 and HTTP/1.1 (port 443 unless given); empty: none",
        convert=lambda items: _endpoint_list(items, DOH_PORT),
    )
    certificate: str = setting(
        "",
        "PEM file of the certificate chain the DoT and DoH listeners present (this server's certificate first); "
        "needed when either listens. Read again when the file changes (and on SIGHUP): new connections get the "
        "new one, open ones keep theirs",
        path=True,
    )
    key: str = setting("", "PEM file of the certificate's private key", path=True)
    name: str = setting(
        "",
        "this resolver's name, which its certificate must hold (dns.example.net), needed when DoT or DoH "
        "listens: designated-resolver discovery (_dns.resolver.arpa) announces it, and a device's client id "
        "may be the first label of the server name a client asks for under it ({id}.dns.example.net, which "
        "takes a certificate for *.dns.example.net too)",
        convert=_server_name,
    )
    doh_path: str = setting(
        "/dns-query", "the DoH path (RFC 8484); a device's client id may follow it: /dns-query/{id}", convert=_doh_path
    )
    handshake_timeout: float = setting(
        5.0, "seconds a client has to finish its TLS handshake (and the closing one)", minimum=0.1, maximum=120
    )
    idle_timeout: float = setting(
        30.0, "seconds a DoT or DoH connection with nothing in flight stays open", minimum=0.1, maximum=3600
    )
    max_connections: int = setting(
        10_000,
        "open DoT and DoH connections per worker (handshakes included); more are closed at once",
        minimum=1,
        maximum=1_000_000,
    )
    max_per_client: int = setting(
        100, "open DoT and DoH connections per worker from one source address", minimum=1, maximum=1_000_000
    )
    max_streams: int = setting(
        100, "concurrent HTTP/2 streams per DoH connection (SETTINGS_MAX_CONCURRENT_STREAMS)", minimum=1, maximum=10_000
    )
    max_request: int = setting(
        4096,
        "largest DoH request in bytes (a POST body, a GET's dns= parameter once decoded); larger: 413",
        minimum=512,
        maximum=65535,
    )


def _zone_names(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('must be a list of zone names such as ["corp.example", "16.172.in-addr.arpa"]')
    zones = []
    for item in items:
        try:
            wire = text_to_name(item)
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
        if wire == b"\x00":
            raise ValueError("the root cannot be a local zone: nothing would be forwarded")
        zones.append(name_to_text(wire))
    return tuple(zones)


def _record_lines(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError('must be a list of lines such as ["printer.office.example A 192.0.2.20"]')
    parse_records(tuple(items))  # raises ValueError naming the line
    return tuple(items)


def _forwards(table: Any) -> tuple[tuple[str, tuple[Endpoint, ...]], ...]:
    example = '{ "corp.example" = ["10.0.0.53"], "16.172.in-addr.arpa" = ["10.0.0.53", "10.0.0.54:5353"] }'
    if not isinstance(table, dict):
        raise ValueError(f"must be a table of zone = [server addresses], such as {example}")
    forwards: list[tuple[str, tuple[Endpoint, ...]]] = []
    for zone, servers in table.items():
        (name,) = _zone_names([zone])
        try:
            endpoints = _endpoints(servers)
        except ValueError as exc:
            raise ValueError(f"{zone}: {exc}") from None
        for endpoint in endpoints:
            address = ipaddress.ip_address(endpoint.host)
            if (
                address.is_unspecified
                or address.is_multicast
                or endpoint.port == 0
                or str(address) == "255.255.255.255"
            ):
                raise ValueError(
                    f"{zone}: {endpoint} is not a server's address (an unspecified, multicast or "
                    "broadcast address, or port 0)"
                )
        if any(name == other for other, _servers in forwards):
            raise ValueError(f"{zone}: given twice (names are compared in lowercase, without the final dot)")
        forwards.append((name, endpoints))
    return tuple(forwards)


@dataclass(frozen=True)
class LocalSettings:
    """Names answered here and never forwarded (worker/local_zones.py)."""

    defaults: bool = setting(
        True,
        "answer the special-use zones here, never upstream: the reverse zones of private, loopback, link-local and "
        "documentation addresses (RFC 6303), localhost, invalid, test, onion, local and home.arpa",
        live=True,
    )
    not_served: tuple[str, ...] = setting(
        (),
        "default zones, or zones under them, forwarded after all (where an upstream serves them: a company's "
        '["16.172.in-addr.arpa"])',
        convert=_zone_names,
        live=True,
    )
    zones: tuple[str, ...] = setting(
        (), 'more zones answered here: NXDOMAIN under each (["lab.example"])', convert=_zone_names, live=True
    )
    records: tuple[str, ...] = setting(
        (),
        "the network's own names, answered here once the device's policy lets them through: zone-file lines "
        f'"name [ttl] type data" of types {", ".join(TYPES)} (["printer.office.example A 192.0.2.20"]); A and AAAA '
        "give their address's PTR too",
        convert=_record_lines,
        live=True,
    )
    forward: tuple[tuple[str, tuple[Endpoint, ...]], ...] = setting(
        (),
        "zones sent to servers of their own instead of upstream.servers (a company's DNS, a lab's), still filtered "
        'by the device\'s policy: { "corp.example" = ["10.0.0.53"] }; asked as the upstreams are, with their '
        "timeouts and health of their own, but without 0x20's mixed case (a LAN's DNS need not echo it)",
        convert=_forwards,
        live=True,
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = setting(
        "info", "log level: debug, info, warning or error", choices=("debug", "info", "warning", "error"), live=True
    )


@dataclass(frozen=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    lists: ListsSettings = field(default_factory=ListsSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    rate_limit: RateLimitSettings = field(default_factory=RateLimitSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    feeds: FeedSettings = field(default_factory=FeedSettings)
    pages: PagesSettings = field(default_factory=PagesSettings)
    activity: ActivitySettings = field(default_factory=ActivitySettings)
    log: LogSettings = field(default_factory=LogSettings)


def _check_cross_fields(config: Config) -> None:
    if config.policy.answer == "page" and not config.policy.block_page:
        raise ConfigError('policy.answer: "page" needs policy.block_page addresses')
    tls = config.tls
    if (tls.dot_listen or tls.doh_listen) and not (tls.certificate and tls.key):
        listening = "tls.dot_listen" if tls.dot_listen else "tls.doh_listen"
        raise ConfigError(f"{listening}: needs tls.certificate and tls.key (PEM files)")
    if (tls.dot_listen or tls.doh_listen) and not tls.name:
        listening = "tls.dot_listen" if tls.dot_listen else "tls.doh_listen"
        raise ConfigError(f"{listening}: needs tls.name, the name its certificate is for (dns.example.net)")
    _check_tcp_ports(config)
    _check_device_networks(config)
    try:
        check_not_served(config.local.defaults, config.local.not_served, config.local.zones)
    except ValueError as exc:
        raise ConfigError(f"local.not_served: {exc}") from None
    for zone, servers in config.local.forward:
        looping = [str(server) for server in servers if server in config.server.listen]
        if looping:
            raise ConfigError(f"local.forward: {zone}: {', '.join(looping)} is this server's own listen address")
    if config.admin.max_json < config.limits.document_bytes:
        raise ConfigError(
            f"admin.max_json: {config.admin.max_json} is below limits.document_bytes "
            f"({config.limits.document_bytes}); a site at its bound could not be written through the API"
        )
    if config.cache.min_ttl > config.cache.max_ttl:
        raise ConfigError(f"cache.min_ttl: {config.cache.min_ttl} is above cache.max_ttl ({config.cache.max_ttl})")
    strangers = [str(endpoint) for endpoint in config.upstream.keep_case if endpoint not in config.upstream.servers]
    if strangers:
        raise ConfigError(f"upstream.keep_case: {', '.join(strangers)} is not in upstream.servers")
    if config.upstream.deadline < config.upstream.timeout:
        raise ConfigError(
            f"upstream.deadline: {config.upstream.deadline} is shorter than upstream.timeout "
            f"({config.upstream.timeout}); the deadline bounds all attempts together"
        )


def _check_tcp_ports(config: Config) -> None:
    """Each TCP address serves one thing: DNS (server.listen), DoT or DoH. Port 0 is a new port each time."""
    owners: dict[Endpoint, str] = {}
    for key, endpoints in (
        ("server.listen", config.server.listen),
        ("tls.dot_listen", config.tls.dot_listen),
        ("tls.doh_listen", config.tls.doh_listen),
    ):
        for endpoint in endpoints:
            owner = owners.setdefault(endpoint, key)
            if owner != key and endpoint.port:
                raise ConfigError(f"{key}: {endpoint} is in {owner} too; each TCP address serves one protocol")


def _check_device_networks(config: Config) -> None:
    networks = [ipaddress.ip_network(network) for network in config.pages.device_networks]
    if not networks:
        return
    if not config.policy.warning_page:
        raise ConfigError(
            "pages.device_networks: needs policy.warning_page (the address a device gets when it "
            "cannot be given one of its own)"
        )
    if not config.pages.serve:
        raise ConfigError("pages.device_networks: needs pages.serve = true (only bns can tell the devices apart)")
    for key, addresses in (
        ("policy.block_page", config.policy.block_page),
        ("policy.warning_page", config.policy.warning_page),
    ):
        for address in addresses:
            inside = [n for n in networks if ipaddress.ip_address(address) in n]
            if inside:
                raise ConfigError(
                    f"pages.device_networks: {inside[0].compressed} holds {key} {address}; the "
                    "shared page addresses must lie outside it"
                )


def _type_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _check_value(name: str, kind: Any, meta: typing.Mapping[str, Any], raw: Any) -> Any:
    if meta["convert"] is not None:
        try:
            return meta["convert"](raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        raw = float(raw)
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise ConfigError(f"{name}: must be {_type_name(kind)}, got {raw!r}")
    if meta["choices"] is not None and raw not in meta["choices"]:
        raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(meta['choices'])}")
    low, high = meta["minimum"], meta["maximum"]
    if (low is not None and raw < low) or (high is not None and raw > high):
        raise ConfigError(f"{name}: {raw!r} is outside {low}..{high}")
    return raw


def _build(cls: type, table: Any, prefix: str) -> Any:
    where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key in {where}; known keys: {', '.join(known)}")
    values = {}
    for name, spec in known.items():
        if name not in table:
            continue
        kind = hints[name]
        if isinstance(kind, type) and is_dataclass(kind):
            values[name] = _build(kind, table[name], f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", kind, spec.metadata, table[name])
    return cls(**values)


# Settings the environment adds to, so that secrets need not be written in a file: variable → (section, key,
# whether its comma-separated values are added to the file's list, else used only where the file has none).
ENVIRONMENT = {
    "BNS_ADMIN_TOKENS": ("admin", "tokens", True),
    "BNS_READ_TOKENS": ("admin", "read_tokens", True),
    "BNS_PAGES_SECRET": ("pages", "secret", False),
}


def _from_environment(table: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, (section, key, listed) in ENVIRONMENT.items():
        value = environ.get(variable, "").strip()
        if not value or not isinstance(table.setdefault(section, {}), dict):
            continue
        if listed:
            given = table[section].get(key, [])
            table[section][key] = [
                *(given if isinstance(given, list) else [given]),
                *(item.strip() for item in value.split(",") if item.strip()),
            ]
        elif not table[section].get(key):
            table[section][key] = value


def _anchor_paths(table: dict[str, Any], directory: Path) -> None:
    """Relative paths of a configuration file (its own or the defaults') are relative to its directory, so
    that every command reading the file finds the same files wherever it is run from."""
    for section in fields(Config):
        values = table.get(section.name, {})
        if not isinstance(values, dict):
            continue  # refused with its name by _build
        for spec in fields(_SECTIONS[section.name]):
            value = values.get(spec.name, spec.default)
            if spec.metadata["path"] and isinstance(value, str) and value and not Path(value).is_absolute():
                table[section.name] = values = {**values, spec.name: str(directory.absolute() / value)}


def load_config(
    path: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Read a TOML file (or nothing: the embedded defaults), add what the environment sets (`ENVIRONMENT`),
    apply `{section: {key: value}}` overrides. Relative paths from the file are taken from its directory;
    those of the overrides (the command line's) from the current one."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        _anchor_paths(table, path.parent)
    _from_environment(table, environ)
    for section, keys in (overrides or {}).items():
        table.setdefault(section, {})
        if isinstance(table[section], dict):
            table[section].update(keys)
    config = _build(Config, table, "")
    _check_cross_fields(config)
    return config


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # "server" → ServerSettings…


def _flatten(config: Config) -> dict[str, tuple[Any, bool]]:
    """ "section.key" → (value, live) for every setting."""
    return {
        f"{section.name}.{spec.name}": (getattr(getattr(config, section.name), spec.name), spec.metadata["live"])
        for section in fields(Config)
        for spec in fields(_SECTIONS[section.name])
    }


def reloaded(current: Config, loaded: Config) -> tuple[Config, list[str], list[str]]:
    """What a running server becomes on SIGHUP: `loaded` for the keys it can change live, `current` for the
    others; with the keys applied and the keys that changed but need a restart."""
    before, after = _flatten(current), _flatten(loaded)
    changed = [key for key in after if after[key][0] != before[key][0]]
    applied = [key for key in changed if after[key][1]]
    sections: dict[str, dict[str, Any]] = {}
    for key in applied:
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = after[key][0]
    merged = dataclasses.replace(
        current,
        **{section: dataclasses.replace(getattr(current, section), **values) for section, values in sections.items()},
    )
    _check_cross_fields(merged)
    return merged, applied, [key for key in changed if not after[key][1]]


def shown(config: Config, key: str) -> object:
    """The value of `section.key` as a log line may show it: a secret hidden, a URL without its password."""
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    show = next(spec for spec in fields(_SECTIONS[section]) if spec.name == name).metadata["show"]
    if show is not None:
        return show(value)
    return [str(item) for item in value] if isinstance(value, tuple) else value


def describe_settings() -> list[tuple[str, str, str]]:
    """(key, default, description) for every setting: the reference table in docs/configuration.md
    comes from here (tests/docs_reference.py)."""
    rows = []
    for section in fields(Config):
        for spec in fields(_SECTIONS[section.name]):
            default = spec.default
            if isinstance(default, Endpoint):
                default = str(default)
            elif isinstance(default, tuple):
                default = [str(item) for item in default]
            doc = spec.metadata["doc"] + (" (SIGHUP applies a change)" if spec.metadata["live"] else "")
            rows.append((f"{section.name}.{spec.name}", repr(default), doc))
    return rows
