"""Warning-page addresses of their own for devices behind a router (`pages.device_networks`).

A device behind a customer's router is known to DNS by the MAC or client id the router adds, but its browser
reaches the warning page from the router's (NAT) address, like every other device behind it: by the
source address alone the page cannot tell whose it is. So a warned name is answered, to a device its site
knows by MAC or client id, with an address of a pool instead of the shared `policy.warning_page`:

    slot = int(first 8 bytes of blake2b(site \\0 device \\0 name)) mod (the pool's addresses of that family)

and the page, reached on pool address number `slot` for that name from an address of that site, finds the
one device of the site with that slot for the name: its verdict, and its button. Nothing is stored between
the DNS answer and the page, so any node answers either. When two such devices of one site share a slot for
a name, the page could not tell them apart: both are answered the shared warning page address (no button)
for that name.

The worker asks `address` (on the warned branch only, memoised), the pages ask `devices_at`; both count the
same candidates (`candidates`), so they agree on every collision.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from resolver.shared.dns import name_to_text
from resolver.shared.memo import make_room
from resolver.shared.policy.model import Device, Site

_MEMO = 4096


def slot(site: str, device: str, name: str, size: int) -> int:
    """The pool address (its index among `size`) of a device of a site for a name (text, as `name_to_text`)."""
    digest = hashlib.blake2b(f"{site}\0{device}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8]) % size


def candidates(site: Site) -> list[Device]:
    """The devices of a site that may get addresses of their own: those a router's identity options name (a
    device known only by its address reaches the page from that address)."""
    return [device for device in site.devices.values() if device.macs or device.client_ids]


class PagePool:
    """The pool's addresses, in the order of the configured networks, per IP version."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(network) for network in networks)
        self._addresses: dict[int, list[bytes]] = {4: [], 6: []}
        self._places: dict[str, tuple[int, int]] = {}  # address text → (version, index)
        for network in self.networks:
            family = self._addresses[network.version]
            for address in network:
                self._places[address.compressed] = (network.version, len(family))
                family.append(address.packed)
        self._memo: dict[tuple[Site, str, bytes, int], bytes | None] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def addresses(self) -> list[str]:
        """Every address of the pool: the pages listen on each."""
        return list(self._places)

    def address(self, site: Site, device: Device, name: bytes, version: int) -> bytes | None:
        """The packed address (IPv4 or 6) to answer a warned `name` (lowercased wire form) with to `device`;
        None for the shared warning page: no pool of that version, a device no router names, or another such
        device of the site on the same slot."""
        key = (site, device.id, name, version)  # the Site object: a reloaded site is another key
        if key in self._memo:
            return self._memo[key]
        pool = self._addresses[version]
        found = None
        if pool and (device.macs or device.client_ids):
            text = name_to_text(name)
            mine = slot(site.id, device.id, text, len(pool))
            if not any(
                slot(site.id, other.id, text, len(pool)) == mine for other in candidates(site) if other.id != device.id
            ):
                found = pool[mine]
        make_room(self._memo, _MEMO)
        self._memo[key] = found
        return found

    def place(self, address: str) -> tuple[int, int] | None:
        """(IP version, index) of a pool address; None for an address outside the pool."""
        try:
            return self._places.get(ipaddress.ip_address(address.split("%", 1)[0]).compressed)
        except ValueError:
            return None

    def devices_at(self, site: Site, name: bytes, place: tuple[int, int]) -> list[Device]:
        """The devices of `site` whose address for `name` is the pool address at `place`: exactly one when the
        page can tell whose it is."""
        version, index = place
        size = len(self._addresses[version])
        text = name_to_text(name)
        return [device for device in candidates(site) if slot(site.id, device.id, text, size) == index]
