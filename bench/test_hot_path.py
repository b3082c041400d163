"""Micro-benchmarks of the query path's Python work, with no sockets (pytest-benchmark).

    python -m pytest bench/test_hot_path.py --benchmark-columns=median,ops -q

A cache hit through the UDP listener (transport replaced by a no-op, so only our code is timed), over the
first 10,000 top-site names, beside the same hits with the parse and render memos defeated.
"""

from __future__ import annotations

import time

import dns.message
import pytest

from bench.harness import DEFAULT_DATA, top_site_names
from bench.upstream import Script, build_reply
from blocklists.catalog import load_catalog
from resolver.shared.config import (
    CacheSettings,
    IdentitySettings,
    PolicySettings,
    RateLimitSettings,
    ServerSettings,
    StoreSettings,
    UpstreamSettings,
)
from resolver.shared.identity import NetworkSet
from resolver.shared.lists import Lists
from resolver.shared.policy.effective import PolicyMaker, answering_from, default_policy
from resolver.worker.access import AccessControl
from resolver.worker.cache import AnswerCache
from resolver.worker.directory import Directory
from resolver.worker.listener import InFlight, UdpListener
from resolver.worker.pipeline import Resolver
from resolver.worker.rate_limit import ResponseRateLimiter
from resolver.worker.upstream import Forwarder
from resolver.worker.wire import QueryParser, scan_reply

CLIENT = ("192.0.2.1", 40000)


class _NoTransport:
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        pass


@pytest.fixture(scope="module")
def warm() -> tuple[UdpListener, list[bytes]]:
    from dnslib import DNSRecord

    cache = AnswerCache(CacheSettings())
    parser = QueryParser()
    queries = []
    for name in top_site_names(DEFAULT_DATA, 10_000):
        data = dns.message.make_query(name, "A", id=1).to_wire()
        request = parser.parse(data, CLIENT, tcp=False)
        reply = build_reply(DNSRecord.parse(data), Script(ttl=86400), tcp=False)
        cache.store(request.query.key, scan_reply(reply, request.query.question), time.monotonic())
        queries.append(data)
    catalog = load_catalog()
    lists = Lists(None, catalog, 100_000, 1.0)
    maker = PolicyMaker(catalog, answering_from(PolicySettings()), default_policy(PolicySettings(), catalog))
    directory = Directory(None, maker, catalog, NetworkSet(()), StoreSettings())
    resolver = Resolver(cache, Forwarder(UpstreamSettings()), lists, directory)
    listener = UdpListener(
        resolver,
        InFlight(),
        AccessControl(ServerSettings(), RateLimitSettings(), IdentitySettings()),
        ResponseRateLimiter(RateLimitSettings()),
    )
    listener.connection_made(_NoTransport())  # type: ignore[arg-type]
    return listener, queries


def _pass(listener: UdpListener, queries: list[bytes]) -> None:
    receive = listener.datagram_received
    for data in queries:
        receive(data, CLIENT)


def test_cache_hit(benchmark, warm):
    """One round = 10,000 hits; per-query cost = the round's time / 10,000."""
    listener, queries = warm
    listener._resolver.parser = QueryParser()
    benchmark(_pass, listener, queries)


def test_cache_hit_without_memos(benchmark, warm):
    """A parser whose memo holds one entry: every query is parsed in full, and since each parse gives a new
    Query object, every hit is rendered from parts: the path as it was before the memos."""
    listener, queries = warm
    listener._resolver.parser = QueryParser(size=0)
    benchmark(_pass, listener, queries)
