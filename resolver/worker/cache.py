"""The answer cache: upstream replies kept as wire bytes with the offsets of their TTLs.

One cache per worker, shared by every policy: filtering runs before it, so one cached answer serves every
device that may see it. An answer is the client's ID and question bytes (0x20 case echoed), the cached
records with their TTLs aged, and an OPT record when the client sent one. Everything after the ID depends
only on the parsed Query (interned by the parser) and the age in whole seconds: a hit is a dict lookup, a
used mark and one join.
"""

from __future__ import annotations

import struct

from resolver.shared.config import CacheSettings
from resolver.shared.dns import EdeCode, Rcode, ede_option
from resolver.worker.wire import HEADER_LEN, Request, ScannedReply, answer_records, opt_record, truncated_answer

_U32 = struct.Struct("!I")
_FLAG_RA = 0x80
_FLAG_AD = 0x20
_FLAG_CD = 0x10
_FLAG_TC = 0x02  # in the high flags byte

STALE_TTL = 30  # RFC 8767 §4: the TTL of a stale answer
_FAILURE_RECHECK = 30.0  # RFC 8767 §5: seconds a name whose upstreams failed is answered stale without asking
_STALE_EDE = ede_option(EdeCode.STALE_ANSWER)
_ANSWERS = (Rcode.NOERROR, Rcode.NXDOMAIN)  # what may be served stale


class _Form:
    """What many answers have in common (their counts, flags, rcode, OPT records and where their TTLs are):
    one object for them all, so that each cached answer holds only its own bytes."""

    __slots__ = (
        "answer_count",
        "counts",
        "counts_edns",
        "low_flags_ad",
        "low_flags_plain",
        "opt_length",
        "opts",
        "rcode",
        "shape",
        "ttl_offsets",
    )

    def __init__(
        self, counts: tuple[int, int, int], rcode: int, ad: bool, ede: bytes, ttl_offsets: tuple[int, ...]
    ) -> None:
        an, ns, ar = counts
        self.shape = (counts, rcode, ad)  # what a copy of an answer of this form is made from (a stale one)
        self.answer_count = an
        self.rcode = rcode
        self.counts = struct.pack("!HHHH", 1, an, ns, ar)
        self.counts_edns = struct.pack("!HHHH", 1, an, ns, ar + 1)
        self.low_flags_plain = _FLAG_RA | (rcode & 0x0F)
        # RFC 6840 §5.8: AD only goes back to a client that asked with AD or DO.
        self.low_flags_ad = self.low_flags_plain | (_FLAG_AD if ad else 0)
        self.opts = (opt_record(False, ede), opt_record(True, ede))
        self.opt_length = len(self.opts[0])
        self.ttl_offsets = ttl_offsets


_FormKey = tuple[tuple[int, int, int], int, bool, bytes, tuple[int, ...]]
_FORMS: dict[_FormKey, _Form] = {}
_MAX_FORMS = 4096  # only odd replies make new forms; never let them grow the memory
_LIFETIMES: dict[int, int] = {}
_STAMPS: dict[int, float] = {}


def _form(key: _FormKey) -> _Form:
    form = _FORMS.get(key)
    if form is None:
        if len(_FORMS) >= _MAX_FORMS:
            _FORMS.clear()
        form = _FORMS[key] = _Form(*key)
    return form


def _stamp(now: float) -> float:
    """`now` to the whole second below, one float object per second: answers stored in the same second share
    it. Ages are whole seconds anyway, as the TTLs they are taken from (Unbound keeps time in seconds too)."""
    second = int(now)
    stamp = _STAMPS.get(second)
    if stamp is None:
        _STAMPS.clear()  # only the current second is ever asked for again
        stamp = _STAMPS[second] = float(second)
    return stamp


class CachedAnswer:
    """One reply, ready to be served to any client that asks the same question.

    Its records are kept once, as wire bytes, with the TTLs as served (clamped by the cache's rules) aged to
    the last second it was asked in; the counts, flags, OPT records and TTL offsets come from a form shared
    by every answer shaped alike. An answer is the client's ID, flags and question bytes (so 0x20 case is
    echoed), these records and our OPT record: one join, the TTLs rewritten at most once a second."""

    __slots__ = ("_aged", "_body", "cname_targets", "form", "lifetime", "machine_made", "stale", "stored_at", "used")

    def __init__(
        self,
        scanned: ScannedReply,
        ttls: list[int],
        lifetime: int,
        now: float,
        ede: bytes = b"",
    ) -> None:
        self.form = _form((scanned.counts, scanned.rcode, scanned.ad, ede, tuple(scanned.ttl_offsets)))
        body = bytearray(scanned.body)
        for offset, ttl in zip(scanned.ttl_offsets, ttls, strict=True):
            _U32.pack_into(body, offset, ttl)
        self.cname_targets = tuple(scanned.cname_targets)
        self.stored_at = _stamp(now)
        self.lifetime = _LIFETIMES.setdefault(lifetime, lifetime)  # few distinct values: shared int objects
        self.used = False  # asked since eviction last passed it over
        self.machine_made = False  # its name looked machine-made (threats.py): each client asking is flagged
        self.stale = False  # a copy of an expired answer (RFC 8767)
        self._aged = 0
        self._body = bytes(body)

    @property
    def expires_at(self) -> float:
        return self.stored_at + self.lifetime

    @property
    def rcode(self) -> int:
        return self.form.rcode

    @property
    def answer_count(self) -> int:
        return self.form.answer_count

    def render(self, request: Request, now: float) -> bytes:
        """The answer for `request`: its ID, flags and question, our records with TTLs aged to `now`."""
        body = self._age_body(int(now - self.stored_at))
        data, query, form = request.data, request.query, self.form
        low = form.low_flags_ad if (data[3] & _FLAG_AD or query.do) else form.low_flags_plain
        flags = bytes((0x80 | (data[2] & 0x01), low | (data[3] & _FLAG_CD)))
        if query.edns:
            message = b"".join(
                (data[:2], flags, form.counts_edns, data[HEADER_LEN : query.qend], body, form.opts[query.do])
            )
        else:
            message = b"".join((data[:2], flags, form.counts, data[HEADER_LEN : query.qend], body))
        if len(message) > query.limit:
            return truncated_answer(request, form.rcode)
        return message

    def stale_copy(self, now: float) -> CachedAnswer:
        """This answer past its lifetime, as RFC 8767 serves it: every TTL 30 s, and EDE 3 (Stale Answer)."""
        counts, rcode, ad = self.form.shape
        scanned = ScannedReply()
        scanned.counts, scanned.rcode, scanned.ad = counts, rcode, ad
        scanned.body = self._body
        scanned.ttl_offsets = list(self.form.ttl_offsets)
        scanned.cname_targets = list(self.cname_targets)
        copy = CachedAnswer(scanned, [STALE_TTL] * len(scanned.ttl_offsets), 0, now, _STALE_EDE)
        copy.machine_made = self.machine_made
        copy.stale = True
        return copy

    def records(self, question_length: int, now: float) -> list[tuple[int, int, bytes]]:
        """(type, TTL aged to `now`, rdata) of the answer section, for answers assembled from this one."""
        body = self._age_body(int(now - self.stored_at))
        return answer_records(body, HEADER_LEN + question_length, self.form.answer_count)

    def _age_body(self, age: int) -> bytes:
        """The records with their TTLs aged by `age` seconds (kept: the next second's clients get them)."""
        body = self._body
        offsets = self.form.ttl_offsets
        if age == self._aged or not offsets:
            return body
        more = age - self._aged
        aging = bytearray(body)
        for offset in offsets:
            ttl = _U32.unpack_from(aging, offset)[0]
            _U32.pack_into(aging, offset, ttl - more if ttl > more else 0)
        self._body = body = bytes(aging)
        self._aged = age
        return body


# Eviction passes over at most this many used answers per insert (giving each a second chance): an insert
# never sweeps the whole cache.
_SECOND_CHANCES = 8


class AnswerCache:
    """A bounded cache of CachedAnswer keyed by `Query.key`, with the TTL rules of one place.

    Eviction is CLOCK (second chance) rather than strict LRU: a hit only marks the answer used instead of
    relinking it, which costs a hit one attribute store instead of an ordered-dict move."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._entries: dict[bytes, CachedAnswer] = {}
        # names whose upstreams failed → (until when they are answered stale, the stale answer)
        self._failing: dict[bytes, tuple[float, CachedAnswer]] = {}
        self.hits = 0
        self.misses = 0
        self.stale_answers = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """How many answers it keeps at most."""
        return self.settings.size

    def use_settings(self, settings: CacheSettings) -> None:
        """Settings reloaded on SIGHUP (the live ones: serving stale)."""
        self.settings = settings

    def get(self, key: bytes, now: float) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if now - entry.stored_at >= entry.lifetime:
            if not self._may_serve_stale(entry, now):
                del self._entries[key]
            self.misses += 1
            return None
        entry.used = True
        self.hits += 1
        return entry

    def _may_serve_stale(self, entry: CachedAnswer, now: float) -> bool:
        """An answer (NOERROR, NXDOMAIN: a failure is no answer) within stale_max of its expiry."""
        settings = self.settings
        return (
            settings.serve_stale
            and entry.form.rcode in _ANSWERS
            and now - entry.stored_at < entry.lifetime + settings.stale_max
        )

    def stale(self, key: bytes, now: float) -> CachedAnswer | None:
        """The expired answer to `key`, if it may still be served stale."""
        entry = self._entries.get(key)
        if entry is None or now - entry.stored_at < entry.lifetime or not self._may_serve_stale(entry, now):
            return None
        return entry

    def failing(self, key: bytes, now: float) -> CachedAnswer | None:
        """The stale answer to a name whose upstreams failed within the last 30 s, answered without asking them
        again (RFC 8767 §5); None for every other name."""
        if not self._failing:
            return None
        failed = self._failing.get(key)
        if failed is None:
            return None
        if now >= failed[0] or self.stale(key, now) is None:
            del self._failing[key]
            return None
        return failed[1]

    def store_failure(self, key: bytes, now: float, ede: bytes) -> CachedAnswer:
        """No upstream answered: the name's expired answer served stale if one is held (and without asking again
        for 30 s), else a SERVFAIL kept `servfail_ttl`."""
        held = self.stale(key, now)
        if held is None:
            return self.store(key, failure_reply(), now, ede)
        if len(self._failing) >= max(self.settings.size, 1):
            self._failing.clear()
        copy = held.stale_copy(now)
        self._failing[key] = (now + _FAILURE_RECHECK, copy)
        return copy

    def store(self, key: bytes, scanned: ScannedReply, now: float, ede: bytes = b"") -> CachedAnswer:
        """Turn a scanned reply into an answer; keep it if its TTL rules say it may be kept."""
        ttls, lifetime = self._ttls(scanned)
        entry = CachedAnswer(scanned, ttls, lifetime, now, ede)
        if self._failing:
            self._failing.pop(key, None)  # answered again
        if lifetime > 0 and self.settings.size > 0:
            entries = self._entries
            if entries.pop(key, None) is None:
                self._make_room(entries)
            entries[key] = entry
        return entry

    def _make_room(self, entries: dict[bytes, CachedAnswer]) -> None:
        chances = _SECOND_CHANCES
        while len(entries) >= self.settings.size:
            oldest = next(iter(entries))
            entry = entries.pop(oldest)
            if entry.used and chances:
                chances -= 1
                entry.used = False
                entries[oldest] = entry

    def clear(self) -> None:
        self._entries.clear()
        self._failing.clear()

    def _ttls(self, scanned: ScannedReply) -> tuple[list[int], int]:
        """(TTL served for each record, seconds the answer is kept)."""
        settings = self.settings
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
