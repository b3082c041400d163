"""An operator's own records (`local.records`): names of the network answered here, such as a business's
`printer.office.example`, read from zone-file lines (`name [ttl] type rdata`, RFC 1035 §5.1) by dnspython.

Read when the configuration is (a line that does not parse is refused naming its place) and again by each worker,
which answers them (worker/local_zones.py). A and AAAA records of an address that is not the Internet's (private,
loopback, link-local, documentation) give its PTR record too, unless a PTR for that address is written. A CNAME
must be a name's only record, and CNAMEs must not loop.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from resolver.shared.dns import RRType, text_to_name

TYPES = ("A", "AAAA", "CNAME", "PTR", "TXT", "SRV", "MX")
DEFAULT_TTL = 3600
MAX_TTL = 604800


@dataclass(frozen=True)
class Record:
    owner: bytes  # lowercased wire form
    rtype: int
    ttl: int
    rdata: bytes  # wire form, names uncompressed


def parse_records(lines: tuple[str, ...], make_ptrs: bool = True) -> list[Record]:
    """The records of `lines`, with (`make_ptrs`) PTRs made for A and AAAA. Raises ValueError naming the line
    at fault."""
    records = [_parse(line, number) for number, line in enumerate(lines, 1)]
    _check_cnames(records, lines)
    if not make_ptrs:
        return records
    written_ptrs = {record.owner for record in records if record.rtype == RRType.PTR}
    made = []
    for record in records:
        if record.rtype in (RRType.A, RRType.AAAA):
            address = ipaddress.ip_address(record.rdata)
            if address.is_global:
                continue  # the Internet's reverse zones are not this network's to answer
            reverse = text_to_name(address.reverse_pointer)
            if reverse not in written_ptrs:
                written_ptrs.add(reverse)  # the first name of an address names it
                made.append(Record(reverse, RRType.PTR, record.ttl, record.owner))
    return records + made


def _parse(line: str, number: int) -> Record:
    where = f"line {number} ({line!r})"
    fields = line.split(None, 2)
    if len(fields) < 3:
        raise ValueError(f'{where}: write "name [ttl] type data", such as "printer.office.example A 192.0.2.20"')
    name, rest = fields[0], fields[1:]
    ttl = DEFAULT_TTL
    if rest[0].isdigit():
        ttl = int(rest[0])
        rest = rest[1].split(None, 1)
        if len(rest) < 2:
            raise ValueError(f"{where}: a type and its data must follow the TTL")
        if ttl > MAX_TTL:
            raise ValueError(f"{where}: TTL {ttl} is above {MAX_TTL}")
    kind, data = rest[0].upper(), rest[1]
    if kind not in TYPES:
        raise ValueError(f"{where}: type {kind} is not one of {', '.join(TYPES)}")
    try:
        owner = text_to_name(name)
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, dns.rdatatype.from_text(kind), data, origin=dns.name.root, relativize=False
        )
    except (ValueError, dns.exception.DNSException) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if owner == b"\x00":
        raise ValueError(f"{where}: the root cannot hold local records")
    wire = rdata.to_wire()
    assert wire is not None  # written to no file: returned
    return Record(owner, int(dns.rdatatype.from_text(kind)), ttl, wire.lower() if kind in _NAMED else wire)


_NAMED = ("CNAME", "PTR")  # whose data is one name, kept lowercased as names are compared


def _check_cnames(records: list[Record], lines: tuple[str, ...]) -> None:
    """A CNAME alone at its name (RFC 1034 §3.6.2), and no chain of them that comes back to itself."""
    by_owner: dict[bytes, list[int]] = {}
    for index, record in enumerate(records):
        by_owner.setdefault(record.owner, []).append(index)
    targets = {record.owner: record.rdata for record in records if record.rtype == RRType.CNAME}
    for owner, indexes in by_owner.items():
        if owner in targets and len(indexes) > 1:
            raise ValueError(f"line {indexes[0] + 1} ({lines[indexes[0]]!r}): a CNAME must be its name's only record")
    for start, first in targets.items():
        seen = {start}
        name = first
        while name in targets:
            if name in seen:
                index = by_owner[start][0]
                raise ValueError(f"line {index + 1} ({lines[index]!r}): its CNAME chain loops")
            seen.add(name)
            name = targets[name]
