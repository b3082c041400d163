"""The policy store in Redis, shared by every node (keys: see resolver/shared/store/redis.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import NoScriptError, WatchError

from blocklists.catalog import Catalog
from resolver.shared.config import LimitsSettings
from resolver.shared.errors import NotFound, StoreUnavailable, WriteUnknown
from resolver.shared.policy.model import (
    PolicyError,
    PolicySpec,
    Site,
    parse_profile,
    parse_shared_records,
    parse_site,
    site_document,
)
from resolver.shared.store.policies import (
    CLIENT_IDS,
    CPE_IDS,
    NETWORKS,
    Apply,
    Change,
    Mutation,
    SiteDocument,
    Store,
    TokenRecords,
    lookup_candidates,
    new_incarnation,
    owned,
    taken,
)
from resolver.shared.store.redis import STORE_ERRORS, Notice, RedisConnection, is_sentinel

log = logging.getLogger(__name__)

_WRITE_RETRIES = 20
# A conflict, or a connection lost while watching (redis-py reports both as WatchError), or any other failure
_COMMIT_FAILURES: tuple[type[BaseException], ...] = (WatchError, *STORE_ERRORS)
_MARKER_SECONDS = 600  # how long a write's marker says it was applied
T = TypeVar("T")

# A client's site in one round trip: by client id (DoT, DoH), else by CPE id, else by the longest network that
# holds its address (the candidates come longest first), and the site's version.
_LOCATE_SCRIPT = """
local site = false
if ARGV[1] ~= '' then site = redis.call('HGET', KEYS[4], ARGV[1]) end
if not site and ARGV[2] ~= '' then site = redis.call('HGET', KEYS[1], ARGV[2]) end
local i = 3
while not site and i <= #ARGV do
  site = redis.call('HGET', KEYS[2], ARGV[i])
  i = i + 1
end
if not site then return {} end
return {site, redis.call('HGET', KEYS[3] .. site, 'version') or false}
"""


class RedisStore(Store):
    confirm_seconds = 5.0  # how long a write whose reply was lost is asked after (a Sentinel failover fits)

    def __init__(
        self,
        connection: RedisConnection,
        catalog: Catalog,
        write_replicas: int = -1,
        limits: LimitsSettings | None = None,
        webhook_allow: tuple[str, ...] = (),
    ) -> None:
        super().__init__(catalog, limits, webhook_allow)
        self.connection = connection
        self.client = connection.client
        self.key = connection.key
        self.call = connection.call
        self.unavailable = connection.unavailable
        self.write_replicas = write_replicas if write_replicas >= 0 else int(is_sentinel(connection.url))
        self._lengths: dict[int, list[int]] | None = None
        self._locate_sha: str | None = None
        self._queued: list[tuple[list[str], asyncio.Future[Any]]] = []

    async def site_document(self, site_id: str) -> tuple[SiteDocument, int] | None:
        raw, version = await self.call(self.client.hmget(self.key("site", site_id), "doc", "version"))
        if raw is None:
            return None
        return json.loads(raw), int(version or 0)

    async def load_site(self, site_id: str) -> Site | None:
        found = await self.site_document(site_id)
        if found is None:
            return None
        try:
            return parse_site(found[0], self.catalog, found[1])
        except PolicyError as exc:  # written by something that skipped validation: do not serve it
            log.error("site %s in redis is invalid (%s); ignoring it", site_id, exc)
            return None

    async def find_site(self, address: str, cpe_id: str | None) -> str | None:
        if cpe_id is not None:
            found = await self.call(self.client.hget(self.key(CPE_IDS), cpe_id))
            if found is not None:
                return found.decode()
        if self._lengths is None:
            counts = await self.call(self.client.hgetall(self.key("netlens")))
            lengths: dict[int, list[int]] = {}
            for key, count in counts.items():
                family, length = key.decode().split("/")
                if int(count) > 0:
                    lengths.setdefault(int(family), []).append(int(length))
            self._lengths = lengths
        candidates = lookup_candidates(address, self._lengths)
        if not candidates:
            return None
        for site_id in await self.call(self.client.hmget(self.key(NETWORKS), candidates)):
            if site_id is not None:
                return site_id.decode()
        return None

    async def find_client_id(self, client_id: str) -> str | None:
        found = await self.call(self.client.hget(self.key(CLIENT_IDS), client_id))
        return found.decode() if found is not None else None

    async def locate(self, address: str, cpe_id: str | None) -> tuple[str, int] | None:
        """One script call per client; the calls of every client arriving in the same loop iteration go
        to Redis in one pipeline (a burst of new clients costs a round trip, not one each)."""
        if self._lengths is None:
            await self.find_site("0.0.0.0", None)  # loads the prefix lengths in use
        return await self._located(["", cpe_id or "", *lookup_candidates(address, self._lengths or {})])

    async def locate_client_id(self, client_id: str) -> tuple[str, int] | None:
        """As `locate`, batched with it."""
        return await self._located([client_id, ""])

    async def _located(self, arguments: list[str]) -> tuple[str, int] | None:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((arguments, future))
        if len(self._queued) == 1:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        found = await future
        if not found or not found[1]:
            return None
        return found[0].decode(), int(found[1])

    async def _flush(self) -> None:
        queued, self._queued = self._queued, []
        try:
            results = await self.call(self._run_locate([arguments for arguments, _future in queued]))
        except Exception as exc:  # StoreUnavailable, or anything else: every waiter must hear of it
            for _arguments, future in queued:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_arguments, future), result in zip(queued, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _run_locate(self, calls: list[list[str]]) -> list[Any]:
        """EVALSHA by hand: redis-py's Script in a pipeline asks SCRIPT EXISTS first, a second round trip
        on every call. A restarted Redis has forgotten the script: load it again and repeat once."""
        keys = [self.key(CPE_IDS), self.key(NETWORKS), self.key("site", ""), self.key(CLIENT_IDS)]
        for attempt in (1, 2):
            if self._locate_sha is None:
                self._locate_sha = await self.client.script_load(_LOCATE_SCRIPT)
            pipe = self.client.pipeline(transaction=False)
            for arguments in calls:
                pipe.evalsha(self._locate_sha, len(keys), *keys, *arguments)
            try:
                return await pipe.execute()
            except NoScriptError:  # restarted, failed over or SCRIPT FLUSHed
                self._locate_sha = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def forget_networks(self) -> None:
        """Prefix lengths in use are cached; a `networks` notice makes them be read again."""
        self._lengths = None

    async def site_networks(self) -> list[str]:
        return [network.decode() for network in await self.call(self.client.hkeys(self.key(NETWORKS)))]

    async def site_versions(self, site_ids: list[str]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for site_id in site_ids:
            pipe.hget(self.key("site", site_id), "version")
        versions = await self.call(pipe.execute())
        return {site_id: int(version or 0) for site_id, version in zip(site_ids, versions, strict=True)}

    async def list_sites(self) -> list[str]:
        return sorted(member.decode() for member in await self.call(self.client.smembers(self.key("sites"))))

    async def site_tokens(self, site_id: str) -> tuple[str, TokenRecords] | None:
        version, incarnation, records = await self.call(
            self.client.hmget(self.key("site", site_id), "version", "incarnation", "tokens")
        )
        if version is None:
            return None
        return (incarnation or b"").decode(), json.loads(records) if records else {}

    async def check(self) -> None:
        await self.call(self.client.ping())

    async def load_profiles(self) -> dict[str, PolicySpec]:
        profiles = {}
        names = await self.call(self.client.smembers(self.key("profiles")))
        for name in sorted(member.decode() for member in names):
            raw = await self.call(self.client.hget(self.key("profile", name), "doc"))
            if raw is not None:
                try:
                    profiles[name] = parse_profile(name, json.loads(raw), self.catalog)
                except PolicyError as exc:
                    log.error("profile %s in redis is invalid (%s); ignoring it", name, exc)
        return profiles

    def watch(self, apply: Apply) -> None:
        async def hear(notice: Notice) -> None:
            if notice.kind == "down":
                await apply(Change("down", notice.data))
            elif notice.kind == "up":
                if notice.resumed:  # notices published during the break are lost: compare versions
                    await apply(Change("resync"))
                await apply(Change("up"))
            else:
                parts = notice.data.split()
                if parts and parts[0] in ("site", "profile", "records") and len(parts) == 3:
                    await apply(Change(parts[0], parts[1], int(parts[2])))
                elif parts == ["networks"]:
                    self.forget_networks()
                    await apply(Change("networks"))

        self.connection.subscribe("changes", hear)

    async def update_site(self, site_id: str, mutate: Mutation) -> Site | None:
        key = self.key("site", site_id)

        async def write(pipe: Any) -> Site | None:
            raw, version = await pipe.hmget(key, "doc", "version")
            old = json.loads(raw) if raw is not None else None
            site = self._validated(site_id, mutate(old), int(version or 0) + 1, old)
            indexed = await self._check_owners(pipe, site_id, site)
            pipe.multi()
            self._queue_write(pipe, site_id, old, site, indexed)
            return site

        site = await self._transaction(site_id, (key, *(self.key(kind) for kind in _OWNED)), write)
        self.forget_networks()  # this store's own lookups see its write at once
        return site

    async def change_site_tokens(self, site_id: str, change: Callable[[TokenRecords], TokenRecords]) -> str:
        key = self.key("site", site_id)

        async def write(pipe: Any) -> str:
            version, incarnation, records = await pipe.hmget(key, "version", "incarnation", "tokens")
            if version is None:
                raise NotFound(f"no site {site_id!r}")
            kept = incarnation.decode() if incarnation else new_incarnation()
            changed = change(json.loads(records) if records else {})
            pipe.multi()
            pipe.hset(key, mapping={"incarnation": kept, "tokens": json.dumps(changed, sort_keys=True)})
            return kept

        return await self._transaction(site_id, (key,), write)

    async def _transaction(self, site_id: str, watched: tuple[str, ...], write: Callable[[Any], Awaitable[T]]) -> T:
        """`write` reads what it needs while `watched` are watched, then queues its writes after MULTI; run
        again whenever a watched key moved before the commit."""
        for _ in range(_WRITE_RETRIES):
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watched)
                    result = await write(pipe)
                except WatchError:
                    continue
                except STORE_ERRORS as exc:  # nothing was sent to be applied
                    raise self.unavailable(exc) from None
                if await self._commit(pipe):
                    return result
        raise StoreUnavailable(f"site {site_id}: still changing under us after {_WRITE_RETRIES} attempts")

    async def _commit(self, pipe: Any) -> bool:
        """Execute a queued transaction; True once it is applied (and confirmed by `write_replicas`
        replicas), False when it certainly was not (a watched key moved, or a failover took it: read again
        and retry).

        A transaction whose reply is lost may or may not have been applied. Each one also sets a key of its
        own (`written:<id>`, kept ten minutes), so the store can be asked afterwards; MULTI/EXEC applies all
        or nothing. Raises StoreUnavailable when it was not applied and Redis is out of reach, WriteUnknown
        when Redis cannot say in time."""
        marker = self.key("written", secrets.token_hex(12))
        pipe.set(marker, 1, ex=_MARKER_SECONDS)
        try:
            await pipe.execute()
        except _COMMIT_FAILURES as exc:
            # A conflict, or a connection lost while watching (redis-py reports both as WatchError): either
            # way the store decides whether it was applied.
            if not await self._applied(marker, exc):
                if isinstance(exc, WatchError):
                    return False
                raise self.unavailable(exc) from None
            return True
        # With replicas to wait for: a write the primary applied but lost in a failover before any replica had
        # it is not in the store any more; it was not applied after all.
        return not self.write_replicas or await self._applied(marker, None)

    async def _applied(self, marker: str, failure: BaseException | None) -> bool:
        """Whether the transaction that set `marker` is in the store (and on `write_replicas` replicas), asked
        until `confirm_seconds` have passed (a failover takes seconds). EXPIRE is the write this connection
        makes, so WAIT covers it and therefore the transaction before it."""
        deadline = time.monotonic() + self.confirm_seconds
        while True:
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.expire(marker, _MARKER_SECONDS)
                if self.write_replicas:
                    pipe.wait(self.write_replicas, int(self.confirm_seconds * 1000))
                found, *acks = await pipe.execute()
                break
            except STORE_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise WriteUnknown(
                        f"the write was sent but {self.unavailable(failure or exc)} before it "
                        f"could be confirmed; read it back to see whether it was applied"
                    ) from None
                await asyncio.sleep(0.1)
        if found and acks and acks[0] < self.write_replicas:
            raise WriteUnknown(
                f"the write was applied on the primary, but {acks[0]} of the "
                f"{self.write_replicas} replicas asked (store.write_replicas) confirmed it within "
                f"{self.confirm_seconds:.0f} s: it may be lost if the primary fails now"
            )
        return bool(found)

    async def _check_owners(self, pipe: Any, site_id: str, site: Site | None) -> set[str]:
        """Raises PolicyError for a network, CPE id or client id another site has; returns the site's client ids
        the index holds already (written again, an unchanged entry would still break every other write's
        WATCH of the index)."""
        indexed: set[str] = set()
        if site is None:
            return indexed
        claims = owned(site)
        for kind in _OWNED:
            of_kind = [(field, value) for claimed, field, value in claims if claimed == kind]
            if not of_kind:
                continue
            owners = await pipe.hmget(self.key(kind), [value for _field, value in of_kind])
            for (field, value), owner in zip(of_kind, owners, strict=True):
                if owner is not None and owner.decode() != site_id:
                    raise PolicyError(field, taken(kind, value, owner.decode()))
                if owner is not None and kind == CLIENT_IDS:
                    indexed.add(value)
        return indexed

    def _queue_write(
        self, pipe: Any, site_id: str, old: SiteDocument | None, new: Site | None, indexed_ids: set[str]
    ) -> None:
        """Queue the document, the index changes and the notices. Old index entries come from the stored
        document as it is, so even one written by hand, and no longer valid, can be replaced; client ids are
        indexed unless the index has them (`indexed_ids`: a site stored before the index gets its ids in)."""
        key = self.key("site", site_id)
        old_networks = set(old.get("networks", [])) if old else set()
        new_networks = set(new.networks) if new else set()
        for network in old_networks - new_networks:
            pipe.hdel(self.key(NETWORKS), network)
            pipe.hincrby(self.key("netlens"), _length_key(network), -1)
        for network in new_networks - old_networks:
            pipe.hset(self.key(NETWORKS), network, site_id)
            pipe.hincrby(self.key("netlens"), _length_key(network), 1)
        old_cpes = set(old.get("cpe_ids", [])) if old else set()
        new_cpes = set(new.cpe_ids) if new else set()
        for cpe in old_cpes - new_cpes:
            pipe.hdel(self.key(CPE_IDS), cpe)
        for cpe in new_cpes - old_cpes:
            pipe.hset(self.key(CPE_IDS), cpe, site_id)
        old_ids = {
            client_id
            for device in (old or {}).get("devices", {}).values()
            for client_id in device.get("client_ids") or ()
        }
        new_ids = {client_id for device in new.devices.values() for client_id in device.client_ids} if new else set()
        for client_id in old_ids - new_ids:
            pipe.hdel(self.key(CLIENT_IDS), client_id)
        for client_id in new_ids - indexed_ids:
            pipe.hset(self.key(CLIENT_IDS), client_id, site_id)
        if new is None:
            pipe.delete(key)
            pipe.srem(self.key("sites"), site_id)
            pipe.publish(self.key("changes"), f"site {site_id} 0")
        else:
            pipe.hset(key, mapping={"doc": json.dumps(site_document(new), sort_keys=True), "version": new.version})
            pipe.hsetnx(key, "incarnation", new_incarnation())  # a new site's (or an older one's first)
            pipe.sadd(self.key("sites"), site_id)
            pipe.publish(self.key("changes"), f"site {site_id} {new.version}")
        if old_networks != new_networks or old_cpes != new_cpes or old_ids != new_ids:
            pipe.publish(self.key("changes"), "networks")  # whose an address, CPE id or client id is: look again

    async def import_sites(self, documents: list[SiteDocument], batch: int = 500) -> int:
        """Validated whole first (see Store.import_sites), then written in pipelined transactions of
        `batch`: two orders of magnitude faster than a write per site. It does not watch for concurrent
        writers of the same sites."""
        sites = self._validated_import(documents)
        olds: list[Any] = []
        indexed: set[str] = set()  # client ids the index holds already, each for its own site
        for start in range(0, len(sites), batch):
            chunk = sites[start : start + batch]
            reads = self.client.pipeline(transaction=False)
            for site in chunk:
                reads.hmget(self.key("site", site.id), "doc", "version")
            claims = [
                (kind, f"sites[{start + index}].{field}", value, site.id)
                for index, site in enumerate(chunk)
                for kind, field, value in owned(site)
            ]
            claims.sort(key=lambda claim: _OWNED.index(claim[0]))  # read below index by index, in this order
            for kind in _OWNED:
                values = [value for claimed, _field, value, _site in claims if claimed == kind]
                if values:
                    reads.hmget(self.key(kind), values)
            results = await self.call(reads.execute())
            olds += results[: len(chunk)]
            existing = [owner for found in results[len(chunk) :] for owner in found]
            for (kind, field, value, site_id), owner in zip(claims, existing, strict=True):
                if owner is not None and owner.decode() != site_id:
                    raise PolicyError(field, taken(kind, value, owner.decode()))
                if owner is not None and kind == CLIENT_IDS:
                    indexed.add(value)
        for start in range(0, len(sites), batch):
            writes = self.client.pipeline(transaction=True)
            for site, (raw, version) in zip(sites[start : start + batch], olds[start : start + batch], strict=True):
                site.version = int(version or 0) + 1
                self._queue_write(writes, site.id, json.loads(raw) if raw is not None else None, site, indexed)
            if not await self._commit(writes):
                raise StoreUnavailable(
                    f"import: sites {start + 1} to {start + len(sites[start : start + batch])} were "
                    f"not written (lost in a failover); the ones before were: import again"
                )
        return len(sites)

    async def set_profile(self, name: str, document: dict[str, Any] | None) -> None:
        key = self.key("profile", name)
        if document is not None:
            parse_profile(name, document, self.catalog)
        async with self.client.pipeline(transaction=True) as pipe:
            if document is None:
                pipe.delete(key)
                pipe.srem(self.key("profiles"), name)
            else:
                pipe.hset(key, "doc", json.dumps(document, sort_keys=True))
                pipe.hincrby(key, "version", 1)
                pipe.sadd(self.key("profiles"), name)
            pipe.publish(self.key("changes"), f"profile {name} 1")
            if not await self._commit(pipe):
                raise StoreUnavailable(f"profile {name}: not written (lost in a failover); try again")

    async def load_records(self) -> tuple[str, ...]:
        raw = await self.call(self.client.hget(self.key("records"), "doc"))
        return tuple(json.loads(raw)) if raw is not None else ()

    async def set_records(self, lines: Any) -> tuple[str, ...]:
        records = parse_shared_records(lines)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("records"), "doc", json.dumps(list(records)))
            pipe.hincrby(self.key("records"), "version", 1)
            pipe.publish(self.key("changes"), "records - 1")
            if not await self._commit(pipe):
                raise StoreUnavailable("records: not written (lost in a failover); try again")
        return records

    async def close(self) -> None:
        await self.connection.close()


_OWNED = (NETWORKS, CPE_IDS, CLIENT_IDS)


def _length_key(network: str) -> str:
    parsed = ipaddress.ip_network(network)
    return f"{parsed.version}/{parsed.prefixlen}"
