"""Forwarding and caching through a real worker, with a scripted upstream on loopback, over UDP and TCP."""

from __future__ import annotations

import concurrent.futures
import time

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from bench.upstream import Script, ScriptedUpstream
from resolver.shared.dns import EdeCode, OptionCode
from tests.conftest import ServerThread, answer_addresses, make_config

pytestmark = pytest.mark.integration


@pytest.fixture(params=[False, True], ids=["udp", "tcp"])
def tcp(request) -> bool:
    return request.param


def ede_codes(response: dns.message.Message) -> list[int]:
    return [option.code for option in response.options if option.otype == dns.edns.OptionType.EDE]


def test_answers_through_the_upstream(server, upstream, tcp):
    response = server.ask("www.example.com", tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.RA
    assert answer_addresses(response) and answer_addresses(response)[0].startswith("192.0.2.")
    assert upstream.names_seen() == ["www.example.com"]


def test_mixed_case_question_is_echoed(server, tcp):
    response = server.ask("WwW.ExAmPlE.CoM", tcp=tcp)
    assert str(response.question[0].name) == "WwW.ExAmPlE.CoM."
    assert str(response.answer[0].name) == "WwW.ExAmPlE.CoM."


def test_second_query_is_answered_from_cache_with_aged_ttl(server, upstream, tcp):
    first = server.ask("cached.example", tcp=tcp)
    time.sleep(1.1)
    second = server.ask("CACHED.example", tcp=not tcp)
    assert upstream.names_seen() == ["cached.example"]
    assert answer_addresses(first) == answer_addresses(second)
    assert second.answer[0].ttl < first.answer[0].ttl


def test_concurrent_identical_misses_are_one_upstream_query(upstream):
    upstream.script.modes["slow.example"] = "delay"
    upstream.script.delay = 0.15  # under the attempt timeout: no hedged second query
    with ServerThread(make_config([upstream.address])) as server, concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: server.ask("slow.example"), range(20)))
    assert all(r.rcode() == dns.rcode.NOERROR and answer_addresses(r) for r in responses)
    assert upstream.names_seen() == ["slow.example"]


def test_upstream_slower_than_the_attempt_timeout_still_answers(upstream):
    """After `timeout` the query is asked again, but the first attempt is still listened to."""
    upstream.script.mode = "delay"
    upstream.script.delay = 0.6
    config = make_config([upstream.address], upstream={"timeout": 0.25, "deadline": 2.0})
    with ServerThread(config) as server:
        response = server.ask("cold.example")
    assert response.rcode() == dns.rcode.NOERROR and answer_addresses(response)
    assert 2 <= len(upstream.seen) <= 3


def test_identity_options_are_not_forwarded(server, upstream):
    options = [
        dns.edns.GenericOption(OptionCode.MAC, bytes.fromhex("020000000001")),
        dns.edns.GenericOption(OptionCode.CPE_ID, b"cpe"),
        dns.edns.ECSOption("198.51.100.7", 32),
    ]
    response = server.ask("private.example", use_edns=0, options=options)
    assert response.rcode() == dns.rcode.NOERROR
    assert upstream.seen[0].option_codes == []


def test_upstream_queries_use_random_ids_and_ports(server, upstream):
    for index in range(40):
        server.ask(f"n{index}.example")
    ids = {seen.query_id for seen in upstream.seen}
    ports = {seen.source_port for seen in upstream.seen}
    assert len(ids) >= 38  # 40 draws from 65536: a repeat is possible, many are not
    assert len(ports) >= 35  # a socket per query, each on a kernel-chosen random port


def test_nxdomain_is_cached_per_soa(server, upstream):
    upstream.script.modes["gone.example"] = "nxdomain"
    assert server.ask("gone.example").rcode() == dns.rcode.NXDOMAIN
    assert server.ask("gone.example").rcode() == dns.rcode.NXDOMAIN
    assert upstream.names_seen() == ["gone.example"]


def test_upstream_servfail_is_passed_on_and_cached_briefly(server, upstream):
    upstream.script.modes["broken.example"] = "servfail"
    assert server.ask("broken.example").rcode() == dns.rcode.SERVFAIL
    assert server.ask("broken.example").rcode() == dns.rcode.SERVFAIL
    assert upstream.names_seen() == ["broken.example"]


def test_truncated_upstream_reply_is_asked_again_over_tcp(server, upstream):
    upstream.script.modes["tc.example"] = "truncate"
    response = server.ask("tc.example")
    assert answer_addresses(response)
    assert [(seen.name, seen.tcp) for seen in upstream.seen] == [("tc.example", False), ("tc.example", True)]


def test_big_answer_is_truncated_for_a_client_without_edns_and_whole_over_tcp(server, upstream):
    upstream.script.modes["big.example"] = "big"
    udp = server.ask("big.example")
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = server.ask("big.example", tcp=True)
    assert len(tcp.answer[0]) == 40
    edns = server.ask("big.example", use_edns=0, payload=1232)
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 40


@pytest.mark.parametrize("rdtype", ["HTTPS", "SVCB", "SPF", "TXT", "MX", "CAA"])
def test_types_whose_code_bytes_look_like_letters_are_forwarded(server, upstream, rdtype):
    """HTTPS is 0x0041 ('A'), SPF 0x0063 ('c'): only the name may be compared case-insensitively."""
    response = server.ask("types.example", rdtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.authority and response.authority[0].rdtype == dns.rdatatype.SOA  # the upstream's NODATA
    assert upstream.seen[0].qtype == rdtype


def test_udp_answers_never_exceed_1232_bytes_whatever_the_client_advertises(server, upstream):
    upstream.script.modes["huge.example"] = "big"
    upstream.script.big_count = 100  # ~1.7 kB
    response = server.ask("huge.example", use_edns=0, payload=65535)
    assert response.flags & dns.flags.TC and not response.answer
    assert len(server.ask("huge.example", tcp=True).answer[0]) == 100


def test_a_refusing_upstream_does_not_end_the_wait_for_a_slow_good_one(upstream):
    upstream.script.mode = "delay"
    upstream.script.delay = 0.4
    with ScriptedUpstream(script=Script(mode="servfail")) as failing:
        config = make_config([failing.address, upstream.address], upstream={"timeout": 0.25, "deadline": 2.0})
        with ServerThread(config) as server:
            response = server.ask("patience.example")
    assert response.rcode() == dns.rcode.NOERROR and answer_addresses(response)


@pytest.mark.parametrize("mode", ["drop", "garbage", "wrong_id", "wrong_question"])
def test_bad_upstream_gives_servfail_within_the_deadline(upstream, mode):
    upstream.script.mode = mode
    with ServerThread(make_config([upstream.address], upstream={"deadline": 1.0})) as server:
        started = time.monotonic()
        response = server.ask("victim.example", use_edns=0, timeout=5)
        elapsed = time.monotonic() - started
    assert response.rcode() == dns.rcode.SERVFAIL
    assert EdeCode.NO_REACHABLE_AUTHORITY in ede_codes(response)
    assert 0.9 <= elapsed < 1.6


def test_spoofed_reply_is_ignored_and_the_real_one_taken(upstream):
    """A reply with a wrong ID does not end the wait: a later matching reply still counts (RFC 5452)."""
    with (
        ScriptedUpstream(script=Script(mode="wrong_id")) as liar,
        ServerThread(make_config([liar.address, upstream.address])) as server,
    ):
        response = server.ask("target.example")
    assert answer_addresses(response)
    assert upstream.names_seen() == ["target.example"]


def test_failover_to_the_next_upstream_and_down_marking(upstream):
    with ScriptedUpstream(script=Script(mode="drop")) as dead:
        config = make_config([dead.address, upstream.address], upstream={"down_after": 2, "timeout": 0.2})
        with ServerThread(config) as server:
            for index in range(2):
                assert answer_addresses(server.ask(f"f{index}.example"))
            assert len(dead.seen) == 2
            started = time.monotonic()
            assert answer_addresses(server.ask("after-down.example"))
            assert time.monotonic() - started < 0.15  # the down upstream is skipped, not waited for
            assert len(dead.seen) == 2


def test_refused_by_one_upstream_is_asked_of_the_next(upstream):
    with (
        ScriptedUpstream(script=Script(mode="refused")) as refusing,
        ServerThread(make_config([refusing.address, upstream.address])) as server,
    ):
        assert answer_addresses(server.ask("r.example"))


def test_outstanding_upstream_queries_are_bounded(upstream):
    upstream.script.mode = "delay"
    upstream.script.delay = 0.5
    config = make_config([upstream.address], upstream={"max_outstanding": 2})
    with ServerThread(config) as server, concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(server.ask, f"busy{index}.example") for index in range(2)]
        time.sleep(0.1)
        started = time.monotonic()
        refused = server.ask("one-too-many.example")
        assert time.monotonic() - started < 0.3
        assert refused.rcode() == dns.rcode.SERVFAIL
        assert all(future.result().rcode() == dns.rcode.NOERROR for future in slow)


def test_any_gets_the_rfc8482_answer_without_asking_upstream(server, upstream):
    response = server.ask("example.com", "ANY")
    assert response.answer[0].rdtype == dns.rdatatype.HINFO
    assert response.answer[0][0].cpu == b"RFC8482"
    assert upstream.seen == []


@pytest.mark.parametrize(("rdtype", "rdclass"), [("AXFR", "IN"), ("TXT", "CH")])
def test_zone_transfers_and_other_classes_are_refused(server, upstream, rdtype, rdclass):
    query = dns.message.make_query("version.bind" if rdclass == "CH" else "example.com", rdtype, rdclass)
    response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2)
    assert response.rcode() == dns.rcode.REFUSED
    assert upstream.seen == []


def test_rd_flag_is_echoed(server):
    server.ask("nord.example")  # cached: a query without RD is answered from the cache only
    query = dns.message.make_query("nord.example", "A")
    query.flags &= ~dns.flags.RD
    response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2)
    assert not response.flags & dns.flags.RD and response.answer
