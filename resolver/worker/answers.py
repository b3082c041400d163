"""Answers for names a policy blocks or warns about, built here and memoised.

NXDOMAIN and NODATA carry an SOA in the authority section whose TTL and MINIMUM are the blocked TTL, so
downstream caches keep the negative answer only that long (RFC 2308). NULL and PAGE answer A and AAAA with
addresses (other types: NODATA). Every answer to an EDNS client carries the verdict's Extended DNS Error
(RFC 8914: 15 Blocked, 17 Filtered) naming the categories.
"""

from __future__ import annotations

import struct

from resolver.shared.dns import Rcode, RRType, text_to_name
from resolver.shared.memo import make_room
from resolver.shared.policy.decision import AnswerMode, Verdict
from resolver.worker.cache import CachedAnswer
from resolver.worker.wire import Query, Request, resource_record, synthesized_answer

_SOA_MNAME = text_to_name("blocked.bns.invalid")
_SOA_RNAME = text_to_name("hostmaster.bns.invalid")


def _soa(ttl: int) -> bytes:
    rdata = _SOA_MNAME + _SOA_RNAME + struct.pack("!IIIII", 1, 3600, 600, 86400, ttl)
    return resource_record(RRType.SOA, ttl, rdata)


class BlockedAnswers:
    """Answers for (query, verdict): each verdict's records, authority and OPT made once per shape of query,
    and each query's answer memoised (the client's ID plus the rest).

    The memo keys are interned objects (the parser's Query, the policy's Verdict) and, for a warning sent
    to a device's own page address (resolver/shared/page_pool.py), that address: the memo is exact, and two
    devices asking the same query never get each other's address. It is as large as the parser's memo and
    forgets its oldest half when full."""

    def __init__(self, size: int = 16384) -> None:
        self._size = size
        self._memo: dict[tuple[Query, Verdict, bytes], bytes] = {}
        self.counts: dict[Verdict, int] = {}

    def answer(self, request: Request, verdict: Verdict, page: bytes = b"") -> bytes:
        """`page`: the packed address to answer A or AAAA with instead of the verdict's (its version is the
        query type's); empty: the verdict's."""
        self.counts[verdict] = self.counts.get(verdict, 0) + 1  # verdicts are interned: a handful of keys
        key = (request.query, verdict, page)
        tail = self._memo.get(key)
        if tail is None:
            make_room(self._memo, self._size)
            tail = self._memo[key] = build_blocked_answer(request, verdict, page)[2:]
        return request.data[:2] + tail


def build_blocked_answer(request: Request, verdict: Verdict, page: bytes = b"") -> bytes:
    qtype = request.query.qtype
    mode = verdict.mode
    if mode is AnswerMode.NXDOMAIN:
        return synthesized_answer(
            request, Rcode.NXDOMAIN, ede=verdict.ede, authority=_soa(verdict.ttl), authority_count=1
        )
    if mode is not AnswerMode.NODATA:
        rtype, addresses = (RRType.A, verdict.ipv4) if qtype == RRType.A else (RRType.AAAA, verdict.ipv6)
        if page:
            addresses = (page,)
        if qtype in (RRType.A, RRType.AAAA) and addresses:
            records = b"".join(resource_record(rtype, verdict.ttl, address) for address in addresses)
            return synthesized_answer(request, Rcode.NOERROR, records, len(addresses), ede=verdict.ede)
    return synthesized_answer(request, Rcode.NOERROR, ede=verdict.ede, authority=_soa(verdict.ttl), authority_count=1)


_CNAME_TTL = 300


def safe_search_answer(request: Request, target: bytes, entry: CachedAnswer, now: float) -> bytes:
    """CNAME from the asked name to `target`, then `target`'s records of the asked type (from `entry`,
    the cached answer for `target`). For other types, the CNAME alone: the client follows it."""
    query = request.query
    if entry.rcode != Rcode.NOERROR:
        return synthesized_answer(request, entry.rcode)
    cname = resource_record(RRType.CNAME, _CNAME_TTL, target)
    # Each record's owner is `target`: a pointer to the CNAME's data, just after the question and the
    # CNAME's own 12 bytes of pointer, type, class, TTL and length.
    owner = struct.pack("!H", 0xC000 | (query.qend + 12))
    records = [
        resource_record(rtype, ttl, rdata, owner)
        for rtype, ttl, rdata in entry.records(len(query.question), now)
        if rtype == query.qtype
    ]
    return synthesized_answer(request, Rcode.NOERROR, cname + b"".join(records), 1 + len(records))
