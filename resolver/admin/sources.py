"""Blocklist sources kept by the admin API, per category, and compiling them into a published list.

A source is a file uploaded to the API (stored where every node can read it), a path on the server under one of
`admin.source_roots`, or a feed fetched by URL (feeds.py). Each is read in full when it is added, so a file that
yields nothing is refused then, with its first bad line, rather than at compile time; reading stops at the first
line over MAX_LINE characters or once more than `admin.max_upload` bytes came out of it (a gzip bomb). What the
API says of a file on the server names the argument or the setting at fault, never the file's lines nor where
things lie on the server: those go to this node's log. A compile job reads every source of every category into
one artifact (blocklists.compiler, in a thread: the event loop keeps answering) and, when asked, publishes it;
its progress can be polled.

With Redis (keys under `store.prefix`):

    sources                   hash    source id → JSON entry (category, kind, name, path, size, sha256, …)
    sources:data:{id}:{n}     string  an uploaded file's bytes, CHUNK at a time

Without Redis the same entries and files live in `<lists.cache_dir>/sources/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blocklists.catalog import Catalog
from blocklists.compiler import ALLOW, Source, compile_lists
from blocklists.errors import BlocklistError, SourceError
from blocklists.formats import SourceReport, UnusableSource, file_digest, read_source
from resolver.shared.errors import BnsError, Busy, NotFound
from resolver.shared.policy.model import PolicyError
from resolver.shared.store.publications import Publications
from resolver.shared.store.shelves import Shelf, SourceEntry

log = logging.getLogger(__name__)
_KEEP_JOBS = 10


class CompileBusy(Busy):
    """A compile is already running on this node."""


class CompileStopped(BnsError):
    """The node is stopping: a compile in its thread gives up at its next progress report."""


def _read_whole(path: Path, name: str, max_bytes: int) -> SourceReport:
    """Read a source to the end (raises SourceError when nothing in it is usable), calling it `name`."""
    report = SourceReport(name)
    for _entry in read_source(path, report, max_bytes=max_bytes, setting="admin.max_upload"):
        pass
    return report


def _told(exc: BlocklistError | BnsError | OSError, read_as: dict[str, SourceEntry]) -> str:
    """What a failed compile job says: a source by its id, not the file it was read from, and an upload's
    lines but never a line of a file on this server (the node's log has everything)."""
    if isinstance(exc, UnusableSource):
        entry = next((entry for path, entry in read_as.items() if str(exc).startswith(f"{path}: ")), None)
        if entry is None:
            return exc.reason
        return f"source {entry.id}: {exc.reason}{exc.quoted if entry.kind == 'upload' else ''}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or type(exc).__name__} (this node's log says where)"
    return str(exc)


@dataclass
class CompileJob:
    id: str
    publish: bool
    state: str = "running"  # running, done, failed
    stage: str = "starting"
    count: int = 0
    started_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    names: int = 0
    size: int = 0
    version: str = ""
    published: bool = False
    per_category: dict[str, int] = field(default_factory=dict)
    error: str = ""
    digests: dict[str, str] = field(default_factory=dict)  # each source's bytes the build read, by id

    def document(self) -> dict[str, Any]:
        return asdict(self)


class Sources:
    def __init__(
        self,
        shelf: Shelf,
        catalog: Catalog,
        publications: Publications,
        roots: tuple[str, ...],
        scratch: Path,
        max_bytes: int,
    ) -> None:
        self.shelf = shelf
        self.max_bytes = max_bytes  # admin.max_upload: what a source may decompress to
        self.catalog = catalog
        self.publications = publications
        self.roots = tuple(Path(root).resolve() for root in roots)
        self.scratch = scratch
        self.jobs: dict[str, CompileJob] = {}  # this node's last few, oldest first
        self._numbers = itertools.count(1)
        self._running: asyncio.Task[None] | None = None
        self._stopping = False

    def check_category(self, category: str) -> None:
        if category not in self.catalog and category != ALLOW:
            raise PolicyError(
                "category",
                f"{category!r} is not a category (known: {', '.join(c.id for c in self.catalog)}, or {ALLOW} "
                "for an allowlist)",
            )

    async def list(self) -> list[SourceEntry]:
        return sorted(await self.shelf.entries(), key=lambda entry: (entry.category, entry.added_at))

    async def _add(self, category: str, kind: str, file: Path, name: str, path: str) -> SourceEntry:
        """Read `file` whole (one with nothing usable is refused here) and keep it as a source. An upload is
        named by its bytes, a path source by its path: adding either again replaces it."""
        try:
            report = await asyncio.to_thread(
                _read_whole, file, "the upload" if kind == "upload" else "path", self.max_bytes
            )
        except UnusableSource as refused:
            if kind == "upload":
                raise  # an upload's own lines, quoted back to whoever sent them, show nothing of this server
            log.warning("path source %s refused: %s%s", path, refused.reason, refused.quoted)
            raise PolicyError("path", refused.reason) from None
        digest = await asyncio.to_thread(file_digest, file)
        named_by = hashlib.sha256(path.encode()).hexdigest() if path else digest
        entry = SourceEntry(
            f"{category}-{kind[0]}{named_by[:12]}",
            category,
            kind,
            name,
            path,
            file.stat().st_size,
            digest,
            report.format,
            report.entries,
            report.rejected_count,
            time.time(),
        )
        await self.shelf.put(entry, file if kind == "upload" else None)
        return entry

    async def add_upload(self, category: str, name: str, upload: Path) -> SourceEntry:
        """An uploaded file (plain, hosts, adblock, RPZ, dnsmasq, unbound, gzip or not) as a source."""
        self.check_category(category)
        return await self._add(category, "upload", upload, Path(name).name[:200] or "upload", "")

    def _allowed_path(self, path_text: str) -> Path:
        """The file a path names, after symlinks, if it lies under one of this node's admin.source_roots. A
        refusal names the setting, never the roots nor where a link leads."""
        if not path_text.startswith("/"):
            raise PolicyError("path", "not an absolute path")
        if not self.roots:
            raise PolicyError("path", "this node takes uploads only (admin.source_roots is empty)")
        try:
            path = Path(path_text).resolve()
            if not any(path.is_relative_to(root) for root in self.roots):
                raise PolicyError("path", "not under admin.source_roots")
            if not path.is_file():
                raise PolicyError("path", "not a file under admin.source_roots")
        except (OSError, ValueError, RuntimeError) as exc:  # unreadable, a NUL byte, a symlink loop
            log.warning("path source %r refused: %s", path_text, exc)
            raise PolicyError("path", "cannot be resolved on this server") from None
        return path

    async def add_path(self, category: str, path_text: Any) -> SourceEntry:
        """A file on this server, read again (and its path checked again) at every compile."""
        self.check_category(category)
        if not isinstance(path_text, str) or not path_text:
            raise PolicyError("path", "missing: the source file's path on the server")
        path = self._allowed_path(path_text)
        return await self._add(category, "path", path, path.name, str(path))

    async def remove(self, category: str, source_id: str) -> None:
        found = next((entry for entry in await self.shelf.entries() if entry.id == source_id), None)
        if found is None or found.category != category or not await self.shelf.remove(source_id):
            raise NotFound(f"no source {source_id!r} in category {category!r}")

    def start_compile(self, publish: bool) -> CompileJob:
        if self._running is not None and not self._running.done():
            raise CompileBusy("a compile is already running on this node")
        job = CompileJob(f"compile-{int(time.time())}-{next(self._numbers)}", publish)
        self.jobs[job.id] = job
        while len(self.jobs) > _KEEP_JOBS:
            del self.jobs[next(iter(self.jobs))]
        self._running = asyncio.ensure_future(self._compile(job))
        return job

    async def stop(self) -> None:
        """Stop a running compile soon (its thread cannot be cancelled, only asked) and wait for it."""
        self._stopping = True
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    async def build(self, publish: bool) -> CompileJob:
        """A compile, awaited to its end (CompileBusy if one is running)."""
        job = self.start_compile(publish)
        assert self._running is not None
        await self._running
        return job

    def job(self, job_id: str) -> CompileJob:
        if job_id not in self.jobs:
            raise NotFound(f"no compile job {job_id!r} on this node")
        return self.jobs[job_id]

    async def _compile(self, job: CompileJob) -> None:
        read_as: dict[str, SourceEntry] = {}  # the file each source is read from → the source
        try:
            entries = await self.list()
            if not entries:
                raise BnsError("no sources: add some with POST /v1/sources/{category}")
            self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.scratch, prefix="compile-") as scratch_dir:
                scratch = Path(scratch_dir)
                sources = []
                job.stage = "fetching sources"
                for entry in entries:
                    if entry.kind in ("upload", "feed"):  # a feed's last good copy is kept like an upload
                        local = scratch / f"{entry.id}.src"
                        await self.shelf.copy_upload(entry, local)
                    else:
                        try:
                            local = self._allowed_path(entry.path)
                        except PolicyError as refused:
                            raise SourceError(f"source {entry.id}: path {refused.reason}") from None
                    sources.append(Source(local, entry.category, entry.expect or None))
                    read_as[str(local)] = entry
                    job.digests[entry.id] = entry.sha256

                def progress(stage: str, count: int) -> None:
                    if self._stopping:
                        raise CompileStopped("the node stopped during the compile")
                    job.stage, job.count = stage, count

                out = scratch / "lists.bns"
                report = await asyncio.to_thread(compile_lists, sources, out, self.catalog, progress=progress)
                job.names, job.size, job.version = report.names, report.size, report.version
                job.per_category = {k: v for k, v in report.per_category.items() if v}
                if job.publish:
                    job.stage = "publishing"
                    await self.publications.publish(out)
                    job.published = True
            job.state, job.stage = "done", "done"
        except (BlocklistError, BnsError, OSError) as exc:
            job.state, job.error = "failed", _told(exc, read_as)
            log.warning("compile %s failed: %s", job.id, exc)
        except Exception as exc:
            job.state, job.error = "failed", f"internal error: {exc}"
            log.exception("compile %s failed", job.id)
        finally:
            job.seconds = round(time.time() - job.started_at, 2)
