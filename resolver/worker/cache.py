"""The answer cache: upstream replies kept as wire bytes with the offsets of their TTLs.

One cache per worker, shared by every policy: filtering runs before it, so one cached answer serves every
device that may see it. An answer is the client's ID and question bytes (0x20 case echoed), the cached
records with their TTLs aged, and an OPT record when the client sent one. Everything after the ID depends
only on the parsed Query (interned by the parser) and the age in whole seconds, so each entry keeps its last
rendering: a repeated hit is a dict lookup, an LRU bump and one concatenation.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from resolver.shared.config import CacheSettings
from resolver.shared.dns import Rcode
from resolver.worker.wire import HEADER_LEN, Query, Request, ScannedReply, answer_records, opt_record, truncated_answer

_U32 = struct.Struct("!I")
_FLAG_RA = 0x80
_FLAG_AD = 0x20
_FLAG_CD = 0x10


class CachedAnswer:
    """One reply, ready to be served to any client that asks the same question."""

    __slots__ = (
        "_memo_age",
        "_memo_query",
        "_memo_tail",
        "answer_count",
        "body",
        "cname_targets",
        "counts",
        "counts_edns",
        "expires_at",
        "low_flags_ad",
        "low_flags_plain",
        "opts",
        "rcode",
        "stored_at",
        "ttl_offsets",
        "ttls",
    )

    def __init__(
        self,
        scanned: ScannedReply,
        ttls: list[int],
        lifetime: int,
        now: float,
        ede: bytes = b"",
    ) -> None:
        an, ns, ar = scanned.counts
        self.answer_count = an
        self.rcode = scanned.rcode
        self.counts = struct.pack("!HHHH", 1, an, ns, ar)
        self.counts_edns = struct.pack("!HHHH", 1, an, ns, ar + 1)
        self.low_flags_plain = _FLAG_RA | (scanned.rcode & 0x0F)
        # RFC 6840 §5.8: AD only goes back to a client that asked with AD or DO.
        self.low_flags_ad = self.low_flags_plain | (_FLAG_AD if scanned.ad else 0)
        self.body = scanned.body
        self.ttl_offsets = scanned.ttl_offsets
        self.ttls = ttls
        self.cname_targets = tuple(scanned.cname_targets)
        self.opts = (opt_record(False, ede), opt_record(True, ede))
        self.stored_at = now
        self.expires_at = now + lifetime
        self._memo_query: Query | None = None
        self._memo_age = -1
        self._memo_tail = b""

    def render(self, request: Request, now: float) -> bytes:
        """The answer for `request`: its ID, flags and question, our records with TTLs aged to `now`."""
        age = int(now - self.stored_at)
        query = request.query
        if query is self._memo_query and age == self._memo_age:
            return request.data[:2] + self._memo_tail
        message = self._render(request, age)
        self._memo_query = query
        self._memo_age = age
        self._memo_tail = message[2:]
        return message

    def _render(self, request: Request, age: int) -> bytes:
        # Aged again on every memo miss rather than kept: a third copy of every answer costs more memory
        # than a few struct.pack_into calls cost time, on a path that runs once per second per entry.
        body = self._age_body(age)
        data, query = request.data, request.query
        low = self.low_flags_ad if (data[3] & _FLAG_AD or query.do) else self.low_flags_plain
        flags = bytes((0x80 | (data[2] & 0x01), low | (data[3] & _FLAG_CD)))
        if query.edns:
            message = b"".join(
                (data[:2], flags, self.counts_edns, data[HEADER_LEN : query.qend], body, self.opts[query.do])
            )
        else:
            message = b"".join((data[:2], flags, self.counts, data[HEADER_LEN : query.qend], body))
        if len(message) > query.limit:
            return truncated_answer(request, self.rcode)
        return message

    def records(self, question_length: int, now: float) -> list[tuple[int, int, bytes]]:
        """(type, TTL aged to `now`, rdata) of the answer section, for answers assembled from this one."""
        body = self._age_body(int(now - self.stored_at))
        return answer_records(body, HEADER_LEN + question_length, self.answer_count)

    def _age_body(self, age: int) -> bytes:
        if not self.ttl_offsets:
            return self.body
        body = bytearray(self.body)
        for offset, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
            _U32.pack_into(body, offset, ttl - age if ttl > age else 0)
        return bytes(body)


class AnswerCache:
    """A bounded LRU of CachedAnswer keyed by `Request.key`, with the TTL rules of one place."""

    def __init__(self, settings: CacheSettings) -> None:
        self._settings = settings
        self._entries: OrderedDict[bytes, CachedAnswer] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def store(self, key: bytes, scanned: ScannedReply, now: float, ede: bytes = b"") -> CachedAnswer:
        """Turn a scanned reply into an answer; keep it if its TTL rules say it may be kept."""
        ttls, lifetime = self._ttls(scanned)
        entry = CachedAnswer(scanned, ttls, lifetime, now, ede)
        if lifetime > 0 and self._settings.size > 0:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            if len(self._entries) > self._settings.size:
                self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def _ttls(self, scanned: ScannedReply) -> tuple[list[int], int]:
        """(TTL served for each record, seconds the answer is kept)."""
        settings = self._settings
        if scanned.rcode == Rcode.NXDOMAIN or (scanned.rcode == Rcode.NOERROR and scanned.counts[0] == 0):
            # RFC 2308 §5: a negative answer is kept for min(SOA TTL, SOA MINIMUM); without an SOA, not at all.
            if scanned.negative_ttl is None:
                return scanned.ttls, 0
            lifetime = min(scanned.negative_ttl, settings.negative_max_ttl)
            return [min(ttl, lifetime) for ttl in scanned.ttls], lifetime
        if scanned.rcode != Rcode.NOERROR:
            return scanned.ttls, settings.servfail_ttl
        low, high = settings.min_ttl, settings.max_ttl
        ttls = [low if ttl < low else high if ttl > high else ttl for ttl in scanned.ttls]
        return ttls, min(ttls, default=0)


def failure_reply(rcode: Rcode = Rcode.SERVFAIL) -> ScannedReply:
    """An empty reply with `rcode`: what is cached when no upstream could answer."""
    scanned = ScannedReply()
    scanned.rcode = rcode
    return scanned
