"""The special-use zones a resolver answers itself by default (RFC 6303, 6761, 6762, 7686, 8375; the answers are
worker/local_zones.py's), and the check of `local.not_served` against them, which the configuration makes."""

from __future__ import annotations

import ipaddress

from resolver.shared.dns import text_to_name


def _reverse(network: str) -> str:
    """The reverse zone of a network whose prefix ends on a label (an octet; a nibble for IPv6)."""
    net = ipaddress.ip_network(network)
    labels = net.network_address.reverse_pointer.split(".")
    per_label = 8 if net.version == 4 else 4
    return ".".join(labels[(net.max_prefixlen - net.prefixlen) // per_label :])


DEFAULT_ZONES: tuple[str, ...] = (
    "localhost",
    "invalid",
    "test",
    "onion",
    "local",
    "home.arpa",
    *(
        _reverse(network)
        for network in (
            "0.0.0.0/8",
            "10.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            *(f"172.{octet}.0.0/16" for octet in range(16, 32)),
            "192.0.2.0/24",
            "192.168.0.0/16",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "255.255.255.255/32",
            *(f"100.{octet}.0.0/16" for octet in range(64, 128)),
            "::/128",
            "::1/128",
            "fd00::/8",
            "fe80::/12",
            "fe90::/12",
            "fea0::/12",
            "feb0::/12",
            "2001:db8::/32",
        )
    ),
)


def check_not_served(defaults: bool, not_served: tuple[str, ...], zones: tuple[str, ...]) -> None:
    """Refuse a `local.not_served` zone that no served zone holds: it would be forwarded anyway, and is likely a
    typing error for one that is. Raises ValueError."""
    served = [text_to_name(zone) for zone in (*(DEFAULT_ZONES if defaults else ()), *zones)]
    for zone in not_served:
        if not any(at_or_under(text_to_name(zone), apex) for apex in served):
            raise ValueError(
                f"{zone} is not a zone answered here, nor under one" + ("" if defaults else " (local.defaults is off)")
            )


def at_or_under(name: bytes, apex: bytes) -> bool:
    """Whether a wire name is `apex` or under it, on a label boundary."""
    position = 0
    while len(name) - position > len(apex):
        position += name[position] + 1
    return name[position:] == apex
