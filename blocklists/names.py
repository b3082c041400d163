"""Domain names as lists write them, normalised to one form: lowercase ASCII (IDN as punycode), no trailing dot.

In a compiled list a name is stored reversed, label by label, ending in a dot (`www.example.com` →
`com.example.www.`), so that every prefix of a stored key ends on a label boundary: looking up the reversed
query name's prefixes finds the listed name and all its listed parents, and `ample.com` can never match
`example.com`.
"""

from __future__ import annotations

import re

import idna

MAX_NAME_LEN = 253  # presentation form without the trailing dot; 255 on the wire
_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")
_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})+\Z")
_LOCAL_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "0.0.0.0",
    }
)


class BadName(ValueError):
    """A token that cannot be a listed domain name; the message is the reason shown to the user."""


class LocalName(BadName):
    """Hosts-file boilerplate (localhost and friends): skipped, not an error in the list."""


def normalize(raw: str) -> str:
    """`*.WWW.Example.COM.` → `www.example.com`; `bücher.de` → `xn--bcher-kva.de`. Raises BadName."""
    name = raw.strip().lower()
    if name in _LOCAL_NAMES:
        raise LocalName(f"local name {name!r}")
    if _NAME.match(name) and len(name) <= MAX_NAME_LEN and not name[-1].isdigit():
        return name  # the common case, in one regular expression
    if name.startswith("*."):
        name = name[2:]
    elif name.startswith("."):
        name = name[1:]
    if name.endswith("."):
        name = name[:-1]
    if name in _LOCAL_NAMES:
        raise LocalName(f"local name {name!r}")
    if not name:
        raise BadName("empty name")
    if ":" in name:
        raise BadName("an IPv6 address or a port, not a name")
    if not name.isascii():
        # IDNA 2008 with UTS 46 mapping, non-transitional (as browsers resolve): faß.de is xn--fa-hia.de,
        # not fass.de, which is somebody else's domain.
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except idna.IDNAError:
            raise BadName(f"{raw.strip()!r} is not a valid internationalised name") from None
    if len(name) > MAX_NAME_LEN:
        raise BadName(f"name longer than {MAX_NAME_LEN} characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            if not label:
                raise BadName("empty label (two dots in a row)")
            if len(label) > 63:
                raise BadName("label longer than 63 characters")
            bad = sorted({char for char in label if not (char.isalnum() or char in "-_")})
            raise BadName(f"character {bad[0]!r} is not allowed in a name" if bad else f"bad label {label!r}")
    if len(labels) < 2:
        raise BadName(f"{name!r} has no dot (a top-level domain or a local name is never listed)")
    if all(label.isdigit() for label in labels):
        raise BadName("an IP address, not a name")
    if labels[-1].isdigit():
        raise BadName("numeric top-level label")
    return name


def reverse(name: str) -> str:
    """`www.example.com` → `com.example.www.` (the trie key)."""
    return ".".join(reversed(name.split("."))) + "."


def unreverse(key: str) -> str:
    """`com.example.www.` → `www.example.com`."""
    return ".".join(reversed(key[:-1].split(".")))


def wire_to_key(wire: bytes) -> str:
    """A lowercased wire-format name (`\\x03www\\x07example\\x03com\\x00`) → `com.example.www.`.

    A name the lists cannot represent is decided as its closest parent they can: a label holding a dot would
    fake a label boundary in the key (`a.b` under a listed `malware.example` must not read as some other
    name), so the key ends just above the last such label. Other bytes no listed name holds decode as Latin-1
    and match nothing themselves, so their parents decide."""
    labels: list[bytes] = []
    pos = 0
    length = wire[0]
    while length:
        label = wire[pos + 1 : pos + 1 + length]
        if b"." in label:
            labels.clear()  # this label and every one below it: only the parent above can be looked up
        else:
            labels.append(label)
        pos += length + 1
        length = wire[pos]
    labels.reverse()
    return (b".".join(labels) + b".").decode("latin-1") if labels else "."
