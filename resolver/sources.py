"""Blocklist sources kept by the admin API, per category, and compiling them into a published list.

A source is a file uploaded to the API (stored where every node can read it) or a path on the server under
one of `admin.source_roots`. Each is read in full when it is added, so a file that yields nothing is
refused then, with its first bad line, rather than at compile time. A compile job reads every source of
every category into one artifact (blocklists.compiler, in a thread: the event loop keeps answering) and,
when asked, publishes it; its progress can be polled.

With Redis (keys under `store.prefix`):

    sources                   hash    source id → JSON entry (category, kind, name, path, size, sha256, …)
    sources:data:{id}:{n}     string  an uploaded file's bytes, CHUNK at a time

Without Redis the same entries and files live in `<lists.cache_dir>/sources/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blocklists.artifact import write_atomically
from blocklists.catalog import Catalog
from blocklists.compiler import Source, compile_lists
from blocklists.errors import BlocklistError, SourceError
from blocklists.formats import SourceReport, file_digest, read_source
from resolver.errors import BnsError
from resolver.policy.model import PolicyError
from resolver.policy.service import NotFound
from resolver.policy.store import RedisStore
from resolver.publishing import CHUNK, Publications

log = logging.getLogger(__name__)
_KEEP_JOBS = 10


class CompileBusy(BnsError):
    """A compile is already running on this node."""


class CompileStopped(BnsError):
    """The node is stopping: a compile in its thread gives up at its next progress report."""


@dataclass(frozen=True)
class SourceEntry:
    id: str
    category: str
    kind: str  # "upload" or "path"
    name: str
    path: str  # a path source's file; "" for an upload
    size: int
    sha256: str
    format: str
    entries: int
    rejected: int
    added_at: float


class Shelf(ABC):
    """Where the entries and the uploaded bytes are kept."""

    @abstractmethod
    async def entries(self) -> list[SourceEntry]: ...

    @abstractmethod
    async def put(self, entry: SourceEntry, upload: Path | None) -> None: ...

    @abstractmethod
    async def remove(self, source_id: str) -> bool: ...

    @abstractmethod
    async def copy_upload(self, entry: SourceEntry, to: Path) -> None: ...


class LocalShelf(Shelf):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _read(self) -> dict[str, dict[str, Any]]:
        index = self.directory / "index.json"
        try:
            return json.loads(index.read_text()) if index.exists() else {}
        except (OSError, ValueError) as exc:
            raise BnsError(f"{index}: the sources index cannot be read ({exc}); remove it to start over") from None

    def _write(self, index: dict[str, dict[str, Any]]) -> None:
        write_atomically(self.directory / "index.json", [json.dumps(index, sort_keys=True).encode()])

    async def entries(self) -> list[SourceEntry]:
        return [SourceEntry(**entry) for entry in self._read().values()]

    async def put(self, entry: SourceEntry, upload: Path | None) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if upload is not None:
            shutil.copyfile(upload, self.directory / f"{entry.id}.src")
        index = self._read()
        index[entry.id] = asdict(entry)
        self._write(index)

    async def remove(self, source_id: str) -> bool:
        index = self._read()
        if index.pop(source_id, None) is None:
            return False
        self._write(index)
        (self.directory / f"{source_id}.src").unlink(missing_ok=True)
        return True

    async def copy_upload(self, entry: SourceEntry, to: Path) -> None:
        shutil.copyfile(self.directory / f"{entry.id}.src", to)


class RedisShelf(Shelf):
    """Entries in one hash; an upload's bytes chunk by chunk (read off the event loop, one SET each, so a
    big file is never whole in memory), and its entry last, so a half-stored upload is never listed."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    async def entries(self) -> list[SourceEntry]:
        stored = await self.store.call(self.store.client.hgetall(self.store.key("sources")))
        return [SourceEntry(**json.loads(value)) for value in stored.values()]

    async def put(self, entry: SourceEntry, upload: Path | None) -> None:
        client = self.store.client
        if upload is not None:
            with upload.open("rb") as data:
                for number in range(_chunks(entry.size)):
                    chunk = await asyncio.to_thread(data.read, CHUNK)
                    await self.store.call(client.set(self.store.key("sources", "data", entry.id, str(number)),
                                                     chunk))
        await self.store.call(client.hset(self.store.key("sources"), entry.id, json.dumps(asdict(entry))))

    async def remove(self, source_id: str) -> bool:
        client = self.store.client
        raw = await self.store.call(client.hget(self.store.key("sources"), source_id))
        if raw is None:
            return False
        entry = SourceEntry(**json.loads(raw))
        keys = [self.store.key("sources", "data", source_id, str(number)) for number in range(_chunks(entry.size))]
        await self.store.call(client.hdel(self.store.key("sources"), source_id))
        await self.store.call(client.delete(*keys))
        return True

    async def copy_upload(self, entry: SourceEntry, to: Path) -> None:
        keys = [self.store.key("sources", "data", entry.id, str(number)) for number in range(_chunks(entry.size))]
        parts = await self.store.call(self.store.client.mget(keys))
        if any(part is None for part in parts):
            raise BnsError(f"source {entry.id}: its stored bytes are incomplete; upload it again")
        write_atomically(to, parts)
        if file_digest(to) != entry.sha256:
            raise BnsError(f"source {entry.id}: its stored bytes do not match its digest; upload it again")


def _chunks(size: int) -> int:
    return max(1, -(-size // CHUNK))


def _read_whole(path: Path) -> SourceReport:
    """Read a source to the end (raises SourceError when nothing in it is usable)."""
    report = SourceReport(path.name)
    for _entry in read_source(path, report):
        pass
    return report


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

    def document(self) -> dict[str, Any]:
        return asdict(self)


class Sources:
    def __init__(self, shelf: Shelf, catalog: Catalog, publications: Publications, roots: tuple[str, ...],
                 scratch: Path) -> None:
        self.shelf = shelf
        self.catalog = catalog
        self.publications = publications
        self.roots = tuple(Path(root).resolve() for root in roots)
        self.scratch = scratch
        self.jobs: dict[str, CompileJob] = {}  # this node's last few, oldest first
        self._numbers = itertools.count(1)
        self._running: asyncio.Task[None] | None = None
        self._stopping = False

    def _category(self, category: str) -> str:
        if category not in self.catalog:
            raise PolicyError("category", f"{category!r} is not a category (known: "
                                          f"{', '.join(c.id for c in self.catalog)})")
        return category

    async def list(self) -> list[SourceEntry]:
        return sorted(await self.shelf.entries(), key=lambda entry: (entry.category, entry.added_at))

    async def _add(self, category: str, kind: str, file: Path, name: str, path: str) -> SourceEntry:
        """Read `file` whole (one with nothing usable is refused here) and keep it as a source. An upload is
        named by its bytes, a path source by its path: adding either again replaces it."""
        report = await asyncio.to_thread(_read_whole, file)
        digest = await asyncio.to_thread(file_digest, file)
        named_by = hashlib.sha256(path.encode()).hexdigest() if path else digest
        entry = SourceEntry(f"{category}-{kind[0]}{named_by[:12]}", category, kind, name, path, file.stat().st_size,
                            digest, report.format, report.entries, report.rejected_count, time.time())
        await self.shelf.put(entry, file if kind == "upload" else None)
        return entry

    async def add_upload(self, category: str, name: str, upload: Path) -> SourceEntry:
        """An uploaded file (plain, hosts, adblock, RPZ, dnsmasq, unbound, gzip or not) as a source."""
        self._category(category)
        return await self._add(category, "upload", upload, Path(name).name[:200] or "upload", "")

    def _allowed_path(self, path_text: str) -> Path:
        """The file a path names, after symlinks, if it lies under one of this node's admin.source_roots."""
        if not path_text.startswith("/"):
            raise PolicyError("path", f"{path_text!r} is not an absolute path")
        try:
            path = Path(path_text).resolve()
            if not any(path.is_relative_to(root) for root in self.roots):
                allowed = ", ".join(map(str, self.roots)) or "none: set admin.source_roots"
                raise PolicyError("path", f"{path} is not under admin.source_roots ({allowed})")
            if not path.is_file():
                raise PolicyError("path", f"{path} is not a file on this server")
        except (OSError, ValueError, RuntimeError) as exc:  # unreadable, a NUL byte, a symlink loop
            raise PolicyError("path", f"{path_text!r}: {exc}") from None
        return path

    async def add_path(self, category: str, path_text: Any) -> SourceEntry:
        """A file on this server, read again (and its path checked again) at every compile."""
        self._category(category)
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

    def job(self, job_id: str) -> CompileJob:
        if job_id not in self.jobs:
            raise NotFound(f"no compile job {job_id!r} on this node")
        return self.jobs[job_id]

    async def _compile(self, job: CompileJob) -> None:
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
                    if entry.kind == "upload":
                        local = scratch / f"{entry.id}.src"
                        await self.shelf.copy_upload(entry, local)
                        sources.append(Source(local, entry.category))
                    else:
                        try:
                            sources.append(Source(self._allowed_path(entry.path), entry.category))
                        except PolicyError as refused:
                            raise SourceError(f"source {entry.id}: {refused.reason}") from None

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
            job.state, job.error = "failed", str(exc)
            log.warning("compile %s failed: %s", job.id, exc)
        except Exception as exc:
            job.state, job.error = "failed", f"internal error: {exc}"
            log.exception("compile %s failed", job.id)
        finally:
            job.seconds = round(time.time() - job.started_at, 2)
