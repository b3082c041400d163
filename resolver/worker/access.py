"""Who may ask, and who is rate limited: the verdict on a source address, before its query is read.

Like Unbound's `access-control`: `server.allow` and the networks of the sites in the policy store are
answered, `server.refuse` and everything else are refused (REFUSED, or silence), and the longest matching
network decides. A refused source never reaches the policy store or an upstream. Of the answered sources,
those outside `rate_limit.exempt` have their UDP answers rate limited (rate_limit.py).

The verdict is memoised per address in the object itself (a dict with `__missing__`), so the query path pays
one dict lookup per query; a change of the rules or of the sites' networks forgets the memo.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from resolver.shared.config import RateLimitSettings, ServerSettings
from resolver.shared.memo import make_room

REFUSED, LIMITED, ALLOWED = 0, 1, 2

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Networks:
    """Networks by IP version and prefix length: which hold an address is a dict lookup per length in use,
    however many networks there are (the sites of a store may hold hundreds of thousands)."""

    def __init__(self, networks: Iterable[str | _Network]) -> None:
        self._by_length: dict[int, dict[int, set[_Network]]] = {}
        for network in networks:
            parsed = ipaddress.ip_network(network, strict=False)
            self._by_length.setdefault(parsed.version, {}).setdefault(parsed.prefixlen, set()).add(parsed)
        for lengths in self._by_length.values():
            # longest first: the first match is the most specific
            ordered = dict(sorted(lengths.items(), reverse=True))
            lengths.clear()
            lengths.update(ordered)

    def longest_match(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        """The prefix length of the most specific network holding `address`; -1 if none does."""
        for length, networks in self._by_length.get(address.version, {}).items():
            if ipaddress.ip_network((address, length), strict=False) in networks:
                return length
        return -1


class AccessControl(dict[str, int]):
    """`access[address]`: REFUSED, LIMITED (answered, its UDP answers rate limited) or ALLOWED."""

    def __init__(
        self,
        server: ServerSettings,
        rate_limit: RateLimitSettings,
        site_networks: Iterable[str] = (),
        memo_size: int = 65536,
    ) -> None:
        super().__init__()
        self.refused = 0  # queries refused (metrics; counted by the listeners)
        self._memo_size = memo_size
        self._site_networks = _Networks(site_networks)
        self.configure(server, rate_limit)

    def configure(self, server: ServerSettings, rate_limit: RateLimitSettings) -> None:
        """New rules (start-up, SIGHUP)."""
        self._allow = _Networks(server.allow)
        self._refuse = _Networks(server.refuse)
        self._exempt = _Networks(rate_limit.exempt) if rate_limit.responses_per_second else None
        self.silent = server.refused_answer == "silence"
        self.clear()

    def use_site_networks(self, networks: Iterable[str]) -> None:
        """The networks of every site in the policy store (loaded at start, again when they change)."""
        self._site_networks = _Networks(networks)
        self.clear()

    def __missing__(self, address: str) -> int:
        verdict = self._judge(address)
        make_room(self, self._memo_size)
        self[address] = verdict
        return verdict

    def _judge(self, address: str) -> int:
        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return REFUSED
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
        allowed = max(self._allow.longest_match(parsed), self._site_networks.longest_match(parsed))
        if allowed < 0 or self._refuse.longest_match(parsed) >= allowed:
            return REFUSED
        if self._exempt is None or self._exempt.longest_match(parsed) >= 0:
            return ALLOWED
        return LIMITED
