"""The list formats users feed to DNS filters, read line by line into (name, allow) entries.

Supported: plain domain lists, `*.domain` wildcards, hosts files (any sink address, several names per line),
adblock-style domain rules (`||example.com^`, `@@||…^` exceptions become allow entries), RPZ zones
(`CNAME .` and friends block, `rpz-passthru.` allows, `*.` owners), BIND `zone "…"` blocks, dnsmasq
(`address=/x/…`, `local=/x/`, `server=/x/`) and unbound `local-zone:`. The format of a file is detected
from its first lines unless given.

A line is one of: entries; nothing (blank or comment); skipped, for a rule that is fine but not a domain rule
(cosmetic and path rules, forwarding rules), counted by reason; or rejected, for a line that should have
been a domain and is not, counted and reported with its line number and reason. A bad line is never fatal;
a source that yields no entry at all is (SourceError).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import ipaddress
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

from blocklists.errors import SourceError
from blocklists.names import BadName, LocalName, normalize

FORMATS = ("plain", "wildcard", "hosts", "adblock", "rpz", "bind", "dnsmasq", "unbound")
SAMPLE_LIMIT = 20  # rejected lines kept verbatim for the report; the rest are only counted
_DETECT_LINES = 2000
# Bounds on what one source may make us read, so that a hostile file (a gzip bomb, a line without end) costs
# at most the bound: the longest line of the real lists we hold is 252 characters, the largest list 46 MB.
MAX_LINE = 4096  # characters
MAX_BYTES = 2**30  # decompressed; the admin API reads its uploads with admin.max_upload instead


class Entry(NamedTuple):
    name: str  # normalised, e.g. "www.example.com"
    allow: bool = False


class UnusableSource(SourceError):
    """A source read no further. `reason` says why without naming the file; `quoted` is what of the file's own
    text the message repeats (its first bad lines, its skipped rules), for callers that must not show it."""

    def __init__(self, name: str, reason: str, quoted: str = "") -> None:
        super().__init__(f"{name}: {reason}{quoted}")
        self.reason = reason
        self.quoted = quoted


class Skip(Exception):
    """A valid rule that is not a domain rule: counted under its reason, not reported as an error."""


@dataclass
class SourceReport:
    """What reading one source found."""

    path: str
    format: str = ""
    lines: int = 0
    entries: int = 0
    allows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (line number, reason, line)

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    def reject(self, number: int, reason: str, line: str) -> None:
        self.rejected[reason.split(":", maxsplit=1)[0] if ":" in reason else reason] += 1
        if len(self.samples) < SAMPLE_LIMIT:
            self.samples.append((number, reason, line.strip()[:200]))


class _TooLarge(Exception):
    pass


class _Bounded(io.RawIOBase):
    """A binary stream that stops with _TooLarge once it has given more than `limit` bytes."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        self._inner = inner
        self._left = limit

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        self._left -= count
        if self._left < 0:
            raise _TooLarge
        return int(count)


def open_text(
    path: Path, name: str | None = None, max_bytes: int = MAX_BYTES, setting: str | None = None
) -> Iterator[str]:
    """Lines of a text file, gzip or not, as UTF-8 (undecodable bytes become U+FFFD and fail as names;
    a byte-order mark is dropped). A line over MAX_LINE characters, or more than `max_bytes` once
    decompressed, stops the reading with UnusableSource: memory and time stay within the bounds whatever
    the file. Errors call the file `name` (default: its path); `setting` names where `max_bytes` comes from."""
    name = str(path) if name is None else name
    number = 0
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            decompressed: BinaryIO = gzip.GzipFile(fileobj=raw) if gzipped else raw  # type: ignore[assignment]
            # utf-8-sig: a byte-order mark at the start is not part of the first line; 64 KB reads keep the
            # bound's Python call off each line (it reads as fast as a plain gzip.open)
            with io.TextIOWrapper(
                io.BufferedReader(_Bounded(decompressed, max_bytes), 1 << 16), encoding="utf-8-sig", errors="replace"
            ) as lines:
                while line := lines.readline(MAX_LINE + 1):
                    number += 1
                    if len(line) > MAX_LINE and not line.endswith("\n"):
                        raise UnusableSource(name, f"line {number} is longer than {MAX_LINE} characters: not a list")
                    yield line
    except _TooLarge:
        where = f" ({setting})" if setting else ""
        raise UnusableSource(name, f"decompresses to more than {max_bytes} bytes{where}") from None
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib: a gzip body that does not inflate
        reason = f"cannot read: {getattr(exc, 'strerror', None) or exc}"
        raise UnusableSource(name, reason) from None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_ip(token: str) -> bool:
    try:
        ipaddress.ip_address(token.split("%", 1)[0])
    except ValueError:
        return False
    return True


_HASH_COMMENT = re.compile(r"(?:^|\s)#.*")


def _strip_hash_comment(line: str) -> str:
    """The line without a `#` comment: one that starts the line or follows a space (`a.com##x` is not one)."""
    return _HASH_COMMENT.sub("", line).strip()


# --- one function per format: a line → entries, or [] for nothing; raises Skip or BadName ---------------

_COSMETIC = ("##", "#@#", "#$#", "#?#")


def _plain(line: str) -> list[Entry]:
    text = _strip_hash_comment(line)
    if not text or text[0] in "!;":
        return []
    if any(marker in text for marker in _COSMETIC):
        raise Skip("cosmetic rule")
    if " " in text or "\t" in text:
        raise BadName("more than one word on the line (a hosts file?)")
    if "/" in text:
        raise Skip("URL or path, not a domain")
    return [Entry(normalize(text))]


def _hosts(line: str) -> list[Entry]:
    text = _strip_hash_comment(line)
    if not text:
        return []
    tokens = text.split()
    if not _is_ip(tokens[0]):
        raise BadName(f"{tokens[0]!r} is not an address (hosts lines are `ADDRESS NAME…`)")
    entries = []
    for token in tokens[1:]:
        try:
            entries.append(Entry(normalize(token)))
        except LocalName:
            continue
    if not entries and len(tokens) > 1:
        raise LocalName("only local names")
    return entries


_ADBLOCK_DOMAIN = re.compile(r"(@@)?\|\|([^/^$|*]+)\^?\|?(?:\$(.*))?\Z")
_ADBLOCK_MODIFIERS_KEPT = frozenset({"important", "all", "document", ""})


def _adblock(line: str) -> list[Entry]:
    text = line.strip()
    if not text or text[0] in "![" or (text[0] == "#" and not text.startswith(("##", "#@#", "#$#", "#?#"))):
        return []
    if any(marker in text for marker in _COSMETIC):
        raise Skip("cosmetic rule")
    if text.startswith("/") and text.endswith("/"):
        raise Skip("regular expression rule")
    match = _ADBLOCK_DOMAIN.match(text.replace("||*.", "||", 1))
    if match is None:
        if text.startswith(("||", "@@||")) and "/" in text:
            raise Skip("path rule (a URL, not a domain)")
        if text.startswith(("|", "@@", "://")) or any(char in text for char in "/$^*"):
            raise Skip("rule that is not a domain rule")
        return [Entry(normalize(text))]  # AdGuard Home reads a bare domain as a blocking rule
    exception, domain, modifiers = match.groups()
    if modifiers is not None:
        names = {modifier.strip().lstrip("~") for modifier in modifiers.split(",")}
        if not names <= _ADBLOCK_MODIFIERS_KEPT:
            raise Skip("rule with modifiers a DNS filter cannot apply")
    return [Entry(normalize(domain), allow=bool(exception))]


class _BindReader:
    """named.conf zone statements: `//`, `#` and `/* */` comments, a statement over several lines. Only
    zones of type master/primary (the blocklist idiom: an empty local zone) block; forward, stub and the
    like are other people's routing and are skipped."""

    _ZONE = re.compile(r'zone\s+"([^"]+)"(?:\s+\w+)?\s*\{(.*)\}\s*;\s*\Z', re.S)
    _TYPE = re.compile(r"\btype\s+(\w+)\s*;")
    _BLOCKING = frozenset({"master", "primary"})

    def __init__(self) -> None:
        self.in_comment = False
        self.parts: list[str] = []
        self.depth = 0

    def _without_comments(self, line: str) -> str:
        out: list[str] = []
        pos = 0
        while pos < len(line):
            if self.in_comment:
                end = line.find("*/", pos)
                if end < 0:
                    return "".join(out)
                self.in_comment = False
                pos = end + 2
                continue
            starts = [i for i in (line.find("/*", pos), line.find("//", pos), line.find("#", pos)) if i >= 0]
            if not starts:
                out.append(line[pos:])
                break
            first = min(starts)
            out.append(line[pos:first])
            if line.startswith("/*", first):
                self.in_comment = True
                pos = first + 2
            else:
                break  # `//` or `#`: the rest of the line
        return "".join(out)

    def __call__(self, line: str) -> list[Entry]:
        text = self._without_comments(line).strip()
        if not text:
            return []
        self.parts.append(text)
        self.depth += text.count("{") - text.count("}")
        if self.depth > 0 or not text.endswith(";"):
            return []  # the statement goes on
        statement = " ".join(self.parts)
        self.parts, self.depth = [], 0
        match = self._ZONE.match(statement)
        if match is None:
            if statement.startswith("zone"):
                raise BadName('not a `zone "NAME" {…};` statement')
            raise Skip("BIND statement that is not a zone")
        zone_type = self._TYPE.search(match.group(2))
        if zone_type is not None and zone_type.group(1) not in self._BLOCKING:
            raise Skip(f"zone of type {zone_type.group(1)}")
        return [Entry(normalize(match.group(1)))]


def _dnsmasq(line: str) -> list[Entry]:
    text = line.strip()
    if not text or text.startswith("#"):  # dnsmasq has whole-line comments only: `/#/` and `/x/#` are syntax
        return []
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in ("address", "local", "server"):
        raise Skip(f"dnsmasq option {key!r} is not a domain rule")
    parts = value.strip().split("/")
    if len(parts) < 3 or parts[0]:
        raise BadName(f"expected {key}=/NAME/…")
    names, target = [name for name in parts[1:-1] if name], parts[-1]
    if "#" in names:
        raise BadName("a rule for every name (/#/) cannot be listed")
    allow = False
    if key == "server" and target == "#":
        allow = True  # `server=/x/#`: resolve x through the normal upstreams, an exception to wider rules
    elif key == "server" and target:
        raise Skip("forwarding rule (server=/name/address), not a block")
    return [Entry(normalize(name), allow=allow) for name in names]


_UNBOUND_ZONE = re.compile(r'local-zone:\s*"?([^"\s]+)"?\s+(\S+)')
_UNBOUND_ALLOW = frozenset({"transparent", "always_transparent", "typetransparent", "inform"})
_UNBOUND_SKIP = frozenset({"nodefault", "noview"})


def _unbound(line: str) -> list[Entry]:
    text = _strip_hash_comment(line)
    if not text or text == "server:":
        return []
    if not text.startswith("local-zone:"):
        raise Skip(f"unbound statement {text.split(':')[0]!r} is not a local-zone")
    match = _UNBOUND_ZONE.match(text)
    if match is None:
        raise BadName('expected local-zone: "NAME" TYPE')
    name, zone_type = match.groups()
    if zone_type in _UNBOUND_SKIP:
        raise Skip(f"local-zone type {zone_type}")
    return [Entry(normalize(name), allow=zone_type in _UNBOUND_ALLOW)]


class _RpzReader:
    """RPZ is a zone file: it has state ($ORIGIN, the last owner, multi-line records in parentheses)."""

    _PASS = frozenset({"rpz-passthru."})
    _TTL = re.compile(r"(\d+[smhdw]?)+\Z", re.I)  # 3600, 1h, 1h30m
    _IGNORED_TYPES = frozenset({"SOA", "NS", "TXT", "RRSIG", "NSEC", "NSEC3", "DNSKEY"})
    _TRIGGERS = frozenset({"rpz-ip", "rpz-client-ip", "rpz-nsdname", "rpz-nsip"})

    def __init__(self) -> None:
        self.origin = ""
        self.owner = ""
        self.in_parentheses = False

    def __call__(self, line: str) -> list[Entry]:
        text = line.split(";", 1)[0].rstrip()
        if self.in_parentheses:
            self.in_parentheses = ")" not in text
            return []
        if not text.strip():
            return []
        if "(" in text and ")" not in text:
            self.in_parentheses = True
        if text.startswith("$ORIGIN"):
            self.origin = text.split()[1].lower().rstrip(".") if len(text.split()) > 1 else ""
            return []
        if text.startswith("$"):
            return []
        tokens = text.split()
        if text[0].isspace():
            owner = self.owner  # no owner: the previous record's
        else:
            owner = self.owner = tokens.pop(0)
        while tokens and (self._TTL.match(tokens[0]) or tokens[0].upper() in ("IN", "CH", "HS")):
            tokens.pop(0)
        if not tokens:
            raise BadName("record without a type")
        rtype = tokens[0].upper()
        if rtype == "SOA" and not self.origin and owner.endswith(".") and owner != ".":
            self.origin = owner.lower().rstrip(".")  # a zone dump (AXFR) has absolute owners and no $ORIGIN
        if rtype in self._IGNORED_TYPES or owner == "@":
            return []
        name = self._trigger(owner)
        if rtype == "CNAME" and len(tokens) > 1 and tokens[1].lower() in self._PASS:
            return [Entry(name, allow=True)]
        if rtype == "CNAME" and len(tokens) > 1 and tokens[1].lower() == "rpz-tcp-only.":
            raise Skip("rpz-tcp-only action")
        return [Entry(name)]  # CNAME . (NXDOMAIN), *. (NODATA), rpz-drop., local data: all block here

    def _trigger(self, owner: str) -> str:
        name = owner.lower()
        if name.endswith("."):
            name = name[:-1]
            if self.origin and name.endswith("." + self.origin):
                name = name[: -len(self.origin) - 1]
        if not self._TRIGGERS.isdisjoint(name.split(".")):
            raise Skip("RPZ IP or name-server trigger")
        return normalize(name)


def _line_reader(source_format: str) -> Callable[[str], list[Entry]]:
    readers: dict[str, Callable[[], Callable[[str], list[Entry]]]] = {
        "plain": lambda: _plain,
        "wildcard": lambda: _plain,
        "hosts": lambda: _hosts,
        "adblock": lambda: _adblock,
        "rpz": _RpzReader,
        "bind": _BindReader,
        "dnsmasq": lambda: _dnsmasq,
        "unbound": lambda: _unbound,
    }
    return readers[source_format]()


# --- detection ---------------------------------------------------------------------------------------


def _signature(text: str) -> str | None:
    if text.startswith(("||", "@@||", "[Adblock")) or any(marker in text for marker in _COSMETIC):
        return "adblock"
    if text.startswith('zone "') or text.startswith("zone\t"):
        return "bind"
    if text.startswith(("address=/", "local=/", "server=/")):
        return "dnsmasq"
    if text.startswith(("local-zone:", "local-data:")):
        return "unbound"
    if text.startswith(("$TTL", "$ORIGIN")) or re.search(r"\s(CNAME|SOA)(\s|$)", text, re.I):
        return "rpz"
    if text.startswith("*."):
        return "wildcard"
    tokens = text.split()
    if len(tokens) >= 2 and _is_ip(tokens[0]):
        return "hosts"
    if len(tokens) == 1 and "." in text:
        return "plain"
    return None


def detect_format(lines: list[str]) -> str:
    """The format most of the first lines look like; plain when nothing stands out."""
    votes: Counter[str] = Counter()
    for line in lines[:_DETECT_LINES]:
        text = line.strip()
        if not text or text.startswith(("#", "!", ";", "//")):
            continue
        signature = _signature(text)
        if signature:
            votes[signature] += 1
    if not votes:
        return "plain"
    if votes["rpz"] and votes["plain"] + votes["wildcard"] >= votes["rpz"]:
        return "rpz"  # an RPZ zone's SOA/NS lines are few; its triggers look like plain names
    return votes.most_common(1)[0][0]


def read_source(
    path: Path,
    report: SourceReport,
    source_format: str | None = None,
    max_bytes: int = MAX_BYTES,
    setting: str | None = None,
) -> Iterator[Entry]:
    """Every entry of one source, filling `report` as it goes. Raises SourceError if nothing is usable, or
    past a bound (open_text); errors call the source by `report.path`."""
    lines = open_text(path, report.path, max_bytes, setting)
    head: list[str] = []
    for line in lines:
        head.append(line)
        if len(head) >= _DETECT_LINES:
            break
    if source_format is None:
        source_format = detect_format(head)
    elif source_format not in FORMATS:
        raise SourceError(f"{report.path}: unknown format {source_format!r}; known: {', '.join(FORMATS)}")
    report.format = source_format
    read_line = _line_reader(source_format)

    def every_line() -> Iterator[str]:
        yield from head
        yield from lines

    for number, line in enumerate(every_line(), 1):
        report.lines = number
        try:
            entries = read_line(line)
        except LocalName:
            report.skipped["local name"] += 1
            continue
        except Skip as skip:
            report.skipped[str(skip)] += 1
            continue
        except BadName as bad:
            report.reject(number, str(bad), line)
            continue
        for entry in entries:
            report.entries += 1
            report.allows += entry.allow
            yield entry
    if report.entries == 0:
        counts = f"{report.lines} lines, {report.rejected_count} rejected, {sum(report.skipped.values())} skipped"
        quoted = ""
        if report.skipped:
            quoted += " (" + ", ".join(f"{count} {reason}" for reason, count in report.skipped.most_common(3)) + ")"
        if report.samples:
            number, reason, text = report.samples[0]
            quoted += f" (first: line {number}: {reason}: {text!r})"
        raise UnusableSource(report.path, f"no usable domain in it as {source_format}: {counts}", quoted)
