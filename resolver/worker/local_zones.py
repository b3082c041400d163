"""Names this resolver answers itself and never forwards: a reverse lookup of a customer's LAN address, `localhost`
or a `.local` name must not reach a public resolver (it tells the world what is inside the network, and the
answer could only be wrong or slow).

By default (`local.defaults`), as unbound does:

- RFC 6303's reverse zones of addresses that are not the Internet's: 10/8, 172.16/12, 192.168/16, 127/8, 0/8,
  169.254/16, the three documentation /24s, 255.255.255.255, 100.64/10 (RFC 6598, RFC 7793); ::, ::1,
  fd00::/8, fe80::/10 and 2001:db8::/32. NXDOMAIN under each, but 127.0.0.1's and ::1's PTR `localhost.`;
- `localhost` (RFC 6761 §6.3): it and every name under it are 127.0.0.1 and ::1;
- `invalid`, `test` (RFC 6761), `onion` (RFC 7686), `local` (RFC 6762: mDNS names belong to the link) and
  `home.arpa` (RFC 8375): NXDOMAIN;
- `resolver.arpa` (RFC 9462), whose answers are discovery.py's, always.

`local.not_served` sends a default zone, or a zone under one, upstream after all (a company's DNS that serves
16.172.in-addr.arpa); `local.zones` adds zones of the operator's, answered NXDOMAIN under them (unbound's
`local-zone: static`); `local.forward` sends a zone to servers of its own (a Forwarder each: their health and
counters apart from upstream.servers'), after the policy's decision like any name that leaves. The closest
enclosing entry decides. The operator's records (`local.records`) are answered at their names exactly, after
the policy's decision too (NameRecords). Each zone's apex answers its SOA and NS; a negative
answer carries the SOA, whose MINIMUM bounds how long a client keeps it (RFC 2308), with unbound's values.

The zone of a query is found once, when the parser first reads its question (wire.QueryParser), and the query
is marked local: answered before the client is identified, like ANY and resolver.arpa, at the cost of a cache
hit.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import Iterable
from typing import Any

from resolver.shared.config import LocalSettings, UpstreamSettings
from resolver.shared.dns import Rcode, RRType, name_to_text, text_to_name
from resolver.shared.local_records import Record, parse_records
from resolver.shared.policy.model import Site
from resolver.shared.special_names import DEFAULT_ZONES, at_or_under
from resolver.worker.upstream import Forwarder
from resolver.worker.wire import HEADER_LEN, RESOLVER_ARPA, LocalAnswers, Request, resource_record, synthesized_answer

_RECORD_TTL = 3600  # unbound's for local data
_NEGATIVE_TTL = 10800  # the SOA's TTL and MINIMUM: how long a client may keep a negative answer
_LOCALHOST = text_to_name("localhost")
_SOA_RDATA = _LOCALHOST + text_to_name("nobody.invalid") + struct.pack("!IIIII", 1, 3600, 1200, 604800, _NEGATIVE_TTL)


def _records(rtype: int, rdatas: list[bytes]) -> tuple[bytes, int]:
    return b"".join(resource_record(rtype, _RECORD_TTL, rdata) for rdata in rdatas), len(rdatas)


# What the default zones hold besides their SOA and NS (RFC 6761 §6.3, RFC 6303 §4.2 and §4.4).
_LOOPBACK: dict[bytes, dict[int, tuple[bytes, int]]] = {
    _LOCALHOST: {
        RRType.A: _records(RRType.A, [ipaddress.ip_address("127.0.0.1").packed]),
        RRType.AAAA: _records(RRType.AAAA, [ipaddress.ip_address("::1").packed]),
    },
    **{
        text_to_name(ipaddress.ip_address(address).reverse_pointer): {RRType.PTR: _records(RRType.PTR, [_LOCALHOST])}
        for address in ("127.0.0.1", "::1")
    },
}


class NameRecords:
    """The operator's records at one name (`local.records`), answered after the policy's decision. A CNAME is
    followed through the other names of the records (at most MAX_CHAIN of them); where it leaves them, the
    client follows it. A type the name has no record of: NODATA."""

    filtered = True

    def __init__(self, owner: bytes, names: dict[bytes, NameRecords]) -> None:
        self.owner = owner
        self.types: dict[int, list[tuple[int, bytes]]] = {}  # type → (ttl, rdata) of each record
        self._names = names  # every name with records, for CNAME chains
        self.zone: LocalZone | None = None  # the zone served here that holds the name, if one does
        self.answered = 0

    def answer(self, request: Request) -> bytes:
        self.answered += 1
        qtype = request.query.qtype
        rrs = b""
        count = 0
        owner = b"\xc0\x0c"  # the question's name, as the client spelt it
        here: NameRecords | None = self
        for _ in range(MAX_CHAIN):
            if here is None:
                break
            rtype = qtype
            found = here.types.get(qtype)
            if found is None and qtype != RRType.CNAME:
                rtype, found = RRType.CNAME, here.types.get(RRType.CNAME)
            if found is None:
                break
            rrs += b"".join(resource_record(rtype, ttl, rdata, owner) for ttl, rdata in found)
            count += len(found)
            if rtype != RRType.CNAME or qtype == RRType.CNAME:
                break
            owner = found[0][1]  # the CNAME's target, named in full
            here = self._names.get(owner)
        if not count and self.zone is not None:
            return self.zone.negative(request, Rcode.NOERROR)  # NODATA, with the SOA that lets it be kept
        return synthesized_answer(request, Rcode.NOERROR, rrs, count)


MAX_CHAIN = 8


def names_of(records: Iterable[Record]) -> dict[bytes, NameRecords]:
    """Records by their name, each name answering for itself (its CNAMEs followed through the others)."""
    names: dict[bytes, NameRecords] = {}
    for record in records:
        named = names.setdefault(record.owner, NameRecords(record.owner, names))
        named.types.setdefault(record.rtype, []).append((record.ttl, record.rdata))
    return names


def site_names(site: Site | None) -> dict[bytes, NameRecords] | None:
    """A site's own names (`records` in its document), made once per loaded site; None for a site with none."""
    if site is None or not site.records:
        return None
    if site.answers is None:
        site.answers = names_of(site.records)
    answers: dict[bytes, NameRecords] = site.answers
    return answers


class LocalZone:
    """One zone answered here: its apex's SOA and NS, the records of `data`, NXDOMAIN for any other name. With
    `redirect`, every name under the apex is answered as the apex (localhost's)."""

    filtered = False  # answered before the client is known

    def __init__(
        self, apex: bytes, data: dict[bytes, dict[int, tuple[bytes, int]]] | None = None, redirect: bool = False
    ) -> None:
        self.apex = apex
        self.data = {owner: dict(records) for owner, records in (data or {}).items()}  # not _LOOPBACK's own
        self.data.setdefault(apex, {})
        self.data[apex].setdefault(RRType.SOA, (resource_record(RRType.SOA, _NEGATIVE_TTL, _SOA_RDATA), 1))
        self.data[apex].setdefault(RRType.NS, _records(RRType.NS, [_LOCALHOST]))
        self.redirect = redirect
        self.existing: set[bytes] = set()  # names with data and the names between them and the apex (RFC 8020)
        for owner in self.data:
            self.hold(owner)
        self.answered = 0  # metrics: bns_local_answers_total

    def hold(self, owner: bytes) -> None:
        """`owner` exists (its own data, or the operator's records), and so does every name above it up to the
        apex: those answer NODATA, not NXDOMAIN, which would deny every name under them."""
        position = 0
        while len(owner) - position >= len(self.apex):
            self.existing.add(owner[position:])
            position += owner[position] + 1

    def answer(self, request: Request) -> bytes:
        """The answer to an IN query for a name at or under the apex."""
        self.answered += 1
        query = request.query
        name = query.name
        owned = self.data.get(self.apex if self.redirect else name)
        if owned is not None:
            found = owned.get(query.qtype)
            if found is not None:
                return synthesized_answer(request, Rcode.NOERROR, found[0], found[1])
        exists = owned is not None or name in self.existing
        return self.negative(request, Rcode.NOERROR if exists else Rcode.NXDOMAIN)  # a name that exists: NODATA

    def negative(self, request: Request, rcode: int) -> bytes:
        """NXDOMAIN or NODATA for a name under the apex, with the zone's SOA (RFC 2308)."""
        # The SOA's owner points at the apex where it ends the question's name, as the client spelt it.
        owner = struct.pack("!H", 0xC000 | (HEADER_LEN + len(request.query.name) - len(self.apex)))
        soa = resource_record(RRType.SOA, _NEGATIVE_TTL, _SOA_RDATA, owner)
        return synthesized_answer(request, rcode, authority=soa, authority_count=1)


class LocalZones:
    """Every zone answered here, and the zones under them that are not, found by a walk down from the top."""

    def __init__(self, settings: LocalSettings, resolver_arpa: LocalAnswers, upstream: UpstreamSettings) -> None:
        # apex → how its names are answered (None: not here, upstream like any other name)
        self.entries: dict[bytes, LocalAnswers | None] = {}
        self._paths: set[bytes] = set()  # every apex and every name above one: where a walk goes on
        if settings.defaults:
            for zone in DEFAULT_ZONES:
                apex = text_to_name(zone)
                owned = {owner: data for owner, data in _LOOPBACK.items() if at_or_under(owner, apex)}
                self._add(apex, LocalZone(apex, owned, redirect=apex == _LOCALHOST))
        for zone in settings.not_served:
            self._add(text_to_name(zone), None)
        for zone in settings.zones:
            apex = text_to_name(zone)
            self._add(apex, LocalZone(apex))
        # Zones of servers of their own (local.forward): not served here, whatever the defaults say (use_upstream).
        self._forward_servers = {text_to_name(zone): servers for zone, servers in settings.forward}
        self.forwards: dict[bytes, Forwarder] = {}
        self.use_upstream(upstream)
        for apex in self._forward_servers:
            self._add(apex, None)
        for apex, entry in self.entries.items():  # a zone served here inside a forwarded one is the servers' too
            if isinstance(entry, LocalZone) and any(
                apex != forwarded and at_or_under(apex, forwarded) for forwarded in self._forward_servers
            ):
                self.entries[apex] = None
        self._add(RESOLVER_ARPA, resolver_arpa)
        self.records = names_of(parse_records(settings.records))  # the operator's names, exactly
        for owner, names in self.records.items():
            closest = self._closest(owner, self.entries)
            served = None if closest is None else self.entries[closest]
            if isinstance(served, LocalZone):
                names.zone = served
                served.hold(owner)

    def _add(self, apex: bytes, answers: LocalAnswers | None) -> None:
        self.entries[apex] = answers
        position = 0
        while apex[position]:
            self._paths.add(apex[position:])
            position += apex[position] + 1

    def find(self, name: bytes) -> LocalAnswers | None:
        """Who answers a lowercased wire name here (None: it is forwarded)."""
        named = self.records.get(name)
        if named is not None:
            return named
        apex = self._closest(name, self.entries)
        return None if apex is None else self.entries[apex]

    def forwarder_for(self, name: bytes) -> Forwarder | None:
        """The servers of a local.forward zone that holds a lowercased wire name (None: upstream.servers')."""
        if not self.forwards:
            return None
        apex = self._closest(name, self.forwards)
        return None if apex is None else self.forwards[apex]

    def _closest(self, name: bytes, within: dict[bytes, Any]) -> bytes | None:
        """The closest apex of `within` at or above `name`, walking down from its last label while some entry
        lies below."""
        starts = []
        position = 0
        while name[position]:
            starts.append(position)
            position += name[position] + 1
        found: bytes | None = None
        paths = self._paths
        for start in reversed(starts):
            suffix = name[start:]
            if suffix not in paths:
                break
            if suffix in within:
                found = suffix
        return found

    def use_upstream(self, upstream: UpstreamSettings) -> list[Forwarder]:
        """Ask the local.forward zones' servers with these settings (SIGHUP); returns the forwarders retired,
        for the caller to close once the queries they sent are done."""
        retired = list(self.forwards.values())
        for apex, servers in self._forward_servers.items():
            # Asked as the upstreams are, but in lowercase (a LAN's DNS need not echo 0x20); their AD never trusted.
            own = dataclasses.replace(upstream, servers=servers, keep_case=(), case_randomization=False, trust_ad=False)
            self.forwards[apex] = Forwarder(own)
        return retired

    def forward_counts(self, now: float) -> dict[str, dict[str, int]]:
        """Each local.forward zone's replies, failed sends, servers, and those marked down at `now` (the loop's
        time)."""
        return {
            name_to_text(apex): {
                "replies": forwarder.replies,
                "send_errors": forwarder.send_errors,
                "down": sum(upstream.is_down(now) for upstream in forwarder.upstreams),
                "servers": len(forwarder.upstreams),
            }
            for apex, forwarder in self.forwards.items()
        }

    def close(self) -> None:
        for forwarder in self.forwards.values():
            forwarder.close()

    def counts(self) -> dict[str, int]:
        """Answers given, by zone (those that gave any), and from `local.records` in all."""
        counts = {
            name_to_text(apex): zone.answered
            for apex, zone in self.entries.items()
            if isinstance(zone, LocalZone) and zone.answered
        }
        from_records = sum(names.answered for names in self.records.values())
        if from_records:
            counts["local.records"] = from_records
        return counts
