"""Where list sources uploaded through the API are kept: Redis (chunked, with their digest; any node can build) or,
without Redis, a directory of this node."""

from __future__ import annotations

import asyncio
import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blocklists.artifact import write_atomically
from blocklists.formats import file_digest
from resolver.shared.errors import BnsError
from resolver.shared.store.publications import CHUNK
from resolver.shared.store.redis import RedisConnection


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

    def __init__(self, connection: RedisConnection) -> None:
        self.store = connection

    async def entries(self) -> list[SourceEntry]:
        stored = await self.store.call(self.store.client.hgetall(self.store.key("sources")))
        return [SourceEntry(**json.loads(value)) for value in stored.values()]

    async def put(self, entry: SourceEntry, upload: Path | None) -> None:
        client = self.store.client
        if upload is not None:
            with upload.open("rb") as data:
                for number in range(_chunks(entry.size)):
                    chunk = await asyncio.to_thread(data.read, CHUNK)
                    await self.store.call(client.set(self.store.key("sources", "data", entry.id, str(number)), chunk))
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
