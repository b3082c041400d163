"""The hand parser and the answers built without a decoder, against dnspython's view of the same bytes."""

from __future__ import annotations

import contextlib
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.shared.dns import OptionCode, Rcode, text_to_name
from resolver.worker.wire import (
    PLAIN_UDP_LIMIT,
    TCP_LIMIT,
    Malformed,
    QueryParser,
    Rejected,
    error_answer,
    mix_case,
    padded_if_asked,
    read_query,
    reply_fault,
    scan_reply,
    synthesized_answer,
    truncated_answer,
    upstream_query,
)

pytestmark = pytest.mark.unit
CLIENT = ("192.0.2.1", 5353)


def wire(name: str = "www.example.com", rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()


def with_header(data: bytes, **fields: int) -> bytes:
    names = ("id", "flags", "qd", "an", "ns", "ar")
    values = dict(zip(names, struct.unpack_from("!HHHHHH", data), strict=True))
    values.update(fields)
    return struct.pack("!HHHHHH", *(values[name] for name in names)) + data[12:]


def rcode_of(data: bytes) -> Rcode | None:
    try:
        read_query(data, tcp=False)[0]
    except Malformed as error:
        return error.rcode
    return Rcode.NOERROR


class TestReadQuery:
    def test_plain_query(self):
        query = read_query(wire("WwW.ExAmple.COM", "AAAA"), tcp=False)[0]
        assert query.name == b"\x03www\x07example\x03com\x00"
        assert (query.qtype, query.qclass) == (28, 1)
        assert not query.edns and not query.do
        assert query.limit == PLAIN_UDP_LIMIT
        assert query.question == query.name + b"\x00\x1c\x00\x01"

    def test_edns_size_do_and_limit(self):
        query = read_query(wire(use_edns=0, payload=1000, want_dnssec=True), tcp=False)[0]
        assert query.edns and query.do
        assert query.limit == 1000

    def test_udp_limit_is_capped_at_our_1232(self):
        assert read_query(wire(use_edns=0, payload=65535), tcp=False)[0].limit == 1232

    def test_badvers_is_checked_before_the_options(self):
        query = wire()
        options = struct.pack("!HH", 65001, 50) + b"\x00" * 6  # an option that lies about its length
        opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 1 << 16, len(options)) + options
        assert rcode_of(with_header(query + opt, ar=1)) == Rcode.BADVERS

    def test_small_edns_size_is_raised_to_512(self):
        assert read_query(wire(use_edns=0, payload=100), tcp=False)[0].limit == PLAIN_UDP_LIMIT

    def test_tcp_limit_ignores_edns_size(self):
        assert read_query(wire(use_edns=0, payload=1232), tcp=True)[0].limit == TCP_LIMIT

    def test_identity_options_are_kept_and_others_ignored(self):
        options = [
            dns.edns.GenericOption(OptionCode.MAC, bytes.fromhex("aabbccddeeff")),
            dns.edns.GenericOption(OptionCode.CPE_ID, b"cpe-42"),
            dns.edns.ECSOption("198.51.100.0", 24),
            dns.edns.CookieOption(b"12345678", b""),
        ]
        for parser in (QueryParser(), QueryParser(size=0)):  # interned or not
            request = parser.parse(wire(use_edns=0, options=options), ("192.0.2.1", 53), tcp=False)
            assert request.options is not None
            assert request.options[OptionCode.MAC] == bytes.fromhex("aabbccddeeff")
            assert request.options[OptionCode.CPE_ID] == b"cpe-42"
            assert OptionCode.ECS in request.options
            assert OptionCode.COOKIE not in request.options

    def test_cache_key_separates_do_and_cd_but_not_case(self):
        plain = read_query(wire("a.example"), tcp=False)[0].key
        assert read_query(wire("A.EXAMPLE"), tcp=False)[0].key == plain
        assert read_query(wire("a.example", want_dnssec=True), tcp=False)[0].key != plain
        cd = dns.message.make_query("a.example", "A")
        cd.flags |= dns.flags.CD
        assert read_query(cd.to_wire(), tcp=False)[0].key != plain

    def test_qtype_bytes_in_letter_range_are_not_lowercased_into_the_key(self):
        # HTTPS is type 65 (0x41, 'A'); lowercasing it would collide with type 97.
        https = read_query(wire("a.example", "HTTPS"), tcp=False)[0].key
        type97 = read_query(wire("a.example", "TYPE97"), tcp=False)[0].key
        assert https != type97

    @pytest.mark.parametrize(
        ("mutate", "expected"),
        [
            (lambda q: q[:11], None),  # shorter than a header
            (lambda q: with_header(q, flags=0x8100), None),  # QR=1
            (lambda q: with_header(q, flags=0x2800), Rcode.NOTIMP),  # UPDATE
            (lambda q: with_header(q, flags=0x1000), Rcode.NOTIMP),  # NOTIFY
            (lambda q: with_header(q, qd=0), Rcode.FORMERR),
            (lambda q: with_header(q, qd=2), Rcode.FORMERR),
            (lambda q: with_header(q, an=1), Rcode.FORMERR),
            (lambda q: with_header(q, ns=1), Rcode.FORMERR),
            (lambda q: q[:20], Rcode.FORMERR),  # name cut short
            (lambda q: q[:-2], Rcode.FORMERR),  # class missing
            (lambda q: q[:12] + b"\xc0\x0c" + q[-4:], Rcode.FORMERR),  # pointer to itself
            (lambda q: q[:12] + b"\x40" + b"a" * 64 + b"\x00" + q[-4:], Rcode.FORMERR),  # label of 64
        ],
        ids=[
            "short",
            "qr",
            "update",
            "notify",
            "qd0",
            "qd2",
            "an",
            "ns",
            "cut-name",
            "cut-class",
            "pointer-loop",
            "label-64",
        ],
    )
    def test_hostile_headers_and_names(self, mutate, expected):
        assert rcode_of(mutate(wire())) == expected

    def test_name_over_255_bytes(self):
        name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 4 × 64 + 1 = 257
        query = wire()[:12] + name + b"\x00\x01\x00\x01"
        assert rcode_of(query) == Rcode.FORMERR

    def test_name_of_exactly_255_bytes_is_accepted(self):
        name = b"".join(b"\x3f" + b"a" * 63 for _ in range(3)) + b"\x3d" + b"a" * 61 + b"\x00"
        assert len(name) == 255
        assert rcode_of(wire()[:12] + name + b"\x00\x01\x00\x01") == Rcode.NOERROR

    def test_edns_version_1_is_badvers(self):
        with pytest.raises(Malformed) as caught:
            read_query(wire(use_edns=1), tcp=False)[0]
        assert caught.value.rcode == Rcode.BADVERS

    def test_two_opt_records(self):
        query = wire(use_edns=0)
        opt = query[query.index(b"\x00\x00\x29", 12) :]
        assert rcode_of(with_header(query + opt, ar=2)) == Rcode.FORMERR

    def test_opt_owner_must_be_root(self):
        query = wire()
        opt = b"\x01a\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
        assert rcode_of(with_header(query + opt, ar=1)) == Rcode.FORMERR

    def test_lying_opt_length(self):
        query = wire()
        opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 40) + b"\x00" * 8
        assert rcode_of(with_header(query + opt, ar=1)) == Rcode.FORMERR

    def test_lying_option_length(self):
        query = wire()
        options = struct.pack("!HH", 65001, 50) + b"\x00" * 6
        opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(options)) + options
        assert rcode_of(with_header(query + opt, ar=1)) == Rcode.FORMERR

    def test_arcount_larger_than_records(self):
        assert rcode_of(with_header(wire(), ar=1)) == Rcode.FORMERR

    @pytest.mark.parametrize("rdtype", ["OPT", "TSIG", "TKEY"])
    def test_meta_types_cannot_be_queried(self, rdtype):
        assert rcode_of(wire(rdtype=rdtype)) == Rcode.FORMERR


class TestQueryParser:
    def test_same_bytes_after_id_give_the_same_query_object(self):
        parser = QueryParser()
        first = parser.parse(wire(), CLIENT, tcp=False)
        again = wire()
        second = parser.parse(b"\x12\x34" + again[2:], CLIENT, tcp=False)
        assert first.query is second.query
        assert second.data[:2] == b"\x12\x34"

    def test_tcp_and_udp_are_interned_apart(self):
        parser = QueryParser()
        data = wire(use_edns=0, payload=1232)
        assert parser.parse(data, CLIENT, tcp=False).query.limit == 1232
        assert parser.parse(data, CLIENT, tcp=True).query.limit == TCP_LIMIT

    def test_memo_is_bounded(self):
        parser = QueryParser(size=10)
        for index in range(100):
            parser.parse(wire(f"n{index}.example"), CLIENT, tcp=False)
        assert all(len(memo) <= 10 for memo in parser._memos)

    def test_big_queries_are_parsed_but_not_interned(self):
        parser = QueryParser()
        padded = wire(use_edns=0, options=[dns.edns.GenericOption(12, b"\x00" * 600)])
        assert parser.parse(padded, CLIENT, tcp=True).query.name == b"\x03www\x07example\x03com\x00"
        assert not parser._memos[1]

    def test_malformed_queries_are_not_interned(self):
        parser = QueryParser()
        with pytest.raises(Malformed):
            parser.parse(with_header(wire(), qd=2), CLIENT, tcp=False)
        assert not parser._memos[0]


class TestAnswers:
    def test_formerr_echoes_id_question_and_opt_when_readable(self):
        query = wire("x.example", use_edns=0, want_dnssec=True)
        bad = query + b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)  # a second OPT
        bad = with_header(bad, ar=2)
        with pytest.raises(Malformed) as caught:
            read_query(bad, tcp=False)[0]
        answer = dns.message.from_wire(error_answer(bad, caught.value))
        assert answer.id == struct.unpack("!H", query[:2])[0]
        assert answer.rcode() == dns.rcode.FORMERR
        assert str(answer.question[0].name) == "x.example."
        assert answer.edns == 0 and answer.ednsflags & dns.flags.DO  # RFC 6891 §7: bad EDNS is not no EDNS

    def test_badvers_answer(self):
        query = wire(use_edns=1)
        with pytest.raises(Malformed) as caught:
            read_query(query, tcp=False)[0]
        answer = dns.message.from_wire(error_answer(query, caught.value))
        assert answer.rcode() == dns.rcode.BADVERS
        assert answer.edns == 0

    def test_notimp_echoes_opcode_and_question_without_ra(self):
        query = with_header(wire(), flags=0x2800)
        with pytest.raises(Malformed) as caught:
            read_query(query, tcp=False)[0]
        answer = error_answer(query, caught.value)
        assert answer[3] & 0x0F == Rcode.NOTIMP
        assert answer[4:6] == b"\x00\x01" and answer[12:] == query[12:]
        assert answer[2] & 0x78 == 0x28  # the opcode is echoed
        assert not answer[3] & 0x80  # RA: recursion is offered for QUERY only

    def test_unreadable_question_is_not_echoed(self):
        query = with_header(wire(), flags=0x2800)[:-3]
        with pytest.raises(Malformed) as caught:
            read_query(query, tcp=False)[0]
        assert error_answer(query, caught.value)[4:] == b"\x00" * 8

    def test_truncated_answer(self):
        parser = QueryParser()
        request = parser.parse(wire("Big.Example", use_edns=0), CLIENT, tcp=False)
        answer = dns.message.from_wire(truncated_answer(request))
        assert answer.flags & dns.flags.TC
        assert str(answer.question[0].name) == "Big.Example."
        assert not answer.answer

    def test_synthesized_answer_echoes_case_and_rd(self):
        query = dns.message.make_query("MiXeD.example", "A")
        query.flags &= ~dns.flags.RD
        request = QueryParser().parse(query.to_wire(), CLIENT, tcp=False)
        answer = dns.message.from_wire(synthesized_answer(request, Rcode.REFUSED))
        assert answer.rcode() == dns.rcode.REFUSED
        assert not answer.flags & dns.flags.RD
        assert str(answer.question[0].name) == "MiXeD.example."


def reply_for(
    query_wire: bytes, *records: str, rcode: int = 0, authority: tuple[str, ...] = (), edns: bool = True
) -> bytes:
    query = dns.message.from_wire(query_wire)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    for text in records:
        reply.answer.append(dns.rrset.from_text(*text.split(maxsplit=4)))
    for text in authority:
        reply.authority.append(dns.rrset.from_text(*text.split(maxsplit=4)))
    if not edns:
        reply.use_edns(False)
    return reply.to_wire()


class TestScanReply:
    question = text_to_name("www.example.com") + b"\x00\x01\x00\x01"

    def upstream(self) -> bytes:
        return upstream_query(0x4242, self.question, do=False, cd=False)

    def test_records_ttls_and_opt_removed(self):
        reply = reply_for(
            self.upstream(), "www.example.com. 300 IN CNAME cdn.example.net.", "cdn.example.net. 60 IN A 192.0.2.9"
        )
        assert reply_fault(reply, self.question, exact_case=True) is None
        scanned = scan_reply(reply, self.question)
        assert scanned.counts == (2, 0, 0)
        assert scanned.ttls == [300, 60]
        assert scanned.cname_targets == [text_to_name("cdn.example.net")]
        for offset, ttl in zip(scanned.ttl_offsets, scanned.ttls, strict=True):
            assert struct.unpack_from("!I", scanned.body, offset)[0] == ttl
        assert b"\x00\x00\x29" not in scanned.body

    def test_negative_ttl_is_min_of_soa_ttl_and_minimum(self):
        soa = "example.com. 900 IN SOA ns.example.com. host.example.com. 1 3600 600 86400 120"
        scanned = scan_reply(reply_for(self.upstream(), rcode=3, authority=(soa,)), self.question)
        assert scanned.rcode == 3
        assert scanned.negative_ttl == 120

    def test_reply_to_another_question_does_not_match(self):
        other = text_to_name("evil.example") + b"\x00\x01\x00\x01"
        reply = reply_for(upstream_query(1, other, do=False, cd=False), "evil.example. 60 IN A 192.0.2.66")
        assert reply_fault(reply, self.question, exact_case=False) is Rejected.WRONG_QUESTION

    def test_type_bytes_are_compared_exactly(self):
        https = text_to_name("www.example.com") + b"\x00\x41\x00\x01"
        reply = reply_for(upstream_query(1, https, do=False, cd=False))
        assert reply_fault(reply, https, exact_case=False) is None
        type97 = https[:-4] + b"\x00\x61\x00\x01"
        assert reply_fault(reply, type97, exact_case=False) is Rejected.WRONG_QUESTION

    def test_a_query_is_not_a_reply(self):
        assert reply_fault(self.upstream(), self.question, exact_case=False) is Rejected.MALFORMED

    def test_too_short_for_our_question_is_another_question(self):
        reply = reply_for(self.upstream(), edns=False)
        assert reply_fault(reply[:20], self.question, exact_case=False) is Rejected.WRONG_QUESTION
        assert reply_fault(reply[:11], self.question, exact_case=False) is Rejected.MALFORMED

    def test_with_0x20_the_name_must_come_back_letter_for_letter(self):
        sent = mix_case(self.question, b"\xff" * len(self.question))
        assert sent[:-4] == text_to_name("www.example.com").upper()
        reply = reply_for(upstream_query(7, sent, do=False, cd=False), "WWW.EXAMPLE.COM. 60 IN A 192.0.2.1")
        assert reply_fault(reply, sent, exact_case=True) is None
        lowered = reply_for(self.upstream(), "www.example.com. 60 IN A 192.0.2.1")
        assert reply_fault(lowered, sent, exact_case=True) is Rejected.WRONG_CASE
        assert reply_fault(lowered, self.question, exact_case=False) is None  # an upstream in keep_case

    def test_compression_loop_in_reply_is_malformed(self):
        reply = bytearray(reply_for(self.upstream(), "www.example.com. 60 IN A 192.0.2.1", edns=False))
        answer_start = 12 + len(self.question)
        reply[answer_start : answer_start + 2] = struct.pack("!H", 0xC000 | answer_start)  # points at itself
        with pytest.raises(Malformed):
            scan_reply(bytes(reply), self.question)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=120))
    def test_random_tails_never_raise_anything_but_malformed(self, tail):
        reply = reply_for(self.upstream(), edns=False)
        reply = with_header(reply, an=2, ar=1) + tail
        with contextlib.suppress(Malformed):
            scan_reply(reply, self.question)


class TestMixCase:
    def test_only_the_letters_of_the_name_change_case(self):
        question = text_to_name("a-1.example") + b"\x00\x61\x00\x01"  # type 97 is the byte "a"
        mixed = mix_case(question, b"\xff" * len(question))
        assert mixed == text_to_name("a-1.example").upper() + b"\x00\x61\x00\x01"
        assert mix_case(question, bytes(len(question))) == question

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=40))
    def test_noise_picks_the_letters_and_nothing_else_changes(self, seed):
        question = text_to_name("www.mixed-case.example") + b"\x00\x41\x00\x01"
        noise = (seed * len(question))[: len(question)]
        mixed = mix_case(question, noise)
        assert mixed.lower() == question.lower() and mixed[-4:] == question[-4:]
        for sent, plain, bits in zip(mixed[:-4], question[:-4], noise[:-4], strict=True):
            flipped = chr(plain).isalpha() and bits & 0x20
            assert sent == (plain ^ 0x20 if flipped else plain)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_malformed(data):
    try:
        query = read_query(data, tcp=False)[0]
    except Malformed as error:
        if error.rcode is not None:
            error_answer(data, error)  # the edge must be able to answer it
        return
    assert 12 < query.qend <= len(data)


@settings(max_examples=2000, deadline=None)
@given(st.data())
def test_mutated_queries_parse_or_are_answered(data):
    base = bytearray(
        wire(
            "a.b.example",
            "AAAA",
            use_edns=0,
            want_dnssec=True,
            options=[dns.edns.GenericOption(OptionCode.MAC, b"\x01\x02\x03\x04\x05\x06")],
        )
    )
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(base) - 1))
        base[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    mutated = bytes(base[:cut])
    try:
        read_query(mutated, tcp=False)[0]
    except Malformed as error:
        if error.rcode is not None:
            answer = error_answer(mutated, error)
            assert answer[:2] == mutated[:2]
            assert answer[2] & 0x80


def test_padding_reaches_a_multiple_of_468_bytes_never_past_the_limit_and_only_when_the_query_pads() -> None:
    padding_query = wire(use_edns=0, pad=128)
    request = QueryParser().parse(padding_query, CLIENT, True)
    records = b"".join(
        b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes((192, 0, 2, index % 256)) for index in range(200)
    )
    answer = synthesized_answer(request, Rcode.NOERROR, records, 200)
    padded = padded_if_asked(padding_query, answer)
    message = dns.message.from_wire(padded)
    assert len(padded) % 468 == 0 and len(message.answer[0]) == 200
    assert [option.otype for option in message.options] == [dns.edns.OptionType.PADDING]
    assert len(padded_if_asked(padding_query, answer, limit=len(answer) + 10)) == len(answer) + 10  # to the limit
    assert padded_if_asked(padding_query, answer, limit=len(answer) + 3) == answer  # no room for the option
    assert padded_if_asked(wire(use_edns=0), answer) == answer  # the query does not pad
    no_opt = synthesized_answer(QueryParser().parse(wire(), CLIENT, True), Rcode.NOERROR, records, 200)
    assert padded_if_asked(padding_query, no_opt) == no_opt  # no OPT record to carry the option
