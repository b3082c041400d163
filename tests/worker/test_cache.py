"""The answer cache: TTL rules, aging, negative caching, LRU bounds, and per-client rendering."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from resolver.shared.config import CacheSettings
from resolver.shared.dns import EdeCode, Rcode, ede_option
from resolver.worker.cache import AnswerCache, failure_reply
from resolver.worker.wire import QueryParser, ScannedReply, scan_reply, upstream_query

pytestmark = pytest.mark.unit
CLIENT = ("192.0.2.1", 5353)
SOA = "example.com. 900 IN SOA ns.example.com. host.example.com. 1 3600 600 86400 {minimum}"


def scanned(
    name: str, *records: str, rcode: int = 0, authority: tuple[str, ...] = (), ad: bool = False
) -> tuple[bytes, ScannedReply]:
    """(key, scanned upstream reply) for a question about `name`."""
    request = QueryParser().parse(dns.message.make_query(name, "A").to_wire(), CLIENT, tcp=False)
    question = request.query.question
    reply = dns.message.make_response(dns.message.from_wire(upstream_query(7, question, False, False)))
    reply.set_rcode(rcode)
    if ad:
        reply.flags |= dns.flags.AD
    for text in records:
        reply.answer.append(dns.rrset.from_text(*text.split(maxsplit=4)))
    for text in authority:
        reply.authority.append(dns.rrset.from_text(*text.split(maxsplit=4)))
    return request.query.key, scan_reply(reply.to_wire(), question)


def ask(name: str, **kwargs: object):
    return QueryParser().parse(dns.message.make_query(name, "A", **kwargs).to_wire(), CLIENT, tcp=False)


def served(entry, request, now: float) -> dns.message.Message:
    return dns.message.from_wire(entry.render(request, now))


def ttls_of(message: dns.message.Message) -> list[int]:
    return [rrset.ttl for section in (message.answer, message.authority) for rrset in section]


class TestTtlRules:
    def test_positive_ttls_age_and_expire_with_the_shortest(self):
        cache = AnswerCache(CacheSettings())
        key, reply = scanned(
            "www.example.com", "www.example.com. 300 IN CNAME a.example.net.", "a.example.net. 60 IN A 192.0.2.1"
        )
        cache.store(key, reply, now=1000.0)
        entry = cache.get(key, 1010.5)
        assert ttls_of(served(entry, ask("www.example.com"), 1010.5)) == [290, 50]
        assert cache.get(key, 1059.9) is not None
        assert cache.get(key, 1060.0) is None

    def test_min_and_max_ttl_clamp(self):
        cache = AnswerCache(CacheSettings(min_ttl=30, max_ttl=100))
        key, reply = scanned(
            "www.example.com", "www.example.com. 5 IN CNAME a.example.net.", "a.example.net. 900 IN A 192.0.2.1"
        )
        entry = cache.store(key, reply, now=0.0)
        assert ttls_of(served(entry, ask("www.example.com"), 0.0)) == [30, 100]
        assert entry.expires_at == 30

    def test_nxdomain_kept_for_min_of_soa_ttl_and_minimum(self):
        cache = AnswerCache(CacheSettings())
        key, reply = scanned("gone.example.com", rcode=3, authority=(SOA.format(minimum=120),))
        entry = cache.store(key, reply, now=0.0)
        assert entry.expires_at == 120
        assert ttls_of(served(entry, ask("gone.example.com"), 20.0)) == [100]  # SOA TTL capped, then aged

    def test_negative_ttl_capped_by_setting(self):
        cache = AnswerCache(CacheSettings(negative_max_ttl=10))
        key, reply = scanned("gone.example.com", rcode=3, authority=(SOA.format(minimum=120),))
        assert cache.store(key, reply, now=0.0).expires_at == 10

    def test_nodata_without_soa_is_not_kept(self):
        cache = AnswerCache(CacheSettings())
        key, reply = scanned("empty.example.com")
        cache.store(key, reply, now=0.0)
        assert cache.get(key, 0.0) is None

    def test_servfail_kept_briefly(self):
        cache = AnswerCache(CacheSettings(servfail_ttl=5))
        key, _ = scanned("broken.example.com")
        cache.store(key, failure_reply(), now=0.0)
        assert cache.get(key, 4.9) is not None
        assert cache.get(key, 5.0) is None

    def test_zero_ttl_is_served_but_not_kept(self):
        cache = AnswerCache(CacheSettings())
        key, reply = scanned("now.example.com", "now.example.com. 0 IN A 192.0.2.1")
        entry = cache.store(key, reply, now=0.0)
        assert served(entry, ask("now.example.com"), 0.0).answer
        assert cache.get(key, 0.0) is None


class TestBounds:
    def test_lru_evicts_the_least_recently_used(self):
        cache = AnswerCache(CacheSettings(size=2))
        entries = {name: scanned(name, f"{name}. 300 IN A 192.0.2.1") for name in ("a.test", "b.test", "c.test")}
        cache.store(*entries["a.test"], now=0.0)
        cache.store(*entries["b.test"], now=0.0)
        assert cache.get(entries["a.test"][0], 1.0) is not None  # a is now more recent than b
        cache.store(*entries["c.test"], now=2.0)
        assert len(cache) == 2
        assert cache.get(entries["b.test"][0], 3.0) is None
        assert cache.get(entries["a.test"][0], 3.0) is not None

    def test_size_zero_disables_caching(self):
        cache = AnswerCache(CacheSettings(size=0))
        key, reply = scanned("a.test", "a.test. 300 IN A 192.0.2.1")
        cache.store(key, reply, now=0.0)
        assert len(cache) == 0


class TestRendering:
    def test_each_client_gets_its_own_id_case_and_edns(self):
        cache = AnswerCache(CacheSettings())
        key, reply = scanned("www.example.com", "www.example.com. 300 IN A 192.0.2.1")
        entry = cache.store(key, reply, now=0.0)
        first_request = ask("WWW.example.COM")
        second_request = ask("www.EXAMPLE.com", use_edns=0)
        first = served(entry, first_request, 1.0)
        second = served(entry, second_request, 1.0)
        assert first.id == int.from_bytes(first_request.data[:2], "big")
        assert second.id == int.from_bytes(second_request.data[:2], "big")
        assert str(first.question[0].name) == "WWW.example.COM."
        assert str(second.question[0].name) == "www.EXAMPLE.com."
        assert first.edns < 0 and second.edns == 0
        assert [m.answer[0][0].address for m in (first, second)] == ["192.0.2.1", "192.0.2.1"]

    def test_rendering_matches_the_request_it_was_asked_for(self):
        """The render memo must never hand one client another client's ID or bytes."""
        cache = AnswerCache(CacheSettings())
        key, reply = scanned("www.example.com", "www.example.com. 300 IN A 192.0.2.1")
        entry = cache.store(key, reply, now=0.0)
        parser = QueryParser()
        base = dns.message.make_query("www.example.com", "A").to_wire()
        for query_id in (1, 2, 3):
            request = parser.parse(query_id.to_bytes(2, "big") + base[2:], CLIENT, tcp=False)
            message = served(entry, request, 5.0)
            assert message.id == query_id
            assert message.answer[0].ttl == 295
        later = parser.parse(b"\x00\x09" + base[2:], CLIENT, tcp=False)
        assert served(entry, later, 7.0).answer[0].ttl == 293

    def test_ad_only_for_clients_asking_with_ad_or_do(self):
        cache = AnswerCache(CacheSettings())
        key, reply = scanned("signed.example", "signed.example. 300 IN A 192.0.2.1", ad=True)
        entry = cache.store(key, reply, now=0.0)
        plain = dns.message.make_query("signed.example", "A")
        plain.flags &= ~dns.flags.AD
        asks_ad = dns.message.make_query("signed.example", "A")
        asks_ad.flags |= dns.flags.AD
        parser = QueryParser()
        assert not served(entry, parser.parse(plain.to_wire(), CLIENT, False), 1.0).flags & dns.flags.AD
        assert served(entry, parser.parse(asks_ad.to_wire(), CLIENT, False), 1.0).flags & dns.flags.AD

    def test_answer_too_big_for_the_client_is_truncated(self):
        cache = AnswerCache(CacheSettings())
        records = [f"big.example. 300 IN A 192.0.2.{index}" for index in range(1, 41)]
        key, reply = scanned("big.example", *records)
        entry = cache.store(key, reply, now=0.0)
        no_edns = served(entry, ask("big.example"), 1.0)
        assert no_edns.flags & dns.flags.TC and not no_edns.answer
        with_edns = served(entry, ask("big.example", use_edns=0, payload=1232), 1.0)
        assert not with_edns.flags & dns.flags.TC and len(with_edns.answer[0]) == 40

    def test_a_truncated_rendering_does_not_cost_later_clients_the_records(self):
        """The records are kept once, in the last rendering; a truncated one (no records) must not replace it."""
        cache = AnswerCache(CacheSettings())
        records = [f"big.example. 300 IN A 192.0.2.{index}" for index in range(1, 41)]
        key, reply = scanned("big.example", *records)
        entry = cache.store(key, reply, now=0.0)
        assert len(served(entry, ask("big.example", use_edns=0, payload=1232), 1.0).answer[0]) == 40
        assert served(entry, ask("big.example"), 1.0).flags & dns.flags.TC
        for now in (1.0, 3.0):  # the same age as the memo, and older (aged from what is kept)
            again = served(entry, ask("BIG.example", use_edns=0, payload=1232), now)
            assert len(again.answer[0]) == 40 and again.answer[0].ttl == 300 - int(now)

    def test_ede_travels_with_the_entry(self):
        cache = AnswerCache(CacheSettings())
        key, _ = scanned("down.example")
        entry = cache.store(
            key, failure_reply(Rcode.SERVFAIL), 0.0, ede_option(EdeCode.NO_REACHABLE_AUTHORITY, "no upstream answered")
        )
        message = served(entry, ask("down.example", use_edns=0), 0.0)
        assert message.rcode() == dns.rcode.SERVFAIL
        ede = [option for option in message.options if option.otype == dns.edns.OptionType.EDE]
        assert ede and ede[0].code == EdeCode.NO_REACHABLE_AUTHORITY
