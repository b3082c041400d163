"""Published blocklists: an admin pushes an artifact once and every node serves it.

With Redis (the keys `lists:…`, see redis.py), a publish stores the chunks and the metadata, then points
`lists:current` at it and announces it, in one MULTI/EXEC. Each node's admin process follows the channel
(and reads `lists:current` at start, after a reconnect and every `_POLL` seconds, since a notice may be
missed), fetches the chunks, checks them against the checksum and the catalogue, and installs the file
atomically where the workers look; they swap it in.
A version that fails any check is refused with a log line and the node keeps serving what it had.

Without Redis, the versions are kept in the node's list cache directory and a publish installs locally; the
list it replaces, if it was never published (the operator's own `lists.path`), is kept as a version first.
Uploads are verified before anything is stored, so a corrupt push is refused to the pusher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from redis.typing import EncodableT, FieldT

from blocklists.artifact import open_artifact, write_atomically
from blocklists.catalog import Catalog
from blocklists.errors import ArtifactError
from resolver.shared.errors import NotFound, StoreUnavailable
from resolver.shared.lists import check_catalog
from resolver.shared.store.redis import Notice, RedisConnection

log = logging.getLogger(__name__)

CHUNK = 4 * 2**20
_POLL = 5.0
_KEEP_LOCAL_VERSIONS = 10


class UnknownVersion(NotFound):
    pass


@dataclass(frozen=True)
class ListVersion:
    version: str
    checksum: str
    size: int
    names: int
    published_at: float
    counts: dict[str, int]

    def document(self, current: str | None) -> dict[str, Any]:
        return {**asdict(self), "current": self.version == current}


def inspect(path: Path, catalog: Catalog) -> ListVersion:
    """A verified artifact's description, or ArtifactError saying what is wrong with it."""
    artifact = open_artifact(path)
    check_catalog(artifact, catalog)
    counts = {category: int(info.get("count", 0)) for category, info in artifact.header["categories"].items()}
    return ListVersion(
        artifact.version, artifact.header["checksum"], path.stat().st_size, artifact.names, time.time(), counts
    )


def install(source: Path, served: Path) -> None:
    """Copy a verified artifact to where the workers look, atomically: they see the old file or the new."""
    served.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(served, [source.read_bytes()])


Settled = Callable[[str | None], None]


class Publications(ABC):
    """Where published versions live, and how this node keeps serving the current one."""

    def __init__(self, catalog: Catalog, served: Path, settled: Settled | None = None) -> None:
        """`settled(version)`: called each time the node has learnt which list it must serve and holds it
        (None: nothing is published)."""
        self.catalog = catalog
        self.served = served
        self.settled = settled or (lambda _version: None)

    @abstractmethod
    async def publish(self, path: Path) -> ListVersion:
        """Store a verified artifact as a new version and make it current everywhere."""

    @abstractmethod
    async def versions(self) -> tuple[list[ListVersion], str | None]:
        """Every version, oldest first, and the current one."""

    @abstractmethod
    async def rollback(self, version: str) -> ListVersion:
        """Make an earlier version current again."""

    def watch(self) -> None:  # noqa: B027  (a node alone has nothing to watch)
        """Keep this node serving the current version (with `follow`)."""

    async def follow(self) -> None:  # noqa: B027
        """Until cancelled: what `watch` needs done besides the notices."""


class LocalPublications(Publications):
    """No Redis: versions in `<cache dir>/versions`, installed on this node only."""

    def __init__(self, catalog: Catalog, served: Path, directory: Path) -> None:
        super().__init__(catalog, served)
        self.directory = directory

    def _read(self) -> tuple[list[ListVersion], str | None]:
        index = self.directory / "index.json"
        if not index.exists():
            return [], None
        document = json.loads(index.read_text())
        return [ListVersion(**entry) for entry in document["versions"]], document["current"]

    def _write(self, versions: list[ListVersion], current: str) -> None:
        document = {"versions": [asdict(version) for version in versions], "current": current}
        write_atomically(self.directory / "index.json", [json.dumps(document).encode()])

    def _keep_served(self, versions: list[ListVersion]) -> list[ListVersion]:
        """`versions`, with the list at the served path added unless it is one of them: the operator's own
        file (lists.path) or one copied there by hand is never lost to a publish or a rollback, and can be
        rolled back to. A file there that does not verify is no list to keep."""
        if not self.served.exists():
            return versions
        try:
            found = inspect(self.served, self.catalog)
            if any(entry.version == found.version for entry in versions):
                return versions
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(self.served, self.directory / f"{found.version}.bns")
            found = replace(found, published_at=self.served.stat().st_mtime)  # when that file was written
        except (ArtifactError, OSError) as exc:
            log.warning("lists: %s is replaced without being kept as a version: %s", self.served, exc)
            return versions
        log.info("lists: kept %s (version %s) as a version before replacing it", self.served, found.version)
        return [*versions, found]

    async def publish(self, path: Path) -> ListVersion:
        described = inspect(path, self.catalog)
        versions = self._keep_served(self._read()[0])
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stored = self.directory / f"{described.version}.bns"
        shutil.copyfile(path, stored)
        versions = [entry for entry in versions if entry.version != described.version] + [described]
        for old in versions[:-_KEEP_LOCAL_VERSIONS]:
            (self.directory / f"{old.version}.bns").unlink(missing_ok=True)
        versions = versions[-_KEEP_LOCAL_VERSIONS:]
        install(stored, self.served)
        self._write(versions, described.version)
        return described

    async def versions(self) -> tuple[list[ListVersion], str | None]:
        return self._read()

    async def rollback(self, version: str) -> ListVersion:
        versions, _current = self._read()
        found = next((entry for entry in versions if entry.version == version), None)
        stored = self.directory / f"{version}.bns"
        if found is None or not stored.exists():
            raise UnknownVersion(f"no published version {version!r}")
        inspect(stored, self.catalog)
        versions = self._keep_served(versions)
        install(stored, self.served)
        self._write(versions, version)
        return found


class RedisPublications(Publications):
    def __init__(
        self, catalog: Catalog, served: Path, connection: RedisConnection, scratch: Path, settled: Settled | None = None
    ) -> None:
        super().__init__(catalog, served, settled)
        self.connection = connection
        self.scratch = scratch
        self._installed: str | None = None
        self._installed_read = False
        self._syncing = asyncio.Lock()
        self._down_since: float | None = None

    @property
    def installed(self) -> str | None:
        """The version installed at the served path (read when first asked: workers never ask)."""
        if not self._installed_read:
            self._installed_read = True
            try:
                self._installed = open_artifact(self.served).version if self.served.exists() else None
            except ArtifactError:
                self._installed = None
        return self._installed

    @property
    def _holding(self) -> str:
        """What the node keeps while a version cannot be installed, for a log line."""
        if self.installed is None:
            return "no published version is installed here yet"
        return f"still serving version {self.installed}"

    def _key(self, *parts: str) -> str:
        return self.connection.key("lists", *parts)

    async def publish(self, path: Path) -> ListVersion:
        described = inspect(path, self.catalog)
        data = path.read_bytes()
        chunks = [data[start : start + CHUNK] for start in range(0, len(data), CHUNK)] or [b""]
        meta: dict[FieldT, EncodableT] = {
            "checksum": described.checksum,
            "size": described.size,
            "chunks": len(chunks),
            "names": described.names,
            "published_at": described.published_at,
            "counts": json.dumps(described.counts),
        }
        version = described.version
        async with self.connection.client.pipeline(transaction=True) as pipe:
            for number, chunk in enumerate(chunks):
                pipe.set(self._key("chunk", version, str(number)), chunk)
            pipe.hset(self._key("version", version), mapping=meta)
            pipe.lrem(self._key("history"), 0, version)
            pipe.rpush(self._key("history"), version)
            pipe.set(self._key("current"), version)
            pipe.publish(self.connection.key("lists"), version)
            await self.connection.call(pipe.execute())
        return described

    async def _describe(self, version: str) -> ListVersion | None:
        meta = await self.connection.call(self.connection.client.hgetall(self._key("version", version)))
        if not meta:
            return None
        field = {key.decode(): value.decode() for key, value in meta.items()}
        return ListVersion(
            version,
            field["checksum"],
            int(field["size"]),
            int(field["names"]),
            float(field["published_at"]),
            json.loads(field["counts"]),
        )

    async def versions(self) -> tuple[list[ListVersion], str | None]:
        client = self.connection.client
        history = [entry.decode() for entry in await self.connection.call(client.lrange(self._key("history"), 0, -1))]
        described = [await self._describe(version) for version in history]
        current = await self.connection.call(client.get(self._key("current")))
        return [entry for entry in described if entry is not None], current.decode() if current else None

    async def rollback(self, version: str) -> ListVersion:
        described = await self._describe(version)
        if described is None:
            raise UnknownVersion(f"no published version {version!r}")
        async with self.connection.client.pipeline(transaction=True) as pipe:
            pipe.set(self._key("current"), version)
            pipe.publish(self.connection.key("lists"), version)
            await self.connection.call(pipe.execute())
        return described

    def watch(self) -> None:
        """Install each version announced from now on (the node's admin process only)."""
        self.connection.subscribe("lists", self._hear)

    async def follow(self) -> None:
        """Look at the current version every few seconds too: a notice may be missed."""
        while True:
            await asyncio.sleep(_POLL)
            await self._sync_safely()

    async def _hear(self, notice: Notice) -> None:
        if notice.kind == "down":
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("lists: cannot follow published versions (%s); %s, retrying", notice.data, self._holding)
            return
        if notice.kind == "up" and self._down_since is not None:
            log.info("lists: following published versions again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
        await self._sync_safely()  # `up`: whatever was announced meanwhile; a message: the new version

    async def _sync_safely(self) -> None:
        try:
            await self.sync()
        except StoreUnavailable:
            pass  # said once, by the subscription's `down`; tried again at the next notice or poll
        except Exception:  # a bad reply: the next notice or poll tries again
            log.exception("lists: installing the published version failed; %s", self._holding)

    async def sync(self) -> None:
        """Install the current version if this node does not serve it yet. A version that cannot be had or
        verified leaves the node serving what it installed before (settled on that), if anything."""
        async with self._syncing:
            current = await self.connection.call(self.connection.client.get(self._key("current")))
            if current is None or current.decode() == self.installed:
                self.settled(self.installed if current is not None else None)
                return
            await self._install(current.decode())
            if self.installed is not None:
                self.settled(self.installed)

    async def _install(self, version: str) -> None:
        described = await self._describe(version)
        if described is None:
            log.error("lists: version %s is announced but has no metadata; %s", version, self._holding)
            return
        client = self.connection.client
        meta = await self.connection.call(client.hget(self._key("version", version), "chunks"))
        keys = [self._key("chunk", version, str(number)) for number in range(int(meta))]
        parts = await self.connection.call(client.mget(keys)) if keys else []
        if any(part is None for part in parts):
            log.error("lists: version %s is missing chunks; %s", version, self._holding)
            return
        self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        fetched = self.scratch / f".fetched-{version}.bns"
        try:
            write_atomically(fetched, parts)
            checked = inspect(fetched, self.catalog)
            if checked.checksum != described.checksum:
                raise ArtifactError(f"checksum {checked.checksum[:16]} is not the published {described.checksum[:16]}")
            install(fetched, self.served)
        except (ArtifactError, OSError) as exc:
            log.error("lists: refused published version %s: %s; %s", version, exc, self._holding)
            return
        finally:
            fetched.unlink(missing_ok=True)
        log.info(
            "lists: installed published version %s (%d names), was %s",
            version,
            described.names,
            self.installed or "none",
        )
        self._installed = version
