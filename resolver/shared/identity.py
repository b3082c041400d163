"""Who is asking: the client identity carried by a query, and whether it may be believed.

EDNS identity options (MAC 65001 and 65073, CPE-ID 65074, client subnet 8, Umbrella 20292) are believed only
from the trusted networks (`identity.trusted_networks`: the customers' routers, the ISP edge); from anywhere
else they are ignored and the source address is all we know. None of them is ever forwarded upstream (the
upstream query is built fresh, see wire.upstream_query).

A trusted router that is itself in a site's networks speaks for that site alone (`confine`): it may name its
own devices (by MAC, client id, a LAN address) and its own CPE ids, never another site's, so a customer's
router (or whoever controls it) cannot put its queries on a neighbour's devices, alerts and webhook, nor out
of its own site's policy. A trusted source in no site (the ISP's edge, speaking for every customer behind
it) is believed as it is.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from resolver.shared.dns import OptionCode
from resolver.shared.memo import make_room
from resolver.shared.policy.model import Site, mac_from_option, mac_text

_UMBRELLA_MAGIC = b"ODNS"
# Umbrella field types (dnsmasq's edns0.c): each a 2-byte type, then a value of a fixed size.
_UMBRELLA_FIELDS = {0x0004: 4, 0x0008: 4, 0x0010: 4, 0x0020: 16, 0x0040: 8}
_UMBRELLA_ORG, _UMBRELLA_IPV4, _UMBRELLA_IPV6, _UMBRELLA_DEVICE = 0x0008, 0x0010, 0x0020, 0x0040


@dataclass(frozen=True)
class Identity:
    """What a query says about its sender, once trust is settled."""

    address: str  # the client's address: from ECS or Umbrella when trusted, else the packet's source
    mac: bytes | None = None
    client_id: str | None = None
    cpe_id: str | None = None
    router: str | None = None  # the trusted source that made these claims (None: the packet's own source)
    # The client id a DoT or DoH client gave, which names its device: a secret (the device's credential from
    # anywhere), so never recorded, keyed by or logged; its device's key (`device:<id>`) stands for it.
    credential: str | None = None

    @property
    def key(self) -> str:
        """The device this identity names within its site, as the seen-devices record files it: by MAC, else
        client id, else address (`mac:02:00:5e:00:53:01`, `id:…`, `ip:192.0.2.7`)."""
        if self.mac is not None:
            return "mac:" + mac_text(self.mac)
        if self.client_id is not None:
            return "id:" + self.client_id
        return "ip:" + self.address


def _ecs_address(payload: bytes) -> str | None:
    """The address in an ECS option (RFC 7871): the prefix sent, padded with zeros to a whole address."""
    if len(payload) < 4:
        return None
    family, source_prefix = struct.unpack_from("!HB", payload)
    if family not in (1, 2) or source_prefix == 0:
        return None
    size = 4 if family == 1 else 16
    return ipaddress.ip_address(payload[4 : 4 + size].ljust(size, b"\x00")).compressed


def _umbrella(payload: bytes) -> tuple[str | None, str | None, str | None]:
    """(address, device id, org id) of a dnsmasq/Umbrella option, as far as it is well formed."""
    address = device = org = None
    if not payload.startswith(_UMBRELLA_MAGIC) or len(payload) < 6:
        return None, None, None
    pos = 6
    while pos + 2 <= len(payload):
        kind = struct.unpack_from("!H", payload, pos)[0]
        size = _UMBRELLA_FIELDS.get(kind)
        if size is None or pos + 2 + size > len(payload):
            break
        value = payload[pos + 2 : pos + 2 + size]
        if kind in (_UMBRELLA_IPV4, _UMBRELLA_IPV6):
            address = ipaddress.ip_address(value).compressed
        elif kind == _UMBRELLA_DEVICE:
            device = value.hex()
        elif kind == _UMBRELLA_ORG:
            org = f"umbrella-org-{struct.unpack('!I', value)[0]}"
        pos += 2 + size
    return address, device, org


def identity_from(source: str, options: dict[int, bytes] | None) -> Identity:
    """The identity of a query from a trusted source (untrusted: `Identity(source)` and nothing else)."""
    if not options:
        return Identity(source)
    address = source
    client_id = cpe_id = None
    mac = None
    if OptionCode.MAC in options:
        mac = mac_from_option(options[OptionCode.MAC])
    if mac is None and OptionCode.MAC_TEXT in options:
        mac = mac_from_option(options[OptionCode.MAC_TEXT])
    if OptionCode.CPE_ID in options:
        cpe_id = options[OptionCode.CPE_ID].decode("utf-8", "replace")[:64] or None
    if OptionCode.UMBRELLA in options:
        umbrella_address, client_id, org = _umbrella(options[OptionCode.UMBRELLA])
        address = umbrella_address or address
        cpe_id = cpe_id or org
    if OptionCode.ECS in options:
        address = _ecs_address(options[OptionCode.ECS]) or address
    return Identity(address, mac, client_id, cpe_id, source)


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 §6, lowercase: every character a DNS label may hold
CLIENT_ID_LENGTH = 26  # 130 random bits


def new_client_id() -> str:
    """A client id no one can guess (a DoT or DoH client's credential from anywhere: worker/tls.py), and a DNS
    label, so that it can lead a server name ({id}.dns.example.net)."""
    return "".join(secrets.choice(_BASE32) for _ in range(CLIENT_ID_LENGTH))


def made_here(client_id: str) -> bool:
    """Whether a client id has the form `new_client_id` gives: only such an id admits a source from outside
    server.allow (one a subscriber chose, or a router's Umbrella device id, is no credential)."""
    return len(client_id) == CLIENT_ID_LENGTH and all(char in _BASE32 for char in client_id)


class Claim(StrEnum):
    """What a router may claim and be refused (counted by kind)."""

    ADDRESS = "address"  # ECS or Umbrella: an address of another site
    CPE_ID = "cpe_id"  # a CPE id that is not its own site's


def in_networks(site: Site, address: str) -> bool:
    """Whether an address is in one of a site's networks."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in ipaddress.ip_network(network) for network in site.networks)


def in_site_networks(site: Site, identity: Identity) -> bool:
    """Whether a client is of a site by address: its own (or the one its router gave) or its router's is in
    the site's networks."""
    return in_networks(site, identity.address) or (identity.router is not None and in_networks(site, identity.router))


def confine(claimed: Identity, own: Site, address_site: str | None) -> tuple[Identity, tuple[Claim, ...]]:
    """What stays of the claims of a router whose own address is in `own`'s networks: a CPE id of `own`; an
    address in `own`'s networks or in no site's (a LAN address only the router knows: `address_site`, the
    site whose networks hold it, is None); a MAC or client id, which can only name devices of `own`. Returns
    the identity believed (its site is `own`) and the claims refused."""
    refused: list[Claim] = []
    address, cpe_id = claimed.address, claimed.cpe_id
    if cpe_id is not None and cpe_id not in own.cpe_ids:
        cpe_id = None
        refused.append(Claim.CPE_ID)
    if address_site is not None and address_site != own.id:
        address = claimed.router or address
        refused.append(Claim.ADDRESS)
    if not refused:
        return claimed, ()
    return Identity(address, claimed.mac, claimed.client_id, cpe_id, claimed.router), tuple(refused)


class NetworkSet(dict[str, bool]):
    """Networks, and whether an address is in one of them: `networks[address]`, memoised per address, so
    that on the query path a known address costs one dict lookup and no call into Python. An address that is
    not one (a scope ID aside) is in none. Ask `networks[address]`, never `address in networks`: compiled
    code answers `in` from the memo alone (a dict's own lookup, not this class's __contains__)."""

    def __init__(self, networks: Iterable[str], memo_size: int = 65536) -> None:
        super().__init__()
        self.networks = tuple(ipaddress.ip_network(network, strict=False) for network in networks)
        self._memo_size = memo_size

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and self[address]

    def __missing__(self, address: str) -> bool:
        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        inside = any(parsed in network for network in self.networks)
        make_room(self, self._memo_size)
        self[address] = inside
        return inside
