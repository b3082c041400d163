"""Designated resolver discovery (RFC 9462): the answers for resolver.arpa, a name this resolver answers
itself and never forwards (RFC 9462 §6.4: an upstream would answer with its own encrypted endpoints, and a
device that followed them would leave the filter).

`_dns.resolver.arpa` type SVCB names this resolver's encrypted endpoints, one record per protocol (RFC 9461):
DNS over TLS (`alpn=dot`, its port) and DNS over HTTPS (`alpn=h2,http/1.1`, its port and `dohpath`), each
with `tls.name` as its target and, as hints, the addresses it listens on when they are specific ones (a
wildcard address says nothing a client could use). Any other type at that name, any other name under
resolver.arpa, and the SVCB question itself while neither DoT nor DoH listens: NODATA, with resolver.arpa's
SOA. The records are made once, from the configuration, by hand (RFC 9460 §2.2).
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum

from resolver.shared.config import Endpoint, TlsSettings
from resolver.shared.dns import Rcode, RRType, text_to_name
from resolver.worker.wire import HEADER_LEN, RESOLVER_ARPA, Request, resource_record, synthesized_answer

DESIGNATED = b"\x04_dns" + RESOLVER_ARPA  # the name a client asks for its network resolver's endpoints
# A changed configuration reaches the clients that cached the records within this many seconds.
_TTL = 300


class SvcParam(IntEnum):
    """SvcParamKeys (RFC 9460 §14.3.2) this resolver announces."""

    ALPN = 1
    PORT = 3
    IPV4HINT = 4
    IPV6HINT = 6
    DOHPATH = 7  # RFC 9461 §5


def svcb_rdata(priority: int, target: bytes, params: dict[int, bytes]) -> bytes:
    """The RDATA of an SVCB record (RFC 9460 §2.2): SvcPriority, TargetName (a wire name, never compressed),
    then each SvcParam as key, length and value, in increasing key order."""
    return (
        struct.pack("!H", priority)
        + target
        + b"".join(struct.pack("!HH", key, len(params[key])) + params[key] for key in sorted(params))
    )


def _params(endpoints: tuple[Endpoint, ...], *alpn: bytes) -> dict[int, bytes]:
    """A protocol's alpn, its port (its first listen address's: one record per protocol) and address hints."""
    return {
        SvcParam.ALPN: b"".join(bytes((len(protocol),)) + protocol for protocol in alpn),
        SvcParam.PORT: struct.pack("!H", endpoints[0].port),
        **_hints(endpoints),
    }


def _hints(endpoints: tuple[Endpoint, ...]) -> dict[int, bytes]:
    """ipv4hint and ipv6hint from the addresses a protocol listens on; none of a family it listens on every
    address of (0.0.0.0, ::)."""
    hints: dict[int, bytes] = {}
    addresses = [ipaddress.ip_address(endpoint.host) for endpoint in endpoints]
    for key, version in ((SvcParam.IPV4HINT, 4), (SvcParam.IPV6HINT, 6)):
        mine = [address for address in addresses if address.version == version]
        if mine and not any(address.is_unspecified for address in mine):
            hints[key] = b"".join(dict.fromkeys(address.packed for address in mine))
    return hints


def designated_records(tls: TlsSettings) -> list[bytes]:
    """The RDATA of each SVCB record for `_dns.resolver.arpa`, by priority: DoT, then DoH; none when neither
    listens."""
    target = text_to_name(tls.name) if tls.name else b"\x00"
    records: list[dict[int, bytes]] = []
    if tls.dot_listen:
        records.append(_params(tls.dot_listen, b"dot"))
    if tls.doh_listen:
        dohpath = f"{tls.doh_path}{{?dns}}".encode()  # RFC 9461 §5: a URI template relative to the target
        records.append({**_params(tls.doh_listen, b"h2", b"http/1.1"), SvcParam.DOHPATH: dohpath})
    return [svcb_rdata(priority, target, params) for priority, params in enumerate(records, 1)]


# resolver.arpa's SOA, for NODATA (RFC 2308 §2.2): its MINIMUM is how long the negative answer may be kept.
_SOA_RDATA = RESOLVER_ARPA + text_to_name("nobody.invalid") + struct.pack("!IIIII", 1, 3600, 600, 86400, _TTL)


class Discovery:
    """The answers for resolver.arpa and the names under it."""

    filtered = False  # answered before the client is known, as every zone served here

    def __init__(self, tls: TlsSettings) -> None:
        records = designated_records(tls)
        self.records = b"".join(resource_record(RRType.SVCB, _TTL, rdata) for rdata in records)
        self.count = len(records)

    def answer(self, request: Request) -> bytes:
        """The answer to an IN query for a name at or under resolver.arpa (local_zones.py)."""
        query = request.query
        name = query.name
        if self.count and query.qtype == RRType.SVCB and name == DESIGNATED:
            return synthesized_answer(request, Rcode.NOERROR, self.records, self.count)
        # The SOA's owner points at resolver.arpa where it ends the question's name, as the client spelt it.
        owner = struct.pack("!H", 0xC000 | (HEADER_LEN + len(name) - len(RESOLVER_ARPA)))
        soa = resource_record(RRType.SOA, _TTL, _SOA_RDATA, owner)
        return synthesized_answer(request, Rcode.NOERROR, authority=soa, authority_count=1)
