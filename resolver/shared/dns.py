"""DNS names, codes and option numbers that both the query path and the policy code speak (RFC 1035, 6891, 8914)."""

from __future__ import annotations

import struct
from enum import IntEnum

MAX_NAME_LEN = 255
MAX_LABEL_LEN = 63


class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    NOTAUTH = 9
    BADVERS = 16  # extended: the low 4 bits go in the header, the rest in the OPT TTL
    BADKEY = 17  # only ever in a TSIG record's error field (RFC 8945 §5.2.1)


class RRType(IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    HINFO = 13
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    DNAME = 39
    OPT = 41
    DS = 43
    RRSIG = 46
    NSEC = 47
    DNSKEY = 48
    SVCB = 64
    HTTPS = 65
    TKEY = 249
    TSIG = 250
    IXFR = 251
    AXFR = 252
    MAILB = 253
    MAILA = 254
    ANY = 255


class OptionCode(IntEnum):
    ECS = 8
    COOKIE = 10
    PADDING = 12
    EDE = 15
    UMBRELLA = 20292
    MAC = 65001
    MAC_TEXT = 65073
    CPE_ID = 65074


class EdeCode(IntEnum):
    """RFC 8914 Extended DNS Error codes this server sends."""

    OTHER = 0
    STALE_ANSWER = 3
    BLOCKED = 15
    CENSORED = 16
    FILTERED = 17
    PROHIBITED = 18
    NOT_AUTHORITATIVE = 20
    NOT_READY = 14
    NO_REACHABLE_AUTHORITY = 22
    NETWORK_ERROR = 23


CLASS_IN = 1
CLASS_ANY = 255

_U16 = struct.Struct("!H")

_OPTION_HEAD = struct.Struct("!HH")


def ede_option(code: EdeCode, text: str = "") -> bytes:
    """An Extended DNS Error option (RFC 8914) with its UTF-8 explanation."""
    payload = _U16.pack(code) + text.encode()
    return _OPTION_HEAD.pack(OptionCode.EDE, len(payload)) + payload


def text_to_name(text: str) -> bytes:
    """`www.example.com` → lowercased wire form. The escapes `name_to_text` writes (RFC 1035 §5.1: `\\.`,
    `\\DDD`) are read back, so any name a query can carry can be written. Raises ValueError on an empty or
    over-long label, a bad escape or an over-long name."""
    text = text.strip().lower()
    if text.endswith(".") and not text.endswith("\\."):
        text = text[:-1]
    if not text:
        return b"\x00"
    out = bytearray()
    for number, label in enumerate(_labels(text), 1):
        if not 0 < len(label) <= MAX_LABEL_LEN:
            raise ValueError(f"label {number} of {text!r} must be 1 to 63 bytes")
        out.append(len(label))
        out += label.lower()
    out.append(0)
    if len(out) > MAX_NAME_LEN:
        raise ValueError("name longer than 255 bytes")
    return bytes(out)


def _labels(text: str) -> list[bytes]:
    """The labels of a name in presentation form, escapes undone; a non-ASCII label without escapes is a
    U-label, IDNA-encoded."""
    labels: list[bytes] = []
    label = bytearray()
    unicode = False  # a non-ASCII character in this label: it must be a U-label, with no escapes
    escaped = False
    position = 0
    while position < len(text):
        char = text[position]
        position += 1
        if char == "\\":
            digits = text[position : position + 3]
            if len(digits) == 3 and digits.isdigit() and int(digits) <= 255:
                label.append(int(digits))
                position += 3
            elif position < len(text) and text[position].isascii() and not text[position].isdigit():
                label += text[position].encode()
                position += 1
            else:
                raise ValueError(f"bad escape at character {position} of {text!r}")
            escaped = True
        elif char == ".":
            labels.append(_label(bytes(label), unicode, escaped, text))
            label, unicode, escaped = bytearray(), False, False
        else:
            label += char.encode()
            unicode |= not char.isascii()
    labels.append(_label(bytes(label), unicode, escaped, text))
    return labels


def _label(label: bytes, unicode: bool, escaped: bool, text: str) -> bytes:
    if not unicode:
        return label
    if escaped:
        raise ValueError(f"a label mixing escapes and non-ASCII characters in {text!r}")
    return label.decode().encode("idna")


def name_to_text(wire: bytes) -> str:
    """`\\x03www\\x07example\\x03com\\x00` → `www.example.com` (for people: why, pages, logs; never the hot
    path). A byte that is not printable ASCII, and a dot or backslash inside a label, is written `\\DDD`
    (RFC 1035 §5.1): a name in a log line cannot start a line of its own."""
    labels = []
    pos = 0
    while wire[pos]:
        label = wire[pos + 1 : pos + 1 + wire[pos]]
        labels.append("".join(_PRESENTATION[byte] for byte in label))
        pos += wire[pos] + 1
    return ".".join(labels)


_PRESENTATION = [chr(byte) if 0x21 <= byte <= 0x7E and byte not in b".\\" else f"\\{byte:03d}" for byte in range(256)]
