"""Answers for names a policy blocks or warns about, built here and memoised.

NXDOMAIN and NODATA carry an SOA in the authority section whose TTL and MINIMUM are the blocked TTL, so
downstream caches keep the negative answer only that long (RFC 2308). NULL and PAGE answer A and AAAA with
addresses (other types: NODATA). Every answer to an EDNS client carries the verdict's Extended DNS Error
(RFC 8914: 15 Blocked, 17 Filtered) naming the categories.
"""

from __future__ import annotations

import struct

from resolver.policy.runtime import AnswerMode, Verdict
from resolver.wire import Query, Rcode, Request, RRType, resource_record, synthesized_answer, text_to_name

_SOA_MNAME = text_to_name("blocked.bns.invalid")
_SOA_RNAME = text_to_name("hostmaster.bns.invalid")


def _soa(ttl: int) -> bytes:
    rdata = _SOA_MNAME + _SOA_RNAME + struct.pack("!IIIII", 1, 3600, 600, 86400, ttl)
    return resource_record(RRType.SOA, ttl, rdata)


class BlockedAnswers:
    """Builds the answer for (query, verdict) once; later ones are the client's ID plus the memoised rest.

    Both keys are interned objects (the parser's Query, the policy's Verdict), so the memo is exact. It is
    emptied when full."""

    def __init__(self, size: int = 16384) -> None:
        self._size = size
        self._memo: dict[tuple[Query, Verdict], bytes] = {}
        self.counts: dict[Verdict, int] = {}

    def answer(self, request: Request, verdict: Verdict) -> bytes:
        self.counts[verdict] = self.counts.get(verdict, 0) + 1  # verdicts are interned: a handful of keys
        key = (request.query, verdict)
        tail = self._memo.get(key)
        if tail is None:
            if len(self._memo) >= self._size:
                self._memo.clear()
            tail = self._memo[key] = build_blocked_answer(request, verdict)[2:]
        return request.data[:2] + tail


def build_blocked_answer(request: Request, verdict: Verdict) -> bytes:
    qtype = request.query.qtype
    mode = verdict.mode
    if mode is AnswerMode.NXDOMAIN:
        return synthesized_answer(request, Rcode.NXDOMAIN, ede=verdict.ede, authority=_soa(verdict.ttl),
                                  authority_count=1)
    if mode is not AnswerMode.NODATA:
        rtype, addresses = (RRType.A, verdict.ipv4) if qtype == RRType.A else (RRType.AAAA, verdict.ipv6)
        if qtype in (RRType.A, RRType.AAAA) and addresses:
            records = b"".join(resource_record(rtype, verdict.ttl, address) for address in addresses)
            return synthesized_answer(request, Rcode.NOERROR, records, len(addresses), ede=verdict.ede)
    return synthesized_answer(request, Rcode.NOERROR, ede=verdict.ede, authority=_soa(verdict.ttl),
                              authority_count=1)
