"""Who a connection or a request is from, for bounds per client: an IPv4 address, or an IPv6 /64 (what one host
or one customer holds: a client with a /64 has 2^64 addresses to spread its connections or guesses over)."""

from __future__ import annotations

import ipaddress


def host_of(address: str | None) -> str:
    """The address, or for IPv6 its /64 (an IPv4 client of a dual-stack socket is its IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)  # its own source, not ::ffff:0:0/64
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)
