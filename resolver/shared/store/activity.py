"""Where each site's device activity is kept: the seen devices, hourly counts, top blocked names, the opt-in
query log and the threat alerts. Redis, shared by every node (each node's admin process adds what its own
workers counted: increments, so that nodes add up), else the admin process's memory (a single box; forgotten
at a restart).

Written by the recorder (resolver/admin/recorder.py) only for sites that exist; read by the admin API. Keys,
under the store prefix, per site S:

    seen:S        hash   device key → its identity (JSON: address, mac, client_id, cpe_id)
    seenfirst:S   hash   device key → first seen (Unix time)
    seenlast:S    zset   device key by last seen (the cap evicts from its low end)
    seencount:S   hash   "<key>|queries|blocked|warned" → count
    act:S:<day>   hash   "<key>|<hour>|<what>" → count (what: queries, blocked, warned, "<verdict>|<category>")
    top:S:<day>   zset   "<key>|<verdict>|<name>" by count, the `_TOP` most counted kept
    qlog:S        zset   query (JSON) by time: only for a site with `query_log`, older than the retention deleted
    qlogs         set    the sites with a query log, which `trim` goes through
    alerts:S      zset   alert key ("<device>|<hour>|<reason>|<name>") by time
    alertdocs:S   hash   alert key → the alert (JSON)

Days and hours are Unix day and hour numbers; the day keys expire `days` after their day. A query log is
trimmed to `query_log_hours` at every write and by `trim`, which the recorder runs every 30 s whether or not
anything is written (and the key expires that long after its last write), so no query outlives its
retention by more than a minute, even when the site falls silent or turns its log off.

An alert is kept once per (site, device, reason, name, hour): every worker of every node that sees a device ask
a suspect name flags it, and the first alert handed in is the one kept (atomically in Redis: `_KEEP_ALERTS`).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from resolver.shared.config import ActivitySettings
from resolver.shared.policy.model import PolicyError
from resolver.shared.store.redis import RedisConnection

_TOP = 1000  # names kept per site and day in the top blocked
_IDENTITY = ("address", "mac", "client_id", "cpe_id")
_COUNTS = ("queries", "blocked", "warned")
# KEYS: alerts:S, alertdocs:S; ARGV: how many to keep, then (key, time, alert) of each alert handed in.
_KEEP_ALERTS = """
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  end
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do
    redis.call('HDEL', KEYS[2], key)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
end
"""


@dataclass
class Batch:
    """What the workers handed over since the last write, for sites that exist."""

    devices: list[dict[str, Any]] = field(default_factory=list)  # worker/activity.py's entries
    queries: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def sites(self) -> set[str]:
        return {item["site"] for item in (*self.devices, *self.queries, *self.alerts) if item.get("site")}

    def only(self, sites: set[str]) -> Batch:
        return Batch(*([item for item in items if item.get("site") in sites] for items in self._parts()))

    def _parts(self) -> tuple[list[dict[str, Any]], ...]:
        return self.devices, self.queries, self.alerts

    def __len__(self) -> int:
        return sum(len(items) for items in self._parts())


def alert_key(alert: dict[str, Any]) -> str:
    """What makes an alert the same as another of its site: the device, the hour, the reason and the name."""
    return f"{alert['device']}|{int(alert['at'] // 3600)}|{alert['reason']}|{alert['name']}"


def _hour_fields(entry: dict[str, Any]) -> Iterable[tuple[str, int]]:
    """(what, count) of an entry, as kept per hour."""
    for what in _COUNTS:
        if entry[what]:
            yield what, entry[what]
    yield from entry["verdicts"].items()


class Activity(ABC):
    shared = True  # kept where every process of every node reads it

    def __init__(self, settings: ActivitySettings) -> None:
        self.settings = settings

    @abstractmethod
    async def record(self, batch: Batch, now: float) -> None:
        """Add a batch. Raises StoreUnavailable, having written all or part of it."""

    @abstractmethod
    async def devices(self, site: str) -> dict[str, dict[str, Any]]:
        """Every seen device of a site by key: its identity, first and last seen, and counts."""

    @abstractmethod
    async def hours(self, site: str, since: float) -> dict[tuple[str, int], dict[str, int]]:
        """(device key, hour) → what → count, for the hours from `since` on (at most `days` back)."""

    @abstractmethod
    async def top(self, site: str, since: float) -> dict[tuple[str, str], int]:
        """(device key, "<verdict>|<name>") → count, over the days from `since`'s on (at most `days` back)."""

    @abstractmethod
    async def trim(self, now: float) -> None:
        """Delete the logged queries older than the retention, of every site."""

    @abstractmethod
    async def queries(self, site: str, now: float) -> list[dict[str, Any]]:
        """The logged queries still within the retention, oldest first."""

    @abstractmethod
    async def alerts(self, site: str) -> list[dict[str, Any]]:
        """The kept alerts, newest first."""

    @abstractmethod
    async def forget(self, site: str, keys: set[str], now: float) -> None:
        """Forget devices: their record, activity, logged queries and alerts."""

    @abstractmethod
    async def forget_site(self, site: str, now: float) -> None:
        """Forget everything of a site (it was deleted)."""

    @abstractmethod
    async def oldest(self, site: str, count: int) -> list[str]:
        """The `count` least recently seen device keys, least first."""

    @abstractmethod
    async def seen_count(self, site: str) -> int: ...

    async def evict(self, site: str, excess: int, configured: set[str], now: float) -> int:
        """Forget the `excess` least recently seen devices not in `configured`. How many went."""
        candidates = await self.oldest(site, excess + len(configured))
        going = [key for key in candidates if key not in configured][:excess]
        await self.forget(site, set(going), now)
        return len(going)

    def _days(self, since: float, now: float) -> range:
        """The day numbers from `since`'s to today's, at most `days` + 1 of them (the oldest partly kept)."""
        today = int(now // 86400)
        return range(max(int(since // 86400), today - self.settings.days), today + 1)

    def oldest_kept(self, now: float) -> float:
        return now - self.settings.days * 86400

    def window(self, hours: str | None, now: float) -> float:
        """The start of the last `hours` hours (as text, a query string's; None: every hour kept). Raises
        PolicyError naming `hours` for anything but a number of hours from 1 to what is kept."""
        kept = self.settings.days * 24
        if hours is not None and (not hours.isdigit() or not 1 <= int(hours) <= kept):
            raise PolicyError("hours", f"must be a number of hours from 1 to {kept} (activity.days)")
        return now - int(hours or kept) * 3600


class RedisActivity(Activity):
    def __init__(self, connection: RedisConnection, settings: ActivitySettings) -> None:
        super().__init__(settings)
        self._redis = connection
        self._client = connection.client
        self._key = connection.key

    async def record(self, batch: Batch, now: float) -> None:
        key, settings = self._key, self.settings
        pipe = self._client.pipeline(transaction=False)
        day_seconds = (settings.days + 1) * 86400
        for entry in batch.devices:
            site, device, hour = entry["site"], entry["key"], entry["hour"]
            day = str(hour // 86400)
            pipe.hset(key("seen", site), device, json.dumps({name: entry[name] for name in _IDENTITY}))
            pipe.hsetnx(key("seenfirst", site), device, entry["first"])
            pipe.zadd(key("seenlast", site), {device: entry["last"]}, gt=True)
            for what in _COUNTS:
                if entry[what]:
                    pipe.hincrby(key("seencount", site), f"{device}|{what}", entry[what])
            for what, count in _hour_fields(entry):
                pipe.hincrby(key("act", site, day), f"{device}|{hour}|{what}", count)
            pipe.expireat(key("act", site, day), int(hour // 86400 * 86400 + day_seconds))
            for name, count in entry["names"].items():
                pipe.zincrby(key("top", site, day), count, f"{device}|{name}")
            if entry["names"]:
                pipe.zremrangebyrank(key("top", site, day), 0, -_TOP - 1)
                pipe.expireat(key("top", site, day), int(hour // 86400 * 86400 + day_seconds))
        retention = settings.query_log_hours * 3600
        for site in {query["site"] for query in batch.queries}:
            pipe.sadd(key("qlogs"), site)
            log = key("qlog", site)
            pipe.zadd(log, {json.dumps(query): query["at"] for query in batch.queries if query["site"] == site})
            pipe.zremrangebyscore(log, "-inf", now - retention)
            pipe.zremrangebyrank(log, 0, -settings.query_log_size - 1)
            pipe.expire(log, int(retention) + 1)
        for site in {alert["site"] for alert in batch.alerts}:
            handed = [
                part
                for alert in batch.alerts
                if alert["site"] == site
                for part in (alert_key(alert), alert["at"], json.dumps(alert))
            ]
            pipe.eval(_KEEP_ALERTS, 2, key("alerts", site), key("alertdocs", site), settings.alerts_per_site, *handed)
        await self._redis.call(pipe.execute())

    async def devices(self, site: str) -> dict[str, dict[str, Any]]:
        key = self._key
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(key("seen", site))
        pipe.hgetall(key("seenfirst", site))
        pipe.zrange(key("seenlast", site), 0, -1, withscores=True)
        pipe.hgetall(key("seencount", site))
        identities, firsts, lasts, counts = await self._redis.call(pipe.execute())
        found: dict[str, dict[str, Any]] = {}
        for device, identity in identities.items():
            record = found[device.decode()] = {**json.loads(identity), **dict.fromkeys(_COUNTS, 0)}
            record["first_seen"] = float(firsts.get(device, 0) or 0) or None
        for device, last in lasts:
            if device.decode() in found:
                found[device.decode()]["last_seen"] = last
        for name, count in counts.items():
            device, _, what = name.decode().rpartition("|")
            if device in found:
                found[device][what] = int(count)
        return found

    async def hours(self, site: str, since: float) -> dict[tuple[str, int], dict[str, int]]:
        now = time.time()
        since = max(since, self.oldest_kept(now))
        pipe = self._client.pipeline(transaction=False)
        for day in self._days(since, now):
            pipe.hgetall(self._key("act", site, str(day)))
        found: dict[tuple[str, int], dict[str, int]] = {}
        for fields in await self._redis.call(pipe.execute()):
            for name, count in fields.items():
                device, hour, what = name.decode().split("|", 2)
                if int(hour) + 3600 > since:
                    found.setdefault((device, int(hour)), {})[what] = int(count)
        return found

    async def top(self, site: str, since: float) -> dict[tuple[str, str], int]:
        pipe = self._client.pipeline(transaction=False)
        for day in self._days(since, time.time()):
            pipe.zrange(self._key("top", site, str(day)), 0, -1, withscores=True)
        found: dict[tuple[str, str], int] = {}
        for members in await self._redis.call(pipe.execute()):
            for member, count in members:
                device, _, name = member.decode().partition("|")
                found[(device, name)] = found.get((device, name), 0) + int(count)
        return found

    async def queries(self, site: str, now: float) -> list[dict[str, Any]]:
        since = now - self.settings.query_log_hours * 3600
        members = await self._redis.call(self._client.zrangebyscore(self._key("qlog", site), since, "+inf"))
        return [json.loads(member) for member in members]

    async def alerts(self, site: str) -> list[dict[str, Any]]:
        keys = await self._redis.call(self._client.zrevrange(self._key("alerts", site), 0, -1))
        if not keys:
            return []
        documents = await self._redis.call(self._client.hmget(self._key("alertdocs", site), keys))
        return [json.loads(document) for document in documents if document is not None]

    async def trim(self, now: float) -> None:
        sites = [member.decode() for member in await self._redis.call(self._client.smembers(self._key("qlogs")))]
        if not sites:
            return
        pipe = self._client.pipeline(transaction=False)
        for site in sites:
            pipe.zremrangebyscore(self._key("qlog", site), "-inf", now - self.settings.query_log_hours * 3600)
            pipe.zcard(self._key("qlog", site))
        results = await self._redis.call(pipe.execute())
        empty = [site for site, left in zip(sites, results[1::2], strict=True) if not left]
        if empty:  # a write meanwhile adds its site again
            await self._redis.call(self._client.srem(self._key("qlogs"), *empty))

    async def forget(self, site: str, keys: set[str], now: float) -> None:
        if not keys:
            return
        key = self._key
        pipe = self._client.pipeline(transaction=False)
        pipe.hdel(key("seen", site), *keys)
        pipe.hdel(key("seenfirst", site), *keys)
        pipe.zrem(key("seenlast", site), *keys)
        pipe.hdel(key("seencount", site), *(f"{device}|{what}" for device in keys for what in _COUNTS))
        await self._redis.call(pipe.execute())
        days = self._days(0, now)
        scanned = [key("act", site, str(day)) for day in days]
        ranked = [key("top", site, str(day)) for day in days] + [key("qlog", site), key("alerts", site)]
        for name in scanned:
            fields = await self._redis.call(self._client.hkeys(name))
            gone = [item for item in fields if item.decode().partition("|")[0] in keys]
            if gone:
                await self._redis.call(self._client.hdel(name, *gone))
        for name in ranked:
            members = await self._redis.call(self._client.zrange(name, 0, -1))
            gone = [member for member in members if _device_of(member) in keys]
            if gone:
                await self._redis.call(self._client.zrem(name, *gone))
                if name == key("alerts", site):
                    await self._redis.call(self._client.hdel(key("alertdocs", site), *gone))

    async def forget_site(self, site: str, now: float) -> None:
        key = self._key
        kinds = ("seen", "seenfirst", "seenlast", "seencount", "qlog", "alerts", "alertdocs")
        names = [key(kind, site) for kind in kinds]
        for day in self._days(0, now):
            names += [key("act", site, str(day)), key("top", site, str(day))]
        await self._redis.call(self._client.delete(*names))

    async def oldest(self, site: str, count: int) -> list[str]:
        members = await self._redis.call(self._client.zrange(self._key("seenlast", site), 0, count - 1))
        return [member.decode() for member in members]

    async def seen_count(self, site: str) -> int:
        return int(await self._redis.call(self._client.zcard(self._key("seenlast", site))))


def _device_of(member: bytes) -> str:
    """The device key of a top-blocked member or an alert's (`<key>|…`), or of a logged query (JSON)."""
    if member.startswith(b"{"):
        document = json.loads(member)
        return str(document.get("device") or "")
    return member.decode().partition("|")[0]


class LocalActivity(Activity):
    """The same, in the admin process's memory: one node without Redis."""

    shared = False

    def __init__(self, settings: ActivitySettings) -> None:
        super().__init__(settings)
        self._seen: dict[str, dict[str, dict[str, Any]]] = {}
        self._hours: dict[str, dict[tuple[str, int], dict[str, int]]] = {}
        self._top: dict[str, dict[tuple[str, int, str], int]] = {}
        self._queries: dict[str, deque[dict[str, Any]]] = {}
        self._alerts: dict[str, dict[str, dict[str, Any]]] = {}  # site → alert_key → the first alert handed in

    async def record(self, batch: Batch, now: float) -> None:
        for entry in batch.devices:
            site, device, hour = entry["site"], entry["key"], entry["hour"]
            record = self._seen.setdefault(site, {}).setdefault(
                device, {"first_seen": entry["first"], "last_seen": entry["last"], **dict.fromkeys(_COUNTS, 0)}
            )
            record.update({name: entry[name] for name in _IDENTITY})
            record["last_seen"] = max(record["last_seen"], entry["last"])
            for what in _COUNTS:
                record[what] += entry[what]
            hourly = self._hours.setdefault(site, {}).setdefault((device, hour), {})
            for what, count in _hour_fields(entry):
                hourly[what] = hourly.get(what, 0) + count
            top = self._top.setdefault(site, {})
            for name, count in entry["names"].items():
                top[(device, hour // 86400, name)] = top.get((device, hour // 86400, name), 0) + count
        for query in batch.queries:
            self._queries.setdefault(query["site"], deque(maxlen=self.settings.query_log_size)).append(query)
        for alert in batch.alerts:
            self._alerts.setdefault(alert["site"], {}).setdefault(alert_key(alert), alert)
        for site in {alert["site"] for alert in batch.alerts}:
            kept = self._alerts[site]
            excess = len(kept) - self.settings.alerts_per_site
            if excess > 0:  # the oldest go, as Redis keeps the newest
                for oldest in sorted(kept, key=lambda held: kept[held]["at"])[:excess]:
                    del kept[oldest]
        self._expire(now)

    def _expire(self, now: float) -> None:
        oldest = self.oldest_kept(now)
        for hours in self._hours.values():
            for slot in [slot for slot in hours if slot[1] + 3600 <= oldest]:
                del hours[slot]
        for top in self._top.values():
            for item in [item for item in top if item[1] < oldest // 86400]:
                del top[item]
            if len(top) > _TOP * (self.settings.days + 1):  # as Redis keeps the `_TOP` most counted a day
                for item in sorted(top, key=top.__getitem__)[: len(top) - _TOP * (self.settings.days + 1)]:
                    del top[item]
        since = now - self.settings.query_log_hours * 3600
        for log in self._queries.values():
            while log and log[0]["at"] < since:
                log.popleft()

    async def devices(self, site: str) -> dict[str, dict[str, Any]]:
        return {device: dict(record) for device, record in self._seen.get(site, {}).items()}

    async def hours(self, site: str, since: float) -> dict[tuple[str, int], dict[str, int]]:
        self._expire(time.time())
        return {slot: dict(counts) for slot, counts in self._hours.get(site, {}).items() if slot[1] + 3600 > since}

    async def top(self, site: str, since: float) -> dict[tuple[str, str], int]:
        self._expire(time.time())
        found: dict[tuple[str, str], int] = {}
        for (device, day, name), count in self._top.get(site, {}).items():
            if day >= since // 86400:
                found[(device, name)] = found.get((device, name), 0) + count
        return found

    async def trim(self, now: float) -> None:
        self._expire(now)

    async def queries(self, site: str, now: float) -> list[dict[str, Any]]:
        self._expire(now)
        return list(self._queries.get(site, ()))

    async def alerts(self, site: str) -> list[dict[str, Any]]:
        return sorted(self._alerts.get(site, {}).values(), key=lambda alert: alert["at"], reverse=True)

    async def forget(self, site: str, keys: set[str], now: float) -> None:
        for device in keys:
            self._seen.get(site, {}).pop(device, None)
        hours, top = self._hours.get(site, {}), self._top.get(site, {})
        for slot in [slot for slot in hours if slot[0] in keys]:
            del hours[slot]
        for item in [item for item in top if item[0] in keys]:
            del top[item]
        if site in self._queries:
            logged = self._queries[site]
            self._queries[site] = deque((item for item in logged if item.get("device") not in keys), logged.maxlen)
        alerts = self._alerts.get(site, {})
        for gone in [held for held, alert in alerts.items() if alert.get("device") in keys]:
            del alerts[gone]

    async def forget_site(self, site: str, now: float) -> None:
        for kept in (self._seen, self._hours, self._top, self._queries, self._alerts):
            kept.pop(site, None)

    async def oldest(self, site: str, count: int) -> list[str]:
        seen = self._seen.get(site, {})
        return sorted(seen, key=lambda device: seen[device]["last_seen"])[:count]

    async def seen_count(self, site: str) -> int:
        return len(self._seen.get(site, {}))
