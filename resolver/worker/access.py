"""Who may ask, and who is rate limited: the verdict on a source address, before its query is read.

Like Unbound's `access-control`: `server.allow` and the networks of the sites in the policy store are
answered, everything else is refused (REFUSED, or silence). Between `allow` and `refuse` the longest
matching network decides; `refuse` always beats a site's network, and a site's network wider than a /8
(IPv4) or a /24 (IPv6) opens nothing: data in the store must not make an open resolver. A refused source
never reaches the policy store or an upstream. Of the answered sources, those outside `rate_limit.exempt`
(and, unless `rate_limit.limit_sites`, outside the sites' networks and `identity.trusted_networks`) have
their UDP answers rate limited (rate_limit.py).

The verdict is memoised per address in the object itself (a dict with `__missing__`), so the query path pays
one dict lookup per query; a change of the rules or of the sites' networks forgets the memo.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable

from resolver.shared.config import IdentitySettings, RateLimitSettings, ServerSettings
from resolver.shared.memo import make_room

log = logging.getLogger(__name__)

REFUSED, LIMITED, ALLOWED = 0, 1, 2

_V4, _V6 = int(socket.AF_INET), int(socket.AF_INET6)
_BITS = {_V4: 32, _V6: 128}
_WIDEST_SITE_NETWORK = {_V4: 8, _V6: 24}


def _address(text: str) -> tuple[int, int]:
    """(family, the address as an integer); raises ValueError (OSError) when it is not one."""
    text = text.split("%", 1)[0]
    family = _V6 if ":" in text else _V4
    value = int.from_bytes(socket.inet_pton(family, text), "big")
    if family == _V6 and value >> 32 == 0xFFFF:  # ::ffff:0:0/96: IPv4 through a dual-stack socket
        return _V4, value & 0xFFFFFFFF
    return family, value


class _Networks:
    """Networks as integer prefixes by family and prefix length: which hold an address is a set lookup per
    length in use, however many networks there are (the sites of a store may hold hundreds of thousands),
    and building the table parses no `ipaddress` objects."""

    def __init__(self, networks: Iterable[str], widest: dict[int, int] | None = None) -> None:
        self._prefixes: dict[int, dict[int, set[int]]] = {}
        for network in networks:
            text, _, length_text = network.partition("/")
            try:
                family, value = _address(text)
            except (OSError, ValueError):
                continue  # config and site documents are validated; nothing else reaches here
            bits = _BITS[family]
            length = int(length_text) if length_text else bits
            if family == _V4 and ":" in text:
                length -= 96  # an IPv4-mapped IPv6 network
            if widest is not None and length < widest[family]:
                log.warning("site network %s is wider than /%d: it opens nothing to queries", network, widest[family])
                continue
            self._prefixes.setdefault(family, {}).setdefault(length, set()).add(value >> (bits - length))
        for lengths in self._prefixes.values():
            ordered = dict(sorted(lengths.items(), reverse=True))  # longest first: the first match is the most specific
            lengths.clear()
            lengths.update(ordered)

    def longest_match(self, family: int, value: int) -> int:
        """The prefix length of the most specific network holding the address; -1 if none does."""
        bits = _BITS[family]
        for length, prefixes in self._prefixes.get(family, {}).items():
            if value >> (bits - length) in prefixes:
                return length
        return -1


class AccessControl(dict[str, int]):
    """`access[address]`: REFUSED, LIMITED (answered, its UDP answers rate limited) or ALLOWED."""

    def __init__(
        self,
        server: ServerSettings,
        rate_limit: RateLimitSettings,
        identity: IdentitySettings,
        site_networks: Iterable[str] = (),
        memo_size: int = 65536,
    ) -> None:
        super().__init__()
        self.refused = 0  # queries refused (metrics; counted by the listeners)
        self._memo_size = memo_size
        self._site_networks = _Networks(site_networks, _WIDEST_SITE_NETWORK)
        self.configure(server, rate_limit, identity)

    def configure(self, server: ServerSettings, rate_limit: RateLimitSettings, identity: IdentitySettings) -> None:
        """New rules (start-up, SIGHUP)."""
        self._allow = _Networks(server.allow)
        self._refuse = _Networks(server.refuse)
        self._limiting = rate_limit.responses_per_second > 0
        self._exempt = _Networks((*rate_limit.exempt, *identity.trusted_networks))
        self._sites_exempt = not rate_limit.limit_sites
        self.silent = server.refused_answer == "silence"
        self.clear()

    def use_site_networks(self, networks: Iterable[str]) -> None:
        """The networks of every site in the policy store (loaded at start, again when they change)."""
        self._site_networks = _Networks(networks, _WIDEST_SITE_NETWORK)
        self.clear()

    def __missing__(self, address: str) -> int:
        verdict = self._judge(address)
        make_room(self, self._memo_size)
        self[address] = verdict
        return verdict

    def _judge(self, address: str) -> int:
        try:
            family, value = _address(address)
        except (OSError, ValueError):
            return REFUSED
        refused = self._refuse.longest_match(family, value)
        allowed = self._allow.longest_match(family, value)
        site = self._site_networks.longest_match(family, value) if refused < 0 else -1
        if site < 0 and (allowed < 0 or refused >= allowed):
            return REFUSED
        if not self._limiting or (site >= 0 and self._sites_exempt) or self._exempt.longest_match(family, value) >= 0:
            return ALLOWED
        return LIMITED
