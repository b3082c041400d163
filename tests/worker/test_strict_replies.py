"""Strict wire replies (issue 12), on real sockets: every error reply to an EDNS query carries an OPT record and
the question when it could be read, RA only for QUERY, NOTAUTH/BADKEY for TSIG, RD=0 from the cache only, and
the upstream's AD bit only when trusted and asked for."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import pytest

from bench.upstream import ScriptedUpstream
from tests.conftest import ServerThread, answer_addresses, make_config

pytestmark = pytest.mark.integration

EDNS_DO = 0x8000
NOT_AUTHORITATIVE = 20  # RFC 8914 Extended DNS Error
BADKEY = 17  # RFC 8945 TSIG error


def exchange(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", port))
        return sock.recv(65535)


def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0x4242, flags, qd, an, ns, ar)


QUESTION = b"\x07example\x03com\x00\x00\x01\x00\x01"


def opt(options: bytes = b"", do: bool = True, version: int = 0) -> bytes:
    ttl = version << 16 | (EDNS_DO if do else 0)
    return b"\x00" + struct.pack("!HHIH", 41, 1232, ttl, len(options)) + options


def assert_opt_echoed(reply: dns.message.Message, do: bool = True) -> None:
    assert reply.edns == 0, "a query with an OPT record gets one back"
    assert bool(reply.ednsflags & dns.flags.DO) == do


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.STATUS], ids=["notify", "status"])
def test_other_opcodes_get_notimp_with_question_and_opt_and_no_ra(server, upstream, opcode):
    query = dns.message.make_query("example.com", "SOA", use_edns=0, want_dnssec=True)
    query.set_opcode(opcode)
    reply = dns.message.from_wire(exchange(server.port, query.to_wire()))
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.opcode() == opcode
    assert not reply.flags & dns.flags.RA
    assert str(reply.question[0].name) == "example.com."
    assert_opt_echoed(reply)
    assert upstream.seen == []


@pytest.mark.parametrize("count", [0, 2])
def test_qdcount_other_than_one_gets_formerr_with_opt(server, count):
    data = header(qd=count, ar=1) + QUESTION * count + opt()
    reply = dns.message.from_wire(exchange(server.port, data))
    assert reply.rcode() == dns.rcode.FORMERR
    assert reply.question == []  # RFC 9619: which question would it echo?
    assert_opt_echoed(reply)


def test_answer_records_in_a_query_get_formerr_with_question_and_opt(server):
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\xc0\x00\x02\x01"
    data = header(an=1, ar=1) + QUESTION + record + opt(do=False)
    reply = dns.message.from_wire(exchange(server.port, data))
    assert reply.rcode() == dns.rcode.FORMERR
    assert str(reply.question[0].name) == "example.com."
    assert_opt_echoed(reply, do=False)


def test_malformed_option_gets_formerr_with_question_and_opt(server):
    lying = struct.pack("!HH", 65001, 50) + b"\x00" * 6  # says 50 bytes, holds 6
    reply = dns.message.from_wire(exchange(server.port, header(ar=1) + QUESTION + opt(lying)))
    assert reply.rcode() == dns.rcode.FORMERR
    assert str(reply.question[0].name) == "example.com."
    assert_opt_echoed(reply)


def test_repeated_opt_gets_formerr_with_question_and_opt(server):
    reply = dns.message.from_wire(exchange(server.port, header(ar=2) + QUESTION + opt() + opt()))
    assert reply.rcode() == dns.rcode.FORMERR
    assert str(reply.question[0].name) == "example.com."
    assert_opt_echoed(reply)


def test_badvers_carries_question_and_opt(server, upstream):
    reply = dns.message.from_wire(exchange(server.port, header(ar=1) + QUESTION + opt(version=1)))
    assert reply.rcode() == dns.rcode.BADVERS  # extended: 0 in the header, 1 in the OPT record
    assert str(reply.question[0].name) == "example.com."
    assert_opt_echoed(reply)
    assert upstream.seen == []


KEY_NAME = dns.name.from_text("client-key.")


def signed_query(name: str) -> dns.message.QueryMessage:
    query = dns.message.make_query(name, "A", use_edns=0)
    keyring = dns.tsigkeyring.from_text({"client-key.": "c2VjcmV0IHNoYXJlZCB3aXRoIG5vYm9keSBoZXJlIQ=="})
    query.use_tsig(keyring, KEY_NAME, algorithm=dns.tsig.HMAC_SHA256)
    return query


def test_tsig_signed_query_gets_notauth_with_badkey_and_is_not_forwarded(server, upstream):
    query = signed_query("signed.example")
    data = query.to_wire()
    sent = query.tsig[0]
    reply = exchange(server.port, data)
    message = dns.message.from_wire(reply, keyring=False)  # read the TSIG record without checking a MAC
    assert message.rcode() == dns.rcode.NOTAUTH
    assert message.answer == [] and str(message.question[0].name) == "signed.example."
    assert_opt_echoed(message, do=False)
    # RFC 8945 §5.3.2: the key and algorithm named, time and fudge and original ID copied, no MAC: unsigned.
    rdata = (
        sent.algorithm.to_wire()
        + struct.pack("!HIH", sent.time_signed >> 32, sent.time_signed & 0xFFFFFFFF, sent.fudge)
        + struct.pack("!HHHH", 0, sent.original_id, BADKEY, 0)
    )
    record = KEY_NAME.to_wire() + struct.pack("!HHIH", 250, dns.rdataclass.ANY, 0, len(rdata)) + rdata
    assert reply.endswith(record)
    with pytest.raises(dns.tsig.PeerBadKey):  # what a real client makes of it
        dns.query.udp(signed_query("signed.example"), "127.0.0.1", port=server.port, timeout=2)
    assert upstream.seen == []


def test_tsig_record_not_last_gets_formerr(server, upstream):
    data = signed_query("signed.example").to_wire()
    record = b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\xc0\x00\x02\x01"
    data = data[:11] + bytes((data[11] + 1,)) + data[12:] + record  # another record after the TSIG
    reply = dns.message.from_wire(exchange(server.port, data), keyring=False)
    assert reply.rcode() == dns.rcode.FORMERR
    assert upstream.seen == []


def no_recursion(name: str) -> dns.message.QueryMessage:
    query = dns.message.make_query(name, "A", use_edns=0)
    query.flags &= ~dns.flags.RD
    return query


def test_rd_clear_and_not_cached_is_refused_and_not_forwarded(server, upstream):
    reply = dns.query.udp(no_recursion("uncached.example"), "127.0.0.1", port=server.port, timeout=2)
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert [error.code for error in reply.extended_errors()] == [NOT_AUTHORITATIVE]
    assert not reply.flags & dns.flags.RD
    assert upstream.seen == []


def test_rd_clear_and_cached_is_answered_from_the_cache(server, upstream):
    fetched = server.ask("cached.example", use_edns=0)
    reply = dns.query.udp(no_recursion("cached.example"), "127.0.0.1", port=server.port, timeout=2)
    assert reply.rcode() == dns.rcode.NOERROR
    assert answer_addresses(reply) == answer_addresses(fetched)
    assert not reply.flags & dns.flags.RD  # the cached rendering echoes this client's RD, not the first's
    assert server.ask("cached.example", use_edns=0).flags & dns.flags.RD
    assert len(upstream.seen) == 1


def test_rd_clear_under_safe_search_is_refused_until_the_restrict_name_is_cached(tmp_path: Path, upstream):
    policies = tmp_path / "policies.json"
    site = {"id": "home", "networks": ["127.0.0.0/8"], "policy": {"safe_search": True}}
    policies.write_text(json.dumps({"format": 1, "sites": {"home": {"doc": site, "version": 1}}, "profiles": {}}))
    with ServerThread(make_config([upstream.address], store={"file": str(policies)})) as server:
        ask = no_recursion("www.google.com")
        refused = dns.query.udp(ask, "127.0.0.1", port=server.port, timeout=2)
        assert refused.rcode() == dns.rcode.REFUSED and upstream.seen == []
        assert server.ask("www.google.com").answer[0].rdtype == dns.rdatatype.CNAME  # safe search is on
        answered = dns.query.udp(ask, "127.0.0.1", port=server.port, timeout=2)
        assert answered.answer[0].rdtype == dns.rdatatype.CNAME and answer_addresses(answered)
        assert upstream.names_seen() == ["forcesafesearch.google.com"]


@pytest.fixture
def validating_upstream(upstream: ScriptedUpstream) -> ScriptedUpstream:
    upstream.script.ad = True
    return upstream


@pytest.fixture
def trusting_server(validating_upstream: ScriptedUpstream) -> Iterator[ServerThread]:
    with ServerThread(make_config([validating_upstream.address], upstream={"trust_ad": True})) as running:
        yield running


def test_upstream_ad_is_cleared_by_default(server, validating_upstream):
    reply = server.ask("validated.example", use_edns=0, want_dnssec=True)
    assert answer_addresses(reply) and not reply.flags & dns.flags.AD


@pytest.mark.parametrize(("do", "ad"), [(True, False), (False, True)], ids=["do", "ad"])
def test_trusted_upstream_ad_is_kept_for_a_client_asking_with_do_or_ad(trusting_server, do, ad):
    query = dns.message.make_query("validated.example", "A", use_edns=0, want_dnssec=do)
    query.flags = query.flags | dns.flags.AD if ad else query.flags & ~dns.flags.AD
    reply = dns.query.udp(query, "127.0.0.1", port=trusting_server.port, timeout=2)
    assert answer_addresses(reply) and reply.flags & dns.flags.AD


def test_trusted_upstream_ad_is_cleared_for_a_client_asking_with_neither(trusting_server):
    query = dns.message.make_query("validated.example", "A", use_edns=0)
    query.flags &= ~dns.flags.AD
    reply = dns.query.udp(query, "127.0.0.1", port=trusting_server.port, timeout=2)
    assert answer_addresses(reply) and not reply.flags & dns.flags.AD


def test_turning_trust_ad_off_live_clears_ad_from_cached_answers(trusting_server, validating_upstream):
    assert trusting_server.ask("validated.example", use_edns=0, want_dnssec=True).flags & dns.flags.AD
    distrusting = make_config([validating_upstream.address], upstream={"trust_ad": False})
    trusting_server.call(trusting_server.worker.reload, distrusting)
    assert not trusting_server.ask("validated.example", use_edns=0, want_dnssec=True).flags & dns.flags.AD
