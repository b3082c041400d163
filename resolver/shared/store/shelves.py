"""Where list sources added through the API are kept: Redis (chunked, with their digest; any node can build) or,
without Redis, a directory of this node. A feed's last good copy is kept like an upload's bytes (under a key of
its digest, so that a build reading the copy it replaces still finds every chunk: the old one expires later),
and beside the entries its status: the validators of its next conditional request and what its downloads did.
With Redis one node at a time holds the feeds' lease and fetches them."""

from __future__ import annotations

import asyncio
import json
import os
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
    kind: str  # "upload", "path" or "feed"
    name: str
    path: str  # a path source's file; "" for an upload and a feed
    size: int  # an upload's, a path's when added, a feed's last good copy's
    sha256: str
    format: str
    entries: int
    rejected: int
    added_at: float
    url: str = ""  # a feed's
    interval: float = 0.0  # a feed's refresh interval, seconds
    expect: str = ""  # a feed's format, when it must not be guessed

    @property
    def data_id(self) -> str:
        """Where the bytes are kept: a feed's copy under its digest, replaced without touching the last one."""
        return f"{self.id}@{self.sha256[:16]}" if self.kind == "feed" else self.id


@dataclass
class FeedStatus:
    """A feed's validators and what its downloads did (times are Unix seconds; 0: never)."""

    etag: str = ""
    last_modified: str = ""
    content: str = ""  # digest of the names of the last good copy: a new body listing the same is no change
    checked_at: float = 0.0  # the last download tried
    succeeded_at: float = 0.0  # the last one that ended well (a new copy, the same names, or 304)
    changed_at: float = 0.0  # the last copy kept
    next_at: float = 0.0
    error: str = ""  # the last download's failure, "" once one succeeds
    error_at: float = 0.0
    failing: int = 0  # downloads failed in a row
    downloads: int = 0  # 200s
    not_modified: int = 0  # 304s
    failures: int = 0
    published: bool = False  # the last good copy is in a published list
    force: bool = False  # the next download is taken even if it shrinks the feed past feeds.max_shrink
    requested_at: float = 0.0  # the last download asked for through the API


class Shelf(ABC):
    """Where the entries and the uploaded bytes are kept."""

    @abstractmethod
    async def entries(self) -> list[SourceEntry]: ...

    @abstractmethod
    async def put(self, entry: SourceEntry, upload: Path | None, replace_only: bool = False) -> bool:
        """Keep `entry` (and the bytes of `upload`); with `replace_only`, only if it is still there (False
        when it was removed meanwhile: nothing is kept)."""

    @abstractmethod
    async def remove(self, source_id: str) -> bool: ...

    @abstractmethod
    async def copy_upload(self, entry: SourceEntry, to: Path) -> None: ...

    @abstractmethod
    async def statuses(self) -> dict[str, FeedStatus]: ...

    @abstractmethod
    async def put_status(self, source_id: str, status: FeedStatus) -> None: ...

    @abstractmethod
    async def lead(self, node: str, seconds: float) -> bool:
        """Whether `node` holds the feeds' lease for the next `seconds` (taken if free, kept if its own)."""


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

    async def put(self, entry: SourceEntry, upload: Path | None, replace_only: bool = False) -> bool:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if replace_only and entry.id not in self._read():
            return False
        if upload is not None:
            kept = self.directory / f"{entry.id}.src"
            shutil.copyfile(upload, kept.with_suffix(".part"))
            os.replace(kept.with_suffix(".part"), kept)  # a build copying the last one sees it whole
        index = self._read()
        index[entry.id] = asdict(entry)
        self._write(index)
        return True

    async def remove(self, source_id: str) -> bool:
        index = self._read()
        if index.pop(source_id, None) is None:
            return False
        self._write(index)
        (self.directory / f"{source_id}.src").unlink(missing_ok=True)
        statuses = self._read_statuses()
        if statuses.pop(source_id, None) is not None:
            self._write_statuses(statuses)
        return True

    async def copy_upload(self, entry: SourceEntry, to: Path) -> None:
        shutil.copyfile(self.directory / f"{entry.id}.src", to)

    def _read_statuses(self) -> dict[str, dict[str, Any]]:
        kept = self.directory / "feeds.json"
        try:
            return json.loads(kept.read_text()) if kept.exists() else {}
        except (OSError, ValueError) as exc:
            raise BnsError(f"{kept}: the feeds' status cannot be read ({exc}); remove it to start over") from None

    async def statuses(self) -> dict[str, FeedStatus]:
        return {source_id: FeedStatus(**status) for source_id, status in self._read_statuses().items()}

    async def put_status(self, source_id: str, status: FeedStatus) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        statuses = self._read_statuses()
        statuses[source_id] = asdict(status)
        self._write_statuses(statuses)

    def _write_statuses(self, statuses: dict[str, dict[str, Any]]) -> None:
        write_atomically(self.directory / "feeds.json", [json.dumps(statuses, sort_keys=True).encode()])

    async def lead(self, node: str, seconds: float) -> bool:
        return True  # a node alone fetches its own feeds


class RedisShelf(Shelf):
    """Entries in one hash; an upload's bytes chunk by chunk (read off the event loop, one SET each, so a
    big file is never whole in memory), and its entry last, so a half-stored upload is never listed."""

    def __init__(self, connection: RedisConnection) -> None:
        self.store = connection

    async def entries(self) -> list[SourceEntry]:
        stored = await self.store.call(self.store.client.hgetall(self.store.key("sources")))
        return [SourceEntry(**json.loads(value)) for value in stored.values()]

    def _data_keys(self, entry: SourceEntry) -> list[str]:
        return [self.store.key("sources", "data", entry.data_id, str(number)) for number in range(_chunks(entry.size))]

    async def _entry(self, source_id: str) -> SourceEntry | None:
        raw = await self.store.call(self.store.client.hget(self.store.key("sources"), source_id))
        return None if raw is None else SourceEntry(**json.loads(raw))

    async def put(self, entry: SourceEntry, upload: Path | None, replace_only: bool = False) -> bool:
        client = self.store.client
        replaced = await self._entry(entry.id)
        if replace_only and replaced is None:
            return False
        written = self._data_keys(entry) if upload is not None else []
        if upload is not None:
            with upload.open("rb") as data:
                for key in written:
                    chunk = await asyncio.to_thread(data.read, CHUNK)
                    # a copy not listed in the end (a put that fails half-way) goes by itself
                    await self.store.call(client.set(key, chunk, px=_UNLISTED_MS))
        kept = await self.store.call(
            client.eval(
                _PUT, 1, self.store.key("sources"), entry.id, json.dumps(asdict(entry)), int(replace_only), *written
            )
        )
        if not kept:
            return False
        if replaced is not None and replaced.data_id != entry.data_id:
            for key in self._data_keys(replaced):  # a build that listed it may be reading it: it goes later
                await self.store.call(client.pexpire(key, _UNLISTED_MS))
        return True

    async def remove(self, source_id: str) -> bool:
        client = self.store.client
        entry = await self._entry(source_id)
        if entry is None:
            return False
        await self.store.call(client.hdel(self.store.key("sources"), source_id))
        await self.store.call(client.hdel(self.store.key("feeds"), source_id))
        await self.store.call(client.delete(*self._data_keys(entry)))
        return True

    async def statuses(self) -> dict[str, FeedStatus]:
        stored = await self.store.call(self.store.client.hgetall(self.store.key("feeds")))
        return {_text(source_id): FeedStatus(**json.loads(value)) for source_id, value in stored.items()}

    async def put_status(self, source_id: str, status: FeedStatus) -> None:
        await self.store.call(self.store.client.hset(self.store.key("feeds"), source_id, json.dumps(asdict(status))))

    async def lead(self, node: str, seconds: float) -> bool:
        held = await self.store.call(
            self.store.client.eval(_LEAD, 1, self.store.key("feeds", "lease"), node, int(seconds * 1000))
        )
        return bool(held)

    async def copy_upload(self, entry: SourceEntry, to: Path) -> None:
        parts = await self.store.call(self.store.client.mget(self._data_keys(entry)))
        if any(part is None for part in parts):
            raise BnsError(f"source {entry.id}: its stored bytes are incomplete; upload it again")
        write_atomically(to, parts)
        if file_digest(to) != entry.sha256:
            raise BnsError(f"source {entry.id}: its stored bytes do not match its digest; upload it again")


_UNLISTED_MS = 10 * 60 * 1000  # how long bytes no entry lists are kept: longer than a build reads them

# An entry kept (with `replace_only`, only if it is still listed), and the keys of its bytes made lasting, in one
# step: a source removed meanwhile is not brought back.
_PUT = """
if ARGV[3] == '1' and redis.call('hexists', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
for index = 4, #ARGV do redis.call('persist', ARGV[index]) end
return 1
"""

# The lease is kept by its holder (its expiry pushed back) or taken when nobody holds it, in one step.
_LEAD = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _chunks(size: int) -> int:
    return max(1, -(-size // CHUNK))
