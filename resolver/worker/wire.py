"""DNS wire format, by hand: the query view the hot path needs, the answers built without a decoder, and the
scanner that reads an upstream reply once before it is cached.

A full decoder (dnslib) costs about 100 µs per message; the query path has a budget of a few µs, so a query
is read as offsets into its own bytes, and answers are assembled from byte strings.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from resolver.shared.dns import CLASS_ANY, CLASS_IN, MAX_LABEL_LEN, MAX_NAME_LEN, OptionCode, Rcode, RRType
from resolver.shared.errors import BnsError
from resolver.shared.memo import make_room

HEADER_LEN = 12
ADVERTISED_UDP_SIZE = 1232  # RFC 6891 §6.2.5 and the DNS Flag Day 2020 value: no IP fragmentation
PLAIN_UDP_LIMIT = 512  # RFC 1035 §4.2.1: without EDNS a UDP answer is at most 512 bytes
TCP_LIMIT = 65535
# A client's socket address as the event loop gives it: (host, port) over IPv4, (host, port, flow info, scope
# id) over IPv6. Both are spelled out: compiled, a tuple type is checked, length included.
Peer = tuple[str, int] | tuple[str, int, int, int]


# Meta-types that are not data (RFC 6895): a question for one is malformed.
NOT_QUERYABLE = frozenset((RRType.OPT, RRType.TKEY, RRType.TSIG))
# Answered here, never forwarded: RFC 8482 ANY, zone transfers, the obsolete mail meta-types.
LOCAL_TYPES = frozenset((RRType.ANY, RRType.AXFR, RRType.IXFR, RRType.MAILA, RRType.MAILB))
# Answered here, never forwarded: resolver.arpa and the names under it (RFC 9462 §6.4; resolver/worker/discovery.py).
RESOLVER_ARPA = b"\x08resolver\x04arpa\x00"

# The EDNS options that carry client identity: parsed into the request, never forwarded upstream.
IDENTITY_OPTIONS = frozenset(
    (OptionCode.ECS, OptionCode.MAC, OptionCode.MAC_TEXT, OptionCode.CPE_ID, OptionCode.UMBRELLA)
)

_FLAG_QR = 0x80
_FLAG_OPCODE = 0x78
_FLAG_RD = 0x01
_FLAG_RA = 0x80
_FLAG_AD = 0x20
_FLAG_CD = 0x10
_EDNS_DO = 0x8000

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_COUNTS = struct.Struct("!HHHH")  # QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT
_OPTION_HEAD = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, RDLENGTH

_LIMITS: dict[int, int] = {}

# Cache-key state byte: the query flags that change the upstream's answer.
STATE_DO = 1
STATE_CD = 2


class Malformed(BnsError):
    """A query that gets an error answer (or none). `rcode` None means: stay silent.

    What the answer echoes (the question, an OPT record) `error_answer` reads again from the query's bytes,
    so whoever raises needs to know nothing about it; `tsig` is the TSIG record a NOTAUTH answer carries.
    """

    def __init__(self, rcode: Rcode | None, reason: str, tsig: bytes = b"") -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.tsig = tsig


class LocalAnswers(Protocol):
    """Who answers the names of a zone served here (local_zones.py, discovery.py), or a name of the operator's
    records (`filtered`: answered once the device's policy lets it through; else before the client is known)."""

    filtered: bool

    def answer(self, request: Request) -> bytes:
        """The answer to an IN query for a name at or under the zone's apex."""


class Query:
    """Everything a query's bytes say apart from its ID: the same bytes always give the same Query, so the
    parser interns them (see QueryParser) and later stages may memoise on the object itself.

    `key` (the question name in lowercased wire form, type, class, state byte) is what the cache and the
    upstream coalescing are keyed on; `limit` is the largest answer the client can take; `local` marks
    queries answered here whatever the cache holds (other classes, ANY, zone transfers, and the names of
    `zone`, a zone served here: local_zones.py, set by the parser; an operator's records are a `zone` too, but
    not local: they are answered after the policy's decision).
    `bits` are the name's categories in the list snapshot of generation `listed_in` (the query path's memo: a
    name asked again costs no lookup until the list is swapped).
    """

    __slots__ = ("bits", "edns", "key", "limit", "listed_in", "local", "zone")

    def __init__(self, key: bytes, edns: bool, limit: int) -> None:
        self.key = key
        self.edns = edns
        self.limit = limit
        self.local = self.qclass != CLASS_IN or self.qtype in LOCAL_TYPES
        self.zone: LocalAnswers | None = None
        self.bits = 0
        self.listed_in = 0  # no snapshot has generation 0

    # What the key holds is read from it rather than kept twice: every interned query costs less memory.
    @property
    def qend(self) -> int:
        """Where the question ends in the query's bytes (after the header, the name, its type and class)."""
        return len(self.key) + HEADER_LEN - 1

    @property
    def name(self) -> bytes:
        """The question name, lowercased wire form."""
        return self.key[:-5]

    @property
    def qtype(self) -> int:
        key = self.key
        return key[-5] << 8 | key[-4]

    @property
    def qclass(self) -> int:
        key = self.key
        return key[-3] << 8 | key[-2]

    @property
    def do(self) -> bool:
        return bool(self.key[-1] & STATE_DO)

    @property
    def cd(self) -> bool:
        return bool(self.key[-1] & STATE_CD)

    @property
    def question(self) -> bytes:
        """The lowercased question (name, type, class): what is sent upstream."""
        return self.key[:-1]


class Request:
    """One arrival of a query: its bytes (ID included), who sent it, what parsing them gave, and the identity
    options it carries (`options` by code, `identity` the same as one hashable value: with the source
    address, the key of a client), which only a trusted source is believed about. `client_id` is the one an
    encrypted transport read from the DoH path or the TLS server name ("" when it was malformed)."""

    __slots__ = ("client", "client_id", "data", "identity", "options", "query")

    def __init__(
        self,
        data: bytes,
        client: Peer,
        query: Query,
        options: dict[int, bytes] | None = None,
        identity: bytes | None = None,
    ) -> None:
        self.data = data
        self.client = client
        self.query = query
        self.options = options
        self.identity = identity
        self.client_id: str | None = None


# Real queries are well under this (a name, an OPT, a cookie, RFC 8467 padding to 128); a bigger one is
# parsed but not interned, so the memo holds at most size × 512 bytes of keys whatever clients send.
MAX_INTERNED = 512


class QueryParser:
    """Parses queries, interning the result by what decides it: everything but the ID and the EDNS options.

    Real traffic repeats the same few thousand questions, but not in the same bytes: every client sends its
    own DNS cookie, a router adds each device's ECS and MAC options. So a query is looked up by its bytes
    from the flags to the end of its OPT record's fixed part (flags, counts, question, UDP size, DO bit),
    and the option bytes are looked up apart, in a second memo that turns them into the identity options (a
    client's cookie repeats too). Both lookups replace the label walk, the EDNS walk and the key building;
    later stages get the same Query object for the same question and flags, and memoise on it.

    Where the question ends is guessed with one `find` of the first zero byte after the header. A memo hit
    proves the guess: the interned query's question, byte for byte the same, ended there when it was parsed
    in full. Anything the memos do not know is parsed in full (and refused there if malformed); only
    queries of the two usual shapes (no additional record, or one OPT record running to the end) are
    interned. Both memos forget their oldest half when full: a flood of unique names costs a dict insert each.
    """

    def __init__(self, size: int = 16384, zones: Callable[[bytes], LocalAnswers | None] | None = None) -> None:
        self._size = size
        self._zones = zones  # who answers a name here (local_zones.LocalZones.find), if anyone
        self._memos: tuple[dict[bytes, Query], dict[bytes, Query]] = ({}, {})
        self._options: dict[bytes, tuple[dict[int, bytes] | None, bytes | None]] = {}

    def parse(self, data: bytes, client: Peer, tcp: bool) -> Request:
        size = len(data)
        end = data.find(0, HEADER_LEN) + 5  # the question's end, if the memo proves it (see above)
        if size <= MAX_INTERNED and end > 4 and not data[10]:
            query = None
            if not data[11]:
                if size == end:
                    query = self._memos[tcp].get(data[2:])
            elif data[11] == 1 and size >= end + 11 and (data[end + 9] << 8 | data[end + 10]) == size - end - 11:
                query = self._memos[tcp].get(data[2 : end + 11])
            if query is not None:
                if size <= end + 11:  # no options
                    return Request(data, client, query)
                known = self._options.get(data[end + 11 :])
                if known is not None:
                    return Request(data, client, query, *known)
        return self._parse_whole(data, client, tcp)

    def _parse_whole(self, data: bytes, client: Peer, tcp: bool) -> Request:
        query, rdata = read_query(data, tcp)
        if self._zones is not None:
            query.zone = zone = self._zones(query.name)
            if zone is not None and not zone.filtered:
                query.local = True
        options = _identity_options(data, rdata[0], rdata[1]) if rdata is not None else None
        identity = (
            b"".join(_U16.pack(code) + _U16.pack(len(value)) + value for code, value in sorted(options.items()))
            if options
            else None
        )
        size, qend = len(data), query.qend
        if size <= MAX_INTERNED and not data[10]:
            key = None
            if not data[11] and size == qend:
                key = data[2:]
            elif data[11] == 1 and rdata is not None and rdata[0] == qend + 11 and rdata[1] == size:
                key = data[2 : qend + 11]
                make_room(self._options, self._size)
                self._options[data[qend + 11 :]] = (options, identity)
            if key is not None:
                memo = self._memos[tcp]
                make_room(memo, self._size)
                memo[key] = query
        return Request(data, client, query, options, identity)


def read_query(data: bytes, tcp: bool) -> tuple[Query, tuple[int, int] | None]:
    """Read a query, and where its OPT record's options are (start, end), if it has one. Raises Malformed
    (with the rcode to answer, or None for silence) on anything unusable."""
    size = len(data)
    if size < HEADER_LEN:
        raise Malformed(None, "shorter than a DNS header")
    if data[2] & _FLAG_QR:
        raise Malformed(None, "a response, not a query")  # answering responses lets two servers loop
    if data[2] & _FLAG_OPCODE:
        raise Malformed(Rcode.NOTIMP, f"opcode {(data[2] & _FLAG_OPCODE) >> 3} is not QUERY")
    if data[4] != 0 or data[5] != 1:
        raise Malformed(Rcode.FORMERR, "QDCOUNT is not 1 (RFC 9619)")
    if data[6] or data[7] or data[8] or data[9]:
        raise Malformed(Rcode.FORMERR, "a query with answer or authority records")
    qend = _question_end(data)
    name_end = qend - 4
    qtype = data[name_end] << 8 | data[name_end + 1]
    cd = bool(data[3] & _FLAG_CD)
    edns = do = False
    limit = TCP_LIMIT if tcp else PLAIN_UDP_LIMIT
    rdata = None
    if data[10] or data[11]:
        edns, do, udp_size, rdata = _read_additional(data, qend, data[10] << 8 | data[11])
        if edns and not tcp:
            # RFC 6891 §6.2.5: the smaller of the two sizes; ours (1232) keeps answers unfragmented and
            # caps what a spoofed query can reflect.
            size = min(max(udp_size, PLAIN_UDP_LIMIT), ADVERTISED_UDP_SIZE)
            limit = _LIMITS.setdefault(size, size)  # one int object per size, not one per interned query
    state = (STATE_DO if do else 0) | (STATE_CD if cd else 0)
    key = data[HEADER_LEN:name_end].lower() + data[name_end:qend] + bytes((state,))  # the name alone lowercased
    query = Query(key, edns, limit)
    if qtype in NOT_QUERYABLE:
        raise Malformed(Rcode.FORMERR, f"type {qtype} cannot be queried")
    return query, rdata


def _question_end(data: bytes) -> int:
    """Where the question after the header ends. Nothing but the header precedes it, so a compression
    pointer in its name can only loop or point into the header: any label length above 63 (pointers
    included) is refused."""
    size = len(data)
    pos = HEADER_LEN
    while True:
        if pos >= size:
            raise Malformed(Rcode.FORMERR, "question name runs past the end")
        length = data[pos]
        if length == 0:
            break
        if length > MAX_LABEL_LEN:
            raise Malformed(Rcode.FORMERR, "compression pointer or label longer than 63 in the question")
        pos += length + 1
    name_end = pos + 1
    if name_end - HEADER_LEN > MAX_NAME_LEN:
        raise Malformed(Rcode.FORMERR, "question name longer than 255 bytes")
    if name_end + 4 > size:
        raise Malformed(Rcode.FORMERR, "question type/class missing")
    return name_end + 4


def _skip_name(data: bytes, pos: int, floor: int) -> int:
    """Offset just after the name at `pos`; a pointer must point backwards, below `floor`, and inside."""
    size = len(data)
    while True:
        if pos >= size:
            raise Malformed(Rcode.FORMERR, "name runs past the end")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > size:
                raise Malformed(Rcode.FORMERR, "truncated compression pointer")
            target = (length & 0x3F) << 8 | data[pos + 1]
            if target >= floor:
                raise Malformed(Rcode.FORMERR, "compression pointer does not point backwards")
            return pos + 2
        if length > MAX_LABEL_LEN:
            raise Malformed(Rcode.FORMERR, "label longer than 63 or unknown label type")
        pos += length + 1


def _read_additional(data: bytes, pos: int, count: int) -> tuple[bool, bool, int, tuple[int, int] | None]:
    """(edns present, DO bit, client UDP size, where the OPT's options are) from the additional section; the
    options are checked here (a malformed one is FORMERR), and read by `_identity_options`.

    A query signed with TSIG gets NOTAUTH with error BADKEY (RFC 8945 §5.2.1): no key is configured here, so
    no signature can be checked, and a signed query must never get an unsigned answer. SIG(0) (RFC 2931) is
    not looked for: such a query is answered as if it were unsigned."""
    size = len(data)
    edns = do = False
    udp_size = PLAIN_UDP_LIMIT
    span: tuple[int, int] | None = None
    for index in range(count):
        owner = pos
        pos = _skip_name(data, pos, owner)
        if pos + 10 > size:
            raise Malformed(Rcode.FORMERR, "additional record runs past the end")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
        rdata = pos + 10
        pos = rdata + rdlen
        if pos > size:
            raise Malformed(Rcode.FORMERR, "additional record data runs past the end")
        if rtype == RRType.TSIG:
            if index < count - 1:
                raise Malformed(Rcode.FORMERR, "TSIG record is not the last record (RFC 8945 §5.2)")
            tsig = _badkey_tsig(data, owner, rdata, pos)
            raise Malformed(Rcode.NOTAUTH, "signed with TSIG; no key is known here", tsig)
        if rtype != RRType.OPT:
            continue
        if edns:
            raise Malformed(Rcode.FORMERR, "more than one OPT record (RFC 6891 §6.1.1)")
        if data[owner] != 0:
            raise Malformed(Rcode.FORMERR, "OPT record owner is not the root")
        edns = True
        do = bool(ttl & _EDNS_DO)
        udp_size = rclass
        if (ttl >> 16) & 0xFF:  # before the options: a later version may lay them out differently
            raise Malformed(Rcode.BADVERS, f"EDNS version {(ttl >> 16) & 0xFF}")
        _identity_options(data, rdata, pos)
        span = (rdata, pos)
    return edns, do, udp_size, span


def _badkey_tsig(data: bytes, owner: int, rdata: int, end: int) -> bytes:
    """The unsigned TSIG record that answers the query's TSIG record (owner at `owner`, data from `rdata` to
    `end`) with error BADKEY (RFC 8945 §5.3.2): key and algorithm names, time signed, fudge and original ID
    copied, no MAC, no other data. Malformed if the record's data does not parse."""
    key, algorithm = read_name(data, owner), read_name(data, rdata)
    times = _skip_name(data, rdata, rdata)  # time signed (6 bytes), fudge (2), MAC size (2), the MAC
    if times + 10 > end:
        raise Malformed(Rcode.FORMERR, "TSIG record data too short")
    original_id = times + 10 + _U16.unpack_from(data, times + 8)[0]
    if original_id + 6 > end:
        raise Malformed(Rcode.FORMERR, "TSIG MAC runs past the record data")
    fields = algorithm + data[times : times + 8] + b"\x00\x00" + data[original_id : original_id + 2]
    fields += _U16.pack(Rcode.BADKEY) + b"\x00\x00"
    return key + _RR_FIXED.pack(RRType.TSIG, CLASS_ANY, 0, len(fields)) + fields


def _identity_options(data: bytes, pos: int, end: int) -> dict[int, bytes] | None:
    """The identity options among the EDNS options at data[pos:end], by code; Malformed if they do not
    parse."""
    options: dict[int, bytes] | None = None
    while pos < end:
        if pos + 4 > end:
            raise Malformed(Rcode.FORMERR, "EDNS option header runs past the OPT data")
        code, length = _OPTION_HEAD.unpack_from(data, pos)
        pos += 4
        if pos + length > end:
            raise Malformed(Rcode.FORMERR, f"EDNS option {code} runs past the OPT data")
        if code in IDENTITY_OPTIONS:
            if options is None:
                options = {}
            options[code] = data[pos : pos + length]
        pos += length
    return options


# Second-level labels under which a country's names are registered (co.uk, com.au, ne.jp, gov.br…): the
# few a public suffix list would add that matter for grouping; a forwarder knows no zone cuts.
_SECOND_LEVELS = frozenset(
    (
        b"co",
        b"com",
        b"net",
        b"org",
        b"gov",
        b"edu",
        b"ac",
        b"or",
        b"ne",
        b"go",
        b"gob",
        b"nic",
        b"mil",
        b"ltd",
        b"plc",
        b"sch",
    )
)


def registered_domain(name: bytes) -> bytes:
    """The domain a lowercased wire name is registered under, roughly: its last two labels, three under a
    country's second level (victim.co.uk, not co.uk). It groups a random-subdomain flood under the name its
    attacker aims at (upstream.max_per_zone) and random NXDOMAIN answers under one budget (rate_limit.py)."""
    starts = []
    pos = 0
    size = len(name)
    while pos < size and name[pos]:
        starts.append(pos)
        pos += name[pos] + 1
    if len(starts) <= 2:
        return name
    last = starts[-1]
    if name[last] == 2 and name[starts[-2] + 1 : last] in _SECOND_LEVELS:
        return name[starts[-3] :]
    return name[starts[-2] :]


# --- answers built here -------------------------------------------------------------------------------


def opt_record(do: bool, options: bytes = b"", ext_rcode: int = 0) -> bytes:
    """Our OPT RR: root owner, 1232-byte UDP size, version 0, the client's DO bit echoed."""
    ttl = (ext_rcode << 24) | (_EDNS_DO if do else 0)
    return b"\x00" + _RR_FIXED.pack(RRType.OPT, ADVERTISED_UDP_SIZE, ttl, len(options)) + options


def response_flags(data: bytes, rcode: int, ra: bool = True) -> bytes:
    """Header flags of an answer to `data`: QR set, opcode and RD echoed, CD echoed, RA, the rcode."""
    high = _FLAG_QR | (data[2] & (_FLAG_OPCODE | _FLAG_RD))
    low = (_FLAG_RA if ra else 0) | (data[3] & _FLAG_CD) | (rcode & 0x0F)
    return bytes((high, low))


def error_answer(data: bytes, error: Malformed, ede: bytes = b"") -> bytes:
    """The answer for a query refused at the edge: header, the question when it could be read, our OPT record
    whenever the query had one, sound or not (RFC 6891 §7: a client must tell "bad EDNS" from "no EDNS"),
    then the error's TSIG record. RA only for QUERY: recursion is offered for nothing else."""
    assert error.rcode is not None
    qend, do = _salvage(data)
    opt = opt_record(do, ede, ext_rcode=error.rcode >> 4) if do is not None else b""
    counts = _COUNTS.pack(1 if qend else 0, 0, 0, (1 if opt else 0) + (1 if error.tsig else 0))
    flags = response_flags(data, error.rcode, ra=not data[2] & _FLAG_OPCODE)
    question = data[HEADER_LEN:qend] if qend else b""  # compiled, a slice ending before it starts fails
    return data[:2] + flags + counts + question + opt + error.tsig


def _salvage(data: bytes) -> tuple[int, bool | None]:
    """What an error answer can echo of a refused query, read on the error path only, best effort: where the
    question ends (0 unless QDCOUNT is 1 and the question reads cleanly) and the DO bit of the first OPT
    record in the additional section (None if none is found). The walk stops at the first thing that does
    not parse; what it found before stands."""
    qdcount, ancount, nscount, arcount = _COUNTS.unpack_from(data, 4)
    size = len(data)
    qend = 0
    try:
        if qdcount == 1:
            pos = qend = _question_end(data)
        else:
            pos = HEADER_LEN
            for _ in range(qdcount):
                pos = _skip_name(data, pos, pos) + 4
        before_additional = ancount + nscount
        for index in range(before_additional + arcount):
            fixed = _skip_name(data, pos, pos)
            if fixed + 10 > size:
                break
            rtype, _rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, fixed)
            if rtype == RRType.OPT and index >= before_additional:
                return qend, bool(ttl & _EDNS_DO)  # its data may run past the end: it still was an OPT
            pos = fixed + 10 + rdlen
    except Malformed:
        pass
    return qend, None


def truncated_answer(request: Request, rcode: int = Rcode.NOERROR) -> bytes:
    """TC=1 with the question only: the client retries over TCP (RFC 7766 §5)."""
    data, query = request.data, request.query
    flags = response_flags(data, rcode)
    flags = bytes((flags[0] | 0x02, flags[1]))
    counts = struct.pack("!HHHH", 1, 0, 0, 1 if query.edns else 0)
    opt = opt_record(query.do) if query.edns else b""
    return data[:2] + flags + counts + data[HEADER_LEN : query.qend] + opt


def synthesized_answer(
    request: Request,
    rcode: int,
    answers: bytes = b"",
    answer_count: int = 0,
    ede: bytes = b"",
    authority: bytes = b"",
    authority_count: int = 0,
) -> bytes:
    """A whole answer made here (blocked names, RFC 8482 ANY, refusals): echoed question, given records."""
    data, query = request.data, request.query
    counts = struct.pack("!HHHH", 1, answer_count, authority_count, 1 if query.edns else 0)
    opt = opt_record(query.do, ede) if query.edns else b""
    message = (
        data[:2] + response_flags(data, rcode) + counts + data[HEADER_LEN : query.qend] + answers + authority + opt
    )
    if len(message) > query.limit:
        return truncated_answer(request, rcode)
    return message


def resource_record(rtype: int, ttl: int, rdata: bytes, owner: bytes = b"\xc0\x0c") -> bytes:
    """One RR; the owner defaults to a pointer to the question name at offset 12."""
    return owner + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


# --- queries we send upstream and the replies we read ------------------------------------------------


def upstream_query(query_id: int, question: bytes, do: bool, cd: bool) -> bytes:
    """A recursive query for `question` with our own EDNS (no client options: identity never leaves)."""
    flags = _UPSTREAM_FLAGS_CD if cd else _UPSTREAM_FLAGS
    return _U16.pack(query_id) + flags + b"\x00\x01\x00\x00\x00\x00\x00\x01" + question + _OUR_OPTS[do]


_UPSTREAM_FLAGS = bytes((_FLAG_RD, _FLAG_AD))
_UPSTREAM_FLAGS_CD = bytes((_FLAG_RD, _FLAG_AD | _FLAG_CD))
_OUR_OPTS = (opt_record(False), opt_record(True))

# The 0x20 bit of every lowercase letter; other bytes (digits, hyphens, label lengths, which are at most 63)
# have none to flip.
_LETTER_CASE_BITS = bytes(0x20 if 0x61 <= byte <= 0x7A else 0 for byte in range(256))


def mix_case(question: bytes, noise: bytes) -> bytes:
    """0x20 encoding (draft-vixie-dnsext-dns0x20): `question` (name in lowercase, type, class) with each
    letter of its name upper-cased where the byte of `noise` (as long as `question`) at the same place has
    its 0x20 bit set. Whole-number arithmetic on the bytes: no loop over letters in Python."""
    flips = int.from_bytes(question.translate(_LETTER_CASE_BITS)) & int.from_bytes(noise)
    flips >>= 32  # type and class are numbers: HTTPS (0x0041) is no letter to flip
    return (int.from_bytes(question) ^ (flips << 32)).to_bytes(len(question))


class Rejected(StrEnum):
    """Why an upstream reply was not taken (counted per reason in metrics)."""

    WRONG_ID = "wrong_id"  # no query awaits that ID on the socket it came to: forged, or late
    WRONG_QUESTION = "wrong_question"  # another name, type or class
    WRONG_CASE = "wrong_case"  # our name in other letter case: a forger who guessed the 0x20 bits wrong
    MALFORMED = "malformed"  # not a reply to one question, or records that do not parse


def reply_fault(reply: bytes, question: bytes, exact_case: bool) -> Rejected | None:
    """Why `reply` is not the answer to `question` as we sent it (RFC 5452 §9.1), or None if it is: a
    response to QUERY repeating our question, its name letter for letter when `exact_case` (0x20), else
    ignoring case (the type and class are numbers, always compared exactly: HTTPS is 0x0041, "A")."""
    if len(reply) < HEADER_LEN or reply[2] & (_FLAG_QR | _FLAG_OPCODE) != _FLAG_QR or reply[4:6] != b"\x00\x01":
        return Rejected.MALFORMED
    name_end = HEADER_LEN + len(question) - 4
    if reply[name_end : name_end + 4] != question[-4:]:  # also when the reply is too short to hold it
        return Rejected.WRONG_QUESTION
    name, sent = reply[HEADER_LEN:name_end], question[:-4]
    if name == sent:
        return None
    if name.lower() != sent.lower():
        return Rejected.WRONG_QUESTION
    return Rejected.WRONG_CASE if exact_case else None


def is_truncated(reply: bytes) -> bool:
    return bool(reply[2] & 0x02)


class ScannedReply:
    """An upstream reply taken apart once: the records after the question (without the OPT record), the
    offsets of their TTLs, and what caching and the CNAME check need to know. `ad` is the reply's AD bit
    until the forwarder, which alone knows whether the upstream is trusted, clears it (upstream.trust_ad)."""

    __slots__ = ("ad", "body", "cname_targets", "counts", "negative_ttl", "rcode", "ttl_offsets", "ttls")

    def __init__(self) -> None:
        self.rcode = 0
        self.ad = False
        self.counts = (0, 0, 0)
        self.body = b""
        self.ttl_offsets: list[int] = []
        self.ttls: list[int] = []
        self.cname_targets: list[bytes] = []
        self.negative_ttl: int | None = None


def scan_reply(reply: bytes, question: bytes) -> ScannedReply:
    """Walk every record of a reply that `reply_fault` found no fault with. Raises Malformed if it is not sound."""
    qend = HEADER_LEN + len(question)
    an, ns, ar = struct.unpack_from("!HHH", reply, 6)
    scanned = ScannedReply()
    scanned.rcode = reply[3] & 0x0F
    scanned.ad = bool(reply[3] & _FLAG_AD)
    pos = qend
    opt_span: tuple[int, int] | None = None
    kept_ar = ar
    size = len(reply)
    for index in range(an + ns + ar):
        owner = pos
        pos = _skip_name(reply, pos, pos)
        if pos + 10 > size:
            raise Malformed(Rcode.FORMERR, "record runs past the end of the reply")
        rtype, _rclass, ttl, rdlen = _RR_FIXED.unpack_from(reply, pos)
        rdata = pos + 10
        end = rdata + rdlen
        if end > size:
            raise Malformed(Rcode.FORMERR, "record data runs past the end of the reply")
        if rtype == RRType.OPT:
            if index < an + ns or opt_span is not None:
                raise Malformed(Rcode.FORMERR, "misplaced or repeated OPT record in the reply")
            opt_span = (owner, end)
            kept_ar -= 1
        else:
            scanned.ttl_offsets.append(pos + 4)
            scanned.ttls.append(ttl & 0x7FFFFFFF)  # RFC 2181 §8: a TTL with the top bit set is zero
            if rtype == RRType.CNAME and index < an:
                scanned.cname_targets.append(read_name(reply, rdata))
            elif rtype == RRType.SOA and an <= index < an + ns and rdlen >= 20:
                minimum = _U32.unpack_from(reply, end - 4)[0]
                scanned.negative_ttl = min(ttl, minimum)
        pos = end
    if opt_span is not None and opt_span[1] != pos:
        # Names after the OPT could be compression targets; removing the OPT would break them.
        raise Malformed(Rcode.FORMERR, "OPT record is not the last record of the reply")
    body_end = opt_span[0] if opt_span is not None else pos
    scanned.body = reply[qend:body_end]
    scanned.ttl_offsets = [offset - qend for offset in scanned.ttl_offsets]
    scanned.counts = (an, ns, kept_ar)
    return scanned


def _records(message: bytes) -> list[tuple[int, int, int, int]] | None:
    """(where its type begins, type, TTL, RDLENGTH) of each record after the question(s) of a message we made or
    answer, in order; None when one runs past the end or its name does not parse. Off the UDP path: DoH's cache
    lifetime and the encrypted transports' padding read it."""
    size = len(message)
    if size < HEADER_LEN:
        return None
    qdcount, ancount, nscount, arcount = _COUNTS.unpack_from(message, 4)
    records: list[tuple[int, int, int, int]] = []
    try:
        pos = HEADER_LEN
        for _ in range(qdcount):
            pos = _skip_name(message, pos, pos) + 4
        for _ in range(ancount + nscount + arcount):
            fixed = _skip_name(message, pos, pos)
            if fixed + 10 > size:
                return None
            rtype, _rclass, ttl, rdlen = _RR_FIXED.unpack_from(message, fixed)
            records.append((fixed, rtype, ttl, rdlen))
            pos = fixed + 10 + rdlen
    except Malformed:
        return None
    return records if pos <= size else None


def smallest_ttl(message: bytes) -> int | None:
    """The smallest TTL of the records of an answer we made (its OPT record aside): how long an HTTP cache may
    keep it (RFC 8484 §5.1). None when it has no record, or does not parse."""
    records = _records(message)
    ttls = [ttl for _fixed, rtype, ttl, _rdlen in records or () if rtype != RRType.OPT]
    return min(ttls) if ttls else None


def answer_records(body: bytes, body_offset: int, count: int) -> list[tuple[int, int, bytes]]:
    """(type, TTL, rdata) of the first `count` records of a cached body that began at `body_offset` of its
    message. Owner names are skipped, not read, so pointers into the original question are harmless."""
    message = bytes(body_offset) + body
    pos = body_offset
    records = []
    for _ in range(count):
        pos = _skip_name(message, pos, pos)
        rtype, _rclass, ttl, rdlen = _RR_FIXED.unpack_from(message, pos)
        records.append((rtype, ttl, message[pos + 10 : pos + 10 + rdlen]))
        pos += 10 + rdlen
    return records


def read_name(message: bytes, pos: int) -> bytes:
    """The name at `pos`, decompressed, lowercased, in wire form. Raises Malformed on loops or overruns."""
    labels = []
    total = 0
    floor = pos
    size = len(message)
    while True:
        if pos >= size:
            raise Malformed(Rcode.FORMERR, "name runs past the end")
        length = message[pos]
        if length == 0:
            labels.append(b"\x00")
            return b"".join(labels).lower()
        if length & 0xC0 == 0xC0:
            if pos + 2 > size:
                raise Malformed(Rcode.FORMERR, "truncated compression pointer")
            target = (length & 0x3F) << 8 | message[pos + 1]
            if target >= floor:  # each jump goes strictly backwards, so loops are impossible
                raise Malformed(Rcode.FORMERR, "compression pointer does not point backwards")
            pos = floor = target
            continue
        if length > MAX_LABEL_LEN:
            raise Malformed(Rcode.FORMERR, "label longer than 63 or unknown label type")
        total += length + 1
        if total + 1 > MAX_NAME_LEN:
            raise Malformed(Rcode.FORMERR, "name longer than 255 bytes")
        labels.append(message[pos : pos + length + 1])
        pos += length + 1


# --- padding (encrypted transports only) ---------------------------------------------------------------

PADDING_BLOCK = 468  # RFC 8467 §4.1: answers padded to a multiple of this many bytes


def padded_if_asked(query: bytes, answer: bytes, limit: int = TCP_LIMIT) -> bytes:
    """`answer` padded (RFC 7830) to a multiple of PADDING_BLOCK bytes, never past `limit`, when `query` carries
    the Padding option (RFC 8467 §4: a server pads the answer to a query that pads, as unbound's pad-responses
    does); else `answer` itself. For DoT and DoH only: padding hides a message's length from who watches the
    encrypted stream, and on port 53 it would hide nothing and cost bytes."""
    if len(query) <= HEADER_LEN or not (query[10] or query[11]) or not _asks_padding(query):
        return answer
    return _padded(answer, limit)


def _asks_padding(query: bytes) -> bool:
    """Whether the OPT record of a query (one question, additional records only) holds the Padding option."""
    qdcount, ancount, nscount, _arcount = _COUNTS.unpack_from(query, 4)
    if qdcount != 1 or ancount or nscount:
        return False
    for fixed, rtype, _ttl, rdlen in _records(query) or ():
        if rtype == RRType.OPT:
            option, end = fixed + 10, fixed + 10 + rdlen
            while option + 4 <= end:
                code, length = _OPTION_HEAD.unpack_from(query, option)
                if code == OptionCode.PADDING:
                    return True
                option += 4 + length
            return False
    return False


def _padded(answer: bytes, limit: int) -> bytes:
    """`answer` with a Padding option at the end of its OPT record, when that record is its last (one we made
    puts it there; a TSIG after it, or none at all: unpadded)."""
    records = _records(answer)
    if not records:
        return answer
    last_fixed, last_rtype, _ttl, rdlen = records[-1]
    size = len(answer)
    room = limit - size - 4  # the option's code and length take 4 bytes
    if last_rtype != RRType.OPT or last_fixed + 10 + rdlen != size or room < 0:
        return answer
    padding = min(-(size + 4) % PADDING_BLOCK, room)
    rdlen_at = last_fixed + 8
    return (
        answer[:rdlen_at]
        + _U16.pack(rdlen + 4 + padding)
        + answer[rdlen_at + 2 :]
        + _OPTION_HEAD.pack(OptionCode.PADDING, padding)
        + bytes(padding)
    )
