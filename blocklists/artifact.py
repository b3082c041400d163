"""The compiled list artifact: one file, written atomically, verified before use, mapped read-only.

Layout (little-endian):

    magic "BNSLIST\\0" | u32 format version | u32 header length | header (JSON) | padding to 8
    | sections: "trie" (marisa-trie bytes), "index" (per trie key id: its entry in the table),
      "table" (u64 pairs: the categories the name is listed in, the categories an allow entry clears)

The header carries the build time, the catalogue bits, counts per category, the sources with their
digests, each section's offset and length, and a SHA-256 of everything after the header. A file that is
truncated, altered, of another format version, or inconsistent with itself is refused with the reason.

Every worker maps the same file: the page cache holds one copy however many workers serve it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
from array import array
from pathlib import Path
from typing import Any

import marisa_trie

from blocklists.errors import ArtifactError

MAGIC = b"BNSLIST\x00"
FORMAT_VERSION = 2  # 2: the table's second word is an allow mask (per category), no longer a flag
_PREFIX = struct.Struct("<8sII")
_ALIGN = 8
_MAX_HEADER = 16 << 20


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def write_atomically(path: Path, chunks: list[bytes | memoryview], mode: int = 0o666) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it, fsync the directory: a reader sees
    the old file or the new one, never a partial one. The file is made with `mode` (less the umask) whatever
    the permissions of the one it replaces."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)  # left by a killed writer of this pid: it would keep its permissions
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_artifact(path: Path, header: dict[str, Any], sections: dict[str, bytes | memoryview]) -> dict[str, Any]:
    """Lay out and write the artifact; returns the header as written (with offsets and checksum)."""
    names = list(sections)
    # Offsets depend on the header's length, which depends on the offsets: lay out twice.
    # Placeholders as wide as the final values, so the laid-out header has room for them.
    header = {
        **header,
        "format": FORMAT_VERSION,
        "byteorder": sys.byteorder,
        "sections": {},
        "checksum": "0" * 64,
        "size": 10**15,
    }
    for _ in range(2):
        encoded = json.dumps(header, sort_keys=True).encode()
        offset = _aligned(_PREFIX.size + len(encoded) + 96)  # room for the digits the offsets add
        layout = {}
        for name in names:
            layout[name] = [offset, len(sections[name])]
            offset = _aligned(offset + len(sections[name]))
        header["sections"] = layout
    data_start = min(start for start, _ in header["sections"].values())
    body = []
    position = data_start
    digest = hashlib.sha256()
    for name in names:
        start, length = header["sections"][name]
        padding = b"\x00" * (start - position)
        body += [padding, sections[name]]
        digest.update(padding)
        digest.update(sections[name])
        position = start + length
    header["checksum"] = digest.hexdigest()
    header["size"] = position
    encoded = json.dumps(header, sort_keys=True).encode()
    if _PREFIX.size + len(encoded) > data_start:
        raise ArtifactError("header grew past its reserved space")  # cannot happen with the margin above
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(encoded)) + encoded
    write_atomically(path, [prefix, b"\x00" * (data_start - len(prefix)), *body])
    return header


class Artifact:
    """A verified artifact, mapped read-only: the trie, the index and the table, and its header."""

    def __init__(self, path: Path, header: dict[str, Any], mapped: mmap.mmap) -> None:
        self.path = path
        self.header = header
        self._mapped = mapped  # the trie and index point into it: it lives as long as they do
        view = memoryview(mapped)
        start, length = header["sections"]["trie"]
        self.trie = marisa_trie.Trie()
        self.trie.map(view[start : start + length])
        start, length = header["sections"]["index"]
        self.index = view[start : start + length].cast(header["index_type"])
        start, length = header["sections"]["table"]
        if length % 16:
            raise ArtifactError(f"{path}: table section of {length} bytes is not whole pairs")
        table = array("Q")
        table.frombytes(view[start : start + length])
        self.table = [(table[i], table[i + 1]) for i in range(0, len(table), 2)]
        if len(self.index) != len(self.trie):
            raise ArtifactError(f"{path}: index has {len(self.index)} entries for {len(self.trie)} names")
        if len(self.index) and max(self.index) >= len(self.table):
            raise ArtifactError(f"{path}: index points past the end of the table")

    @property
    def version(self) -> str:
        """Identifies the content: the checksum's first 16 hex digits."""
        return str(self.header["checksum"][:16])

    @property
    def names(self) -> int:
        return len(self.trie)


def _header_length(path: Path, prefix: bytes) -> int:
    """The header length from the fixed prefix, after checking the magic and the format version."""
    if len(prefix) < _PREFIX.size:
        raise ArtifactError(f"{path}: {len(prefix)} bytes: too short to be a list artifact")
    magic, version, header_length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ArtifactError(f"{path}: not a list artifact (no BNSLIST magic)")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version}; this server reads version {FORMAT_VERSION}")
    if header_length > _MAX_HEADER:
        raise ArtifactError(f"{path}: header length {header_length} is not plausible")
    return header_length


def read_header(path: Path, data: bytes | mmap.mmap) -> dict[str, Any]:
    """The header of an artifact, with the checks that need nothing but the header and the file size."""
    header_length = _header_length(path, bytes(data[: _PREFIX.size]))
    if _PREFIX.size + header_length > len(data):
        raise ArtifactError(f"{path}: header length {header_length} runs past the file: truncated")
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_length]))
    except (ValueError, RecursionError):
        raise ArtifactError(f"{path}: header is not valid JSON") from None
    _check_header(path, header, len(data))
    return header


def _check_header(path: Path, header: Any, size: int) -> None:
    """Every field the reader uses, with its type, or an ArtifactError naming the field."""

    def bad(field: str, what: str) -> ArtifactError:
        return ArtifactError(f"{path}: header {field}: {what}")

    if not isinstance(header, dict):
        raise bad("", "not an object")
    for field, kind in (
        ("sections", dict),
        ("checksum", str),
        ("size", int),
        ("categories", dict),
        ("index_type", str),
        ("byteorder", str),
    ):
        if not isinstance(header.get(field), kind) or isinstance(header.get(field), bool):
            raise bad(field, f"missing or not a {kind.__name__}")
    if header["byteorder"] != sys.byteorder:
        raise ArtifactError(f"{path}: built for {header['byteorder']}-endian machines")
    if header["size"] != size:
        raise ArtifactError(f"{path}: {size} bytes but the header says {header['size']}: truncated or padded")
    if len(header["checksum"]) != 64:
        raise bad("checksum", "not a SHA-256")
    if set(header["sections"]) != {"trie", "index", "table"}:
        raise bad("sections", "not exactly trie, index and table")
    for name, span in header["sections"].items():
        if not (
            isinstance(span, list)
            and len(span) == 2
            and all(type(n) is int for n in span)
            and span[0] >= 0
            and span[1] >= 0
            and span[0] + span[1] <= size
        ):
            raise bad(f"sections.{name}", "not an [offset, length] inside the file")
    if header["index_type"] not in ("H", "I"):
        raise bad("index_type", f"unknown type {header['index_type']!r}")
    for category, info in header["categories"].items():
        if not (isinstance(info, dict) and type(info.get("bit")) is int and type(info.get("count")) is int):
            raise bad(f"categories.{category}", "not {bit, count}")


def verify_file(path: Path) -> str:
    """Check an artifact with plain reads (no mapping: the file may be rewritten meanwhile) and return its
    checksum. Raises ArtifactError saying what is wrong."""
    try:
        with Path(path).open("rb") as source:
            size = os.fstat(source.fileno()).st_size
            prefix = source.read(_PREFIX.size)
            header_length = _header_length(path, prefix)
            raw = source.read(header_length)
            if len(raw) < header_length:
                raise ArtifactError(f"{path}: header length {header_length} runs past the file: truncated")
            try:
                header = json.loads(raw)
            except (ValueError, RecursionError):
                raise ArtifactError(f"{path}: header is not valid JSON") from None
            _check_header(path, header, size)
            source.seek(min(start for start, _ in header["sections"].values()))
            digest = hashlib.sha256()
            while chunk := source.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror}") from None
    if digest.hexdigest() != header["checksum"]:
        raise ArtifactError(f"{path}: checksum mismatch: the file is corrupt")
    return str(header["checksum"])


def open_artifact(path: Path, verify: bool = True) -> Artifact:
    """Map and check an artifact. `verify` also checks the SHA-256 of its body (~25 ms per 10 MB)."""
    path = Path(path)
    try:
        with path.open("rb") as source:
            mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:
        raise ArtifactError(f"{path}: empty file") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror}") from None
    header = read_header(path, mapped)
    if verify:
        data_start = min(start for start, _ in header["sections"].values())
        digest = hashlib.sha256(memoryview(mapped)[data_start:]).hexdigest()
        if digest != header["checksum"]:
            raise ArtifactError(f"{path}: checksum mismatch: the file is corrupt")
    try:
        return Artifact(path, header, mapped)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: cannot map its sections: {exc}") from None
