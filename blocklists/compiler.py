"""From (category → sources) to one artifact, in bounded memory.

Entries stream from the parsers into sorted runs of at most `run_size` keys, spilled to temporary files;
a k-way merge joins equal names (their category bits OR-ed, allow kept), feeds the sorted unique keys to the
marisa-trie builder and writes them once more to a merged file; a second pass over that file records, per
trie key id, which entry of a small table of distinct (bits, allow) pairs the name has. Peak memory is one
run plus the trie builder, whatever the input size. Sorted unique input makes the trie, and so the whole
body of the artifact, the same for the same inputs; only the build time in the header differs, and it
follows SOURCE_DATE_EPOCH when that is set.
"""

from __future__ import annotations

import heapq
import os
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path

import marisa_trie

from blocklists.artifact import write_artifact
from blocklists.catalog import Catalog
from blocklists.errors import SourceError
from blocklists.formats import SourceReport, file_digest, open_text, read_source
from blocklists.names import BadName, normalize, reverse

DEFAULT_RUN_SIZE = 250_000  # ~25 MB of keys in memory; more runs cost a heap merge, measured as noise
Progress = Callable[[str, int], None]


ALLOW = "allow"  # a source's category when its names are to be allowed whatever lists them


@dataclass(frozen=True)
class Source:
    """A list for one category (`category` set; ALLOW for an allowlist), or a TSV of `domain<TAB>category,category`
    lines."""

    path: Path
    category: str | None = None
    format: str | None = None

    @property
    def is_tsv(self) -> bool:
        return self.category is None


@dataclass
class CompileReport:
    out: Path
    names: int = 0
    allows: int = 0
    per_category: dict[str, int] = field(default_factory=dict)
    sources: list[SourceReport] = field(default_factory=list)
    seconds: float = 0.0
    size: int = 0
    version: str = ""


def sources_from_dir(directory: Path, catalog: Catalog, skip_unknown: bool = False) -> list[Source]:
    """`<category>.txt[.gz]` files of a directory; a file named after no category is an error."""
    if not directory.is_dir():
        raise SourceError(f"{directory}: not a directory")
    sources = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not path.name.endswith((".txt", ".txt.gz")):
            continue
        category = path.name.removesuffix(".gz").removesuffix(".txt")
        if category not in catalog:
            if skip_unknown:
                continue
            raise SourceError(
                f"{path}: {category!r} is not a category of the catalogue "
                f"(known: {', '.join(c.id for c in catalog)}); rename it or pass --skip-unknown"
            )
        sources.append(Source(path, category))
    if not sources:
        raise SourceError(f"{directory}: no <category>.txt or <category>.txt.gz files")
    return sources


Entries = Iterator[tuple[str, int, int]]  # (trie key, categories listed, categories allowed)


def _tsv_entries(source: Source, catalog: Catalog, report: SourceReport, skip_unknown: bool) -> Entries:
    report.format = "tsv"
    for number, line in enumerate(open_text(source.path), 1):
        report.lines = number
        text = line.rstrip("\n")
        if not text.strip() or text.startswith("#"):
            continue
        domain, sep, tags = text.partition("\t")
        if not sep:
            report.reject(number, "no tab: expected domain<TAB>category[,category…]", text)
            continue
        bits = 0
        for tag in filter(None, (tag.strip() for tag in tags.split(","))):
            category = catalog.by_id.get(tag)
            if category is not None:
                bits |= category.mask
            elif skip_unknown:
                report.skipped["category not in the catalogue"] += 1
            else:
                raise SourceError(
                    f"{source.path}: line {number}: category {tag!r} is not in the catalogue; "
                    f"add it to the catalogue or pass --skip-unknown"
                )
        if not bits:
            continue
        try:
            name = normalize(domain)
        except BadName as bad:
            report.reject(number, str(bad), text)
            continue
        report.entries += 1
        yield reverse(name), bits, 0
    if report.entries == 0:
        raise SourceError(f"{source.path}: no usable line ({report.lines} lines, {report.rejected_count} rejected)")


def _entries(source: Source, catalog: Catalog, report: SourceReport, skip_unknown: bool) -> Entries:
    if source.is_tsv:
        yield from _tsv_entries(source, catalog, report, skip_unknown)
        return
    if source.category == ALLOW:
        # An allowlist: each of its names is allowed in every category (a listing anywhere else is cleared).
        everything = catalog.mask([category.id for category in catalog])
        for entry in read_source(source.path, report, source.format):
            if "." not in entry.name:  # a whole top-level domain allowed would undo every list beneath it
                report.skipped["a top-level domain in an allowlist"] += 1
                continue
            yield reverse(entry.name), 0, everything
        return
    if source.category not in catalog:
        raise SourceError(
            f"{source.path}: category {source.category!r} is not in the catalogue "
            f"(known: {', '.join(c.id for c in catalog)}, or {ALLOW})"
        )
    mask = catalog.by_id[source.category].mask  # type: ignore[index]
    # An allow entry (`@@||x^`, `rpz-passthru.`…) clears only the category of the list it comes from.
    for entry in read_source(source.path, report, source.format):
        yield reverse(entry.name), (0 if entry.allow else mask), (mask if entry.allow else 0)


class _Runs:
    """Sorted runs of `key\\tbits\\tallow` lines: in memory up to `size`, spilled to files beyond."""

    def __init__(self, scratch: Path, size: int) -> None:
        self._scratch = scratch
        self._size = size
        self._current: list[str] = []
        self._files: list[Path] = []

    def add(self, key: str, bits: int, allow: int) -> None:
        self._current.append(f"{key}\t{bits:x}\t{allow:x}")
        if len(self._current) >= self._size:
            self._spill()

    def _spill(self) -> None:
        self._current.sort()
        path = self._scratch / f"run{len(self._files)}.txt"
        with path.open("w") as out:
            out.write("\n".join(self._current))
            out.write("\n")
        self._files.append(path)
        self._current = []

    def merged(self) -> Entries:
        """Sorted unique (key, listed, allowed): equal keys joined. Tab sorts below every name character."""
        self._current.sort()
        with ExitStack() as files:
            streams: list[Iterable[str]] = [
                (line.rstrip("\n") for line in files.enter_context(path.open())) for path in self._files
            ]
            streams.append(iter(self._current))
            lines = heapq.merge(*streams) if len(streams) > 1 else streams[0]
            for key, group in groupby((line.split("\t") for line in lines), key=lambda parts: parts[0]):
                bits = allow = 0
                for _key, bits_text, allow_text in group:
                    bits |= int(bits_text, 16)
                    allow |= int(allow_text, 16)
                yield key, bits, allow


def _build_time() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def compile_lists(
    sources: list[Source],
    out: Path,
    catalog: Catalog,
    *,
    skip_unknown: bool = False,
    progress: Progress | None = None,
    run_size: int = DEFAULT_RUN_SIZE,
) -> CompileReport:
    """Read every source, write the artifact to `out` atomically. Raises SourceError on an unusable source."""
    started = time.monotonic()
    report = CompileReport(out=out)
    notify = progress or (lambda _stage, _count: None)
    with tempfile.TemporaryDirectory(prefix=".bns-compile-", dir=out.parent) as scratch_dir:
        scratch = Path(scratch_dir)
        runs = _Runs(scratch, run_size)
        digests = []
        read = 0
        for source in sources:
            source_report = SourceReport(str(source.path))
            report.sources.append(source_report)
            for key, bits, allow in _entries(source, catalog, source_report, skip_unknown):
                runs.add(key, bits, allow)
                read += 1
                if read % 100_000 == 0:
                    notify(f"reading {source.path.name}", read)
            digests.append(
                {
                    "path": str(source.path),
                    "category": source.category or "(tsv)",
                    "format": source_report.format,
                    "sha256": file_digest(source.path),
                    "entries": source_report.entries,
                    "rejected": source_report.rejected_count,
                }
            )

        merged_path = scratch / "merged.txt"
        with merged_path.open("w") as merged:

            def keys() -> Iterator[str]:
                for count, (key, bits, allow) in enumerate(runs.merged(), 1):
                    merged.write(f"{key}\t{bits:x}\t{allow:x}\n")
                    if count % 100_000 == 0:
                        notify("merging", count)
                    yield key

            trie = marisa_trie.Trie(keys())
        notify("indexing", 0)
        table: dict[tuple[int, int], int] = {}
        index = array("I", bytes(4 * len(trie)))
        per_bit: Counter[int] = Counter()
        with merged_path.open() as merged_lines:
            for count, line in enumerate(merged_lines, 1):
                key, bits_text, allow_text = line.rstrip("\n").split("\t")
                bits, allow = int(bits_text, 16), int(allow_text, 16)
                index[trie.key_id(key)] = table.setdefault((bits, allow), len(table))
                report.allows += bool(allow)
                while bits:
                    low = bits & -bits
                    per_bit[low.bit_length() - 1] += 1
                    bits ^= low
                if count % 100_000 == 0:
                    notify("indexing", count)
        index_type = "H" if len(table) <= 0xFFFF else "I"
        if index_type == "H":
            index = array("H", index)
        flat = array("Q")
        for bits, allow in table:
            flat.extend((bits, allow))
        report.names = len(trie)
        report.per_category = {category.id: per_bit.get(category.bit, 0) for category in catalog}
        header = {
            "built": _build_time(),
            "names": report.names,
            "allows": report.allows,
            "categories": {
                category.id: {"bit": category.bit, "count": report.per_category[category.id]} for category in catalog
            },
            "sources": digests,
            "index_type": index_type,
        }
        written = write_artifact(
            out, header, {"trie": trie.tobytes(), "index": index.tobytes(), "table": flat.tobytes()}
        )
    report.version = written["checksum"][:16]
    report.size = out.stat().st_size
    report.seconds = time.monotonic() - started
    return report
