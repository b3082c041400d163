"""Who bns answers and how much: access control, response rate limiting and flood isolation, through a real
worker on loopback sockets, real DNS clients and a scripted upstream that counts what reaches it.

Loopback is a /8: 127.0.0.1 and 127.0.1.1 are two sources in two different /24 prefixes."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from bench.upstream import Script, ScriptedUpstream
from blocklists.catalog import load_catalog
from resolver.shared.config import IdentitySettings, RateLimitSettings, ServerSettings, load_config
from resolver.shared.errors import ConfigError
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.file_policies import FileStore
from resolver.worker.access import ALLOWED, LIMITED, REFUSED, AccessControl
from resolver.worker.rate_limit import DROP, SEND, SLIP, ResponseRateLimiter
from resolver.worker.wire import registered_domain
from tests.conftest import ServerThread, answer_addresses, eventually, make_config, redis_policy_store

pytestmark = pytest.mark.integration

OTHER_PREFIX = "127.0.1.1"


def ask(
    server: ServerThread, name: str, source: str = "127.0.0.1", tcp: bool = False, timeout: float = 2.0, **query: Any
) -> dns.message.Message:
    message = dns.message.make_query(name, "A", use_edns=0, **query)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(message, "127.0.0.1", port=server.port, source=source, timeout=timeout)


def ede_texts(response: dns.message.Message) -> list[str]:
    return [option.text for option in response.options if option.otype == dns.edns.OptionType.EDE]


def ede_codes(response: dns.message.Message) -> list[int]:
    return [option.code for option in response.options if option.otype == dns.edns.OptionType.EDE]


def upstream_names(upstream: ScriptedUpstream) -> list[str]:
    return [seen.name.rstrip(".").lower() for seen in upstream.seen]


# --- access control ------------------------------------------------------------------------------------------


def test_a_source_outside_allow_is_refused_and_never_reaches_the_upstream(upstream):
    with ServerThread(make_config([upstream.address], server={"allow": ["10.0.0.0/8"]})) as server:
        response = ask(server, "www.example.com")
        assert response.rcode() == dns.rcode.REFUSED
        assert 18 in ede_codes(response)  # Prohibited
        assert str(response.question[0].name) == "www.example.com."
        assert response.edns == 0
        assert ask(server, "www.example.com", tcp=True).rcode() == dns.rcode.REFUSED
        assert server.worker is not None and server.worker.shed()["refused_source"] == 2
    assert upstream_names(upstream) == []


def test_a_refused_source_never_reaches_the_policy_store_and_its_refusals_are_rate_limited(upstream, tmp_path):
    path = tmp_path / "policies.json"
    asyncio.run(PolicyService(FileStore(path, load_catalog())).put_site("home", {"networks": ["10.0.0.0/8"]}))
    config = make_config(
        [upstream.address],
        server={"allow": ["10.0.0.0/8"]},
        store={"file": str(path)},
        rate_limit={"responses_per_second": 10, "slip": 2},
    )
    with ServerThread(config) as server:
        seen = burst(server, [f"n{index}.example.com" for index in range(60)])
        assert seen["truncated"] == 0 and 10 <= seen["full"] <= 15  # refusals are never slipped
        assert server.worker is not None and len(server.worker.directory) == 0  # no client was looked up
    assert upstream_names(upstream) == []


def test_refused_sources_can_get_silence_instead(upstream):
    config = make_config([upstream.address], server={"allow": ["10.0.0.0/8"], "refused_answer": "silence"})
    with ServerThread(config) as server:
        with pytest.raises(dns.exception.Timeout):
            ask(server, "www.example.com", timeout=0.5)
        with pytest.raises((ConnectionError, EOFError, OSError)):
            ask(server, "www.example.com", tcp=True, timeout=0.5)
    assert upstream_names(upstream) == []


def test_the_default_answers_loopback_and_the_longest_matching_network_decides(upstream):
    config = make_config([upstream.address], server={"refuse": ["127.0.0.0/24"], "allow": ["127.0.0.0/8", "127.0.0.7"]})
    with ServerThread(config) as server:
        assert ask(server, "a.example.com").rcode() == dns.rcode.REFUSED  # 127.0.0.1: refuse /24 beats allow /8
        assert answer_addresses(ask(server, "b.example.com", source="127.0.0.7"))  # allow /32 beats refuse /24
        assert answer_addresses(ask(server, "c.example.com", source=OTHER_PREFIX))  # only allow /8 holds it
    with ServerThread(make_config([upstream.address])) as server:  # the default: loopback and private ranges
        assert answer_addresses(ask(server, "d.example.com"))


def test_the_networks_of_the_sites_in_the_store_are_answered_and_follow_their_changes(upstream, tmp_path):
    path = tmp_path / "policies.json"
    store = FileStore(path, load_catalog())
    asyncio.run(PolicyService(store).put_site("home", {"networks": ["127.0.0.0/24"]}))
    config = make_config([upstream.address], server={"allow": ["10.0.0.0/8"]}, store={"file": str(path)})
    with ServerThread(config) as server:
        eventually(lambda: answer_addresses(ask(server, "a.example.com")), within=3)
        assert ask(server, "b.example.com", source=OTHER_PREFIX).rcode() == dns.rcode.REFUSED
        asyncio.run(PolicyService(store).put_site("away", {"networks": ["127.0.1.0/24"]}))
        eventually(lambda: answer_addresses(ask(server, "c.example.com", source=OTHER_PREFIX)), within=3)
    assert "b.example.com" not in upstream_names(upstream)


def test_a_bad_network_fails_at_start_up_naming_the_key():
    with pytest.raises(ConfigError, match=r"server\.allow"):
        load_config(None, {"server": {"allow": ["10.0.0.0/33"]}})
    with pytest.raises(ConfigError, match=r"rate_limit\.exempt"):
        load_config(None, {"rate_limit": {"exempt": ["not a network"]}})


def test_access_verdicts():
    server = ServerSettings(allow=("10.0.0.0/8", "2001:db8::/32"), refuse=("10.9.0.0/16", "198.51.100.128/25"))
    limits = RateLimitSettings(exempt=("10.1.0.0/16",))
    sites = ["192.0.2.0/24", "198.51.100.0/24", "0.0.0.0/0", "::/0", "2001:db8:9::/48"]
    access = AccessControl(server, limits, IdentitySettings(trusted_networks=("10.3.0.0/16",)), site_networks=sites)
    assert access["10.1.2.3"] == ALLOWED  # exempt from rate limiting
    assert access["10.3.2.3"] == ALLOWED  # a trusted router
    assert access["10.2.2.3"] == LIMITED
    assert access["10.9.2.3"] == REFUSED
    assert access["192.0.2.9"] == ALLOWED  # a site's network: answered, not limited by default
    assert access["198.51.100.200"] == REFUSED  # refuse beats a site's network, however specific
    assert access["::ffff:10.1.2.3"] == ALLOWED  # IPv4 seen through a dual-stack socket
    assert access["2001:db8::1"] == LIMITED
    assert access["198.51.101.1"] == REFUSED  # a site's 0.0.0.0/0 opens nothing
    assert access["2001:db9::1"] == REFUSED  # nor its ::/0
    assert access["not an address"] == REFUSED
    access.use_site_networks([])
    assert access["192.0.2.9"] == REFUSED
    limited = AccessControl(server, RateLimitSettings(limit_sites=True), IdentitySettings(), site_networks=sites)
    assert limited["192.0.2.9"] == LIMITED
    off = AccessControl(server, RateLimitSettings(responses_per_second=0), IdentitySettings())
    assert off["10.2.2.3"] == ALLOWED  # no rate limiting: nobody is limited


# --- response rate limiting -------------------------------------------------------------------------------


def burst(server: ServerThread, names: list[str], source: str = "127.0.0.1") -> dict[str, int]:
    """Send a query for each of `names` at once from one socket; what came back (full or truncated)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(0.5)
    try:
        for index, name in enumerate(names):
            sock.sendto(dns.message.make_query(name, "A", id=index, use_edns=0).to_wire(), ("127.0.0.1", server.port))
        seen = {"full": 0, "truncated": 0}
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                response = dns.message.from_wire(sock.recv(65535))
            except TimeoutError:
                break
            seen["truncated" if response.flags & dns.flags.TC else "full"] += 1
        return seen
    finally:
        sock.close()


def test_rate_limiting_drops_and_slips_a_flood_from_one_prefix_but_not_another(upstream):
    limits = {"responses_per_second": 10, "slip": 2, "exempt": []}
    with ServerThread(make_config([upstream.address], rate_limit=limits)) as server:
        ask(server, "big.example.com")  # cached
        flood = burst(server, ["big.example.com"] * 200)
        assert flood["full"] <= 15  # a second's budget, and what refills while the burst is read
        assert 80 <= flood["truncated"] <= 100  # every second limited answer slips
        other = burst(server, ["big.example.com"] * 5, source=OTHER_PREFIX)
        assert other == {"full": 5, "truncated": 0}
        # A truncated answer sends a real client to TCP, which is never limited.
        assert answer_addresses(ask(server, "big.example.com", tcp=True))
        time.sleep(1.0)
        assert burst(server, ["big.example.com"] * 5)["full"] == 5  # the budget refills
        assert server.worker is not None
        shed = server.worker.shed()
        assert shed["rate_limit_slipped"] >= 80 and shed["rate_limit_dropped"] >= 80


def test_random_nxdomain_names_share_one_budget():
    with ScriptedUpstream(script=Script(mode="nxdomain")) as upstream:
        limits = {"responses_per_second": 10, "slip": 0, "exempt": []}
        with ServerThread(make_config([upstream.address], rate_limit=limits)) as server:
            seen = burst(server, [f"r{index}.example.com" for index in range(60)])
            assert seen["truncated"] == 0 and 10 <= seen["full"] <= 15
        assert len(upstream.seen) == 60  # each was asked: it is the answers that are limited


def test_loopback_and_private_sources_are_exempt_by_default(upstream):
    with ServerThread(make_config([upstream.address])) as server:
        ask(server, "big.example.com")
        assert burst(server, ["big.example.com"] * 150)["full"] == 150  # above the default rate of 100


def test_rate_limiter_budgets():
    now = [0.0]
    limiter = ResponseRateLimiter(RateLimitSettings(responses_per_second=2, slip=3), clock=lambda: now[0])
    reply = dns.message.make_query("a.example", "A").to_wire()
    reply = reply[:2] + b"\x81\x80" + reply[4:]  # a NOERROR response
    verdicts = [limiter.judge(reply, "192.0.2.1") for _ in range(8)]
    assert verdicts == [SEND, SEND, DROP, DROP, SLIP, DROP, DROP, SLIP]
    assert limiter.judge(reply, "192.0.2.200") == DROP  # the same /24
    assert limiter.judge(reply, "192.0.3.1") == SEND
    now[0] = 0.5
    assert limiter.judge(reply, "192.0.2.1") == SEND  # half a second refills one answer
    assert limiter.judge(reply, "192.0.2.1") != SEND


@pytest.mark.parametrize("flags", [b"\x81\x80", b"\x81\x83", b"\x81\x81"])  # NOERROR, NXDOMAIN, FORMERR
def test_a_reply_with_no_question_is_judged_too(flags):
    """An error answer to a query whose question could not be read is the header alone (and maybe an OPT)."""
    limiter = ResponseRateLimiter(RateLimitSettings(responses_per_second=1, slip=0), clock=lambda: 0.0)
    bare = b"\x12\x34" + flags + bytes(8)
    assert [limiter.judge(bare, "192.0.2.1") for _ in range(2)] == [SEND, DROP]


# --- flood isolation -----------------------------------------------------------------------------------------


def flood(server: ServerThread, names: list[str], source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    for index, name in enumerate(names):
        sock.sendto(dns.message.make_query(name, "A", id=index, use_edns=0).to_wire(), ("127.0.0.1", server.port))
    return sock


def replies(sock: socket.socket, within: float) -> list[dns.message.Message]:
    sock.settimeout(within)
    got = []
    try:
        while True:
            got.append(dns.message.from_wire(sock.recv(65535)))
    except TimeoutError:
        return got


def test_a_client_flooding_unique_names_is_shed_and_others_still_reach_the_upstream():
    with ScriptedUpstream(script=Script(mode="delay", delay=1.0)) as upstream:
        config = make_config(
            [upstream.address],
            upstream={"max_per_client": 20, "max_per_zone": 1000, "timeout": 2.0, "deadline": 3.0},
        )
        with ServerThread(config) as server:
            sock = flood(server, [f"f{index}.flood{index}.example" for index in range(60)])
            quick = replies(sock, 0.5)  # the excess is answered at once, not after the upstream's second
            assert len(quick) == 40
            assert all(response.rcode() == dns.rcode.SERVFAIL for response in quick)
            assert any("your queries" in text for text in ede_texts(quick[0]))
            started = time.monotonic()
            assert answer_addresses(ask(server, "calm.example.net", source=OTHER_PREFIX, timeout=3))
            assert time.monotonic() - started < 1.8
            assert server.worker is not None and server.worker.shed()["client_busy"] == 40
            assert len(replies(sock, 2.0)) == 20  # the upstream's answers, after its second
            sock.close()
            resolver = server.worker.resolver
            assert server.call(lambda: (resolver._waiting, resolver._zone_fetches)) == ({}, {})  # nothing leaks
        assert len([name for name in upstream_names(upstream) if name.startswith("f")]) == 20


def test_a_flooded_domain_gets_only_its_share_of_the_upstream():
    with ScriptedUpstream(script=Script(mode="delay", delay=1.0)) as upstream:
        config = make_config(
            [upstream.address],
            upstream={"max_per_client": 1000, "max_per_zone": 10, "timeout": 2.0, "deadline": 3.0},
        )
        with ServerThread(config) as server:
            sock = flood(server, [f"r{index}.victim.co.uk" for index in range(50)])
            quick = replies(sock, 0.5)
            assert len(quick) == 40 and all(response.rcode() == dns.rcode.SERVFAIL for response in quick)
            assert answer_addresses(ask(server, "www.bystander.co.uk", timeout=3))  # another domain
            assert server.worker is not None and server.worker.shed()["zone_busy"] == 40
            assert len(replies(sock, 2.0)) == 10
            sock.close()
            resolver = server.worker.resolver
            assert server.call(lambda: (resolver._waiting, resolver._zone_fetches)) == ({}, {})
        assert len([name for name in upstream_names(upstream) if name.endswith("victim.co.uk")]) == 10


def test_registered_domain():
    def wire(name: str) -> bytes:
        return b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\x00"

    assert registered_domain(wire("a.b.example.com")) == wire("example.com")
    assert registered_domain(wire("x.y.victim.co.uk")) == wire("victim.co.uk")
    assert registered_domain(wire("r1.abc.io")) == wire("abc.io")  # a short name under a ccTLD is no suffix
    assert registered_domain(wire("r1.bit.ly")) == wire("bit.ly")
    assert registered_domain(wire("r1.t.co")) == wire("t.co")
    assert registered_domain(wire("example.com")) == wire("example.com")
    assert registered_domain(wire("com")) == wire("com")
    assert registered_domain(b"\x00") == b"\x00"


def test_the_sites_networks_come_from_redis_too(upstream, shared_redis, redis_prefix):
    async def put(site_id: str, network: str) -> None:
        store = redis_policy_store(shared_redis.url, redis_prefix)
        try:
            await PolicyService(store).put_site(site_id, {"networks": [network]})
        finally:
            await store.close()

    asyncio.run(put("home", "127.0.0.0/24"))
    config = make_config(
        [upstream.address],
        server={"allow": ["10.0.0.0/8"]},
        store={"redis": shared_redis.url, "prefix": redis_prefix, "cold_wait": 1.0},
    )
    with ServerThread(config) as server:
        eventually(lambda: answer_addresses(ask(server, "a.example.com")), within=3)
        assert ask(server, "b.example.com", source=OTHER_PREFIX).rcode() == dns.rcode.REFUSED
        asyncio.run(put("away", "127.0.1.0/24"))  # a change notice: every worker loads the networks again
        eventually(lambda: answer_addresses(ask(server, "c.example.com", source=OTHER_PREFIX)), within=3)
