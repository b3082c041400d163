"""The admin process's half of device activity (resolver/admin/recorder.py) over the real stores: hand-overs
taken once each (a half-taken one first), bad ones skipped, a batch kept bounded through an outage and written
once, a site deleted while it was written forgotten again, and the query log trimmed to its retention with no
write to trigger it; an alert kept once however many workers and nodes hand it in."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from blocklists.catalog import load_catalog
from resolver.admin import recorder
from resolver.admin.recorder import Recorder
from resolver.shared.config import ActivitySettings
from resolver.shared.errors import StoreUnavailable
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.activity import Batch, LocalActivity, RedisActivity
from resolver.shared.store.file_policies import FileStore
from resolver.shared.store.redis import RedisConnection
from tests.conftest import redis_policy_store

pytestmark = pytest.mark.integration
NOW = time.time()


def entry(key: str, queries: int = 1, site: str = "home") -> dict:
    return {
        "site": site,
        "key": key,
        "hour": int(NOW // 3600 * 3600),
        "address": "192.0.2.1",
        "mac": None,
        "client_id": None,
        "cpe_id": None,
        "first": NOW,
        "last": NOW,
        "queries": queries,
        "blocked": 0,
        "warned": 0,
        "verdicts": {},
        "names": {},
    }


def hand_over(path: Path, devices: list[dict], alerts: list[dict] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"devices": devices, "queries": [], "alerts": alerts or [], "dropped": 0}))


def local_recorder(tmp_path: Path) -> tuple[Recorder, LocalActivity, FileStore]:
    store = FileStore(tmp_path / "policies.json", load_catalog())
    asyncio.run(PolicyService(store).put_site("home", {"networks": ["192.0.2.0/24"]}))
    activity = LocalActivity(ActivitySettings())
    return Recorder(tmp_path / "spool", activity, store), activity, store


def test_every_hand_over_is_taken_once_a_half_taken_one_first_and_a_bad_one_skipped(tmp_path):
    taker, activity, _store = local_recorder(tmp_path)
    spool = tmp_path / "spool"
    hand_over(spool / "worker-0.json.taking", [entry("ip:192.0.2.1", 2)])  # left by a killed admin process
    hand_over(spool / "worker-0.json", [entry("ip:192.0.2.1", 3)])
    (spool / "worker-1.json").write_text("[]")  # not a hand-over
    hand_over(spool / "worker-2.json", [entry("ip:192.0.2.2", 1), entry("ip:192.0.2.9", 1, site="gone")])
    asyncio.run(taker.take())
    seen = asyncio.run(activity.devices("home"))
    assert {key: record["queries"] for key, record in seen.items()} == {"ip:192.0.2.1": 5, "ip:192.0.2.2": 1}
    assert asyncio.run(activity.devices("gone")) == {}  # no such site: nothing kept for it
    assert list(spool.iterdir()) == []
    asyncio.run(taker.take())  # nothing more: counted once
    assert asyncio.run(activity.devices("home"))["ip:192.0.2.1"]["queries"] == 5


def test_through_an_outage_the_waiting_batch_is_bounded_and_then_written_once(tmp_path, monkeypatch):
    taker, activity, _store = local_recorder(tmp_path)
    monkeypatch.setattr(recorder, "_MAX_WAITING", 10)
    failing = True
    written = activity.record

    async def record(batch: Batch, now: float) -> None:
        if failing:
            raise StoreUnavailable("redis at 127.0.0.1:1: connection refused")
        await written(batch, now)

    monkeypatch.setattr(activity, "record", record)
    alerts = [
        {"at": NOW, "site": "home", "device": "ip:192.0.2.1", "reason": "dga", "name": f"n{n}.example"}
        for n in range(8)
    ]
    hand_over(tmp_path / "spool" / "worker-0.json", [entry(f"ip:192.0.2.{n}") for n in range(8)], alerts)
    asyncio.run(taker.take())
    assert len(taker._waiting) == 10 and taker.lost == 6  # the oldest went, and only they are counted
    failing = False
    asyncio.run(taker.take())
    asyncio.run(taker.take())
    assert sum(record["queries"] for record in asyncio.run(activity.devices("home")).values()) == 2
    assert len(asyncio.run(activity.alerts("home"))) == 8


def test_a_site_deleted_while_its_activity_was_written_is_forgotten_again(tmp_path, monkeypatch):
    taker, activity, store = local_recorder(tmp_path)
    written = activity.record

    async def record(batch: Batch, now: float) -> None:
        await written(batch, now)
        await store.update_site("home", lambda _document: None)  # deleted between the check and the write

    monkeypatch.setattr(activity, "record", record)
    hand_over(tmp_path / "spool" / "worker-0.json", [entry("ip:192.0.2.1")])
    asyncio.run(taker.take())
    assert asyncio.run(activity.devices("home")) == {}


def test_the_query_log_is_trimmed_to_its_retention_without_a_write(shared_redis, redis_prefix):
    async def run() -> tuple[list[dict], list[dict], bool]:
        connection = RedisConnection(shared_redis.url, redis_prefix)
        activity = RedisActivity(connection, ActivitySettings(query_log_hours=1.0))
        query = {"site": "home", "device": "ip:192.0.2.1", "name": "a.example", "type": "A", "verdict": "allowed"}
        old, new = {**query, "at": NOW - 3500}, {**query, "at": NOW - 10}
        await activity.record(Batch(queries=[old, new]), NOW - 10)
        before = await activity.queries("home", NOW)
        await activity.trim(NOW + 200)  # the old one is past its hour now; nothing was written since
        kept = await connection.client.zrange(connection.key("qlog", "home"), 0, -1)
        await activity.forget_site("home", NOW)
        await activity.trim(NOW)
        gone = not await connection.client.exists(connection.key("qlog", "home"))
        await connection.close()
        return before, [json.loads(member) for member in kept], gone

    before, kept, gone = asyncio.run(run())
    assert [query["at"] for query in before] == [NOW - 3500, NOW - 10]
    assert [query["at"] for query in kept] == [NOW - 10]  # deleted from Redis, not merely hidden
    assert gone


def test_a_flood_evicts_the_least_recently_seen_but_never_a_configured_device(tmp_path, shared_redis, redis_prefix):
    async def run() -> tuple[set[str], int]:
        store = redis_policy_store(shared_redis.url, redis_prefix)
        await PolicyService(store).put_site(
            "home", {"networks": ["192.0.2.0/24"], "devices": {"tv": {"addresses": ["192.0.2.1"]}}}
        )
        activity = RedisActivity(store.connection, ActivitySettings(devices_per_site=2))
        taker = Recorder(tmp_path / "spool", activity, store)
        hand_over(tmp_path / "spool" / "worker-0.json", [entry("ip:192.0.2.1")])
        await taker.take()
        later = [entry(f"ip:192.0.2.{n}") for n in range(2, 7)]
        for item in later:
            item["last"] = NOW + 60
        hand_over(tmp_path / "spool" / "worker-0.json", later)
        await taker.take()
        kept = set(await activity.devices("home"))
        await store.close()
        return kept, taker.evicted

    kept, evicted = asyncio.run(run())
    assert "ip:192.0.2.1" in kept and len(kept) == 2 and evicted == 4


def alert(name: str = "kq3vz8xw.example", reason: str = "dga", at: float = NOW, client: str = "192.0.2.1") -> dict:
    """An alert as a worker hands it over (worker/threats.py's Alert)."""
    detail = f"machine-made name (score {at % 7:.1f})"
    return {"at": at, "site": "home", "client": client, "device": "ip:192.0.2.1", "name": name, "reason": reason,
            "detail": detail}  # fmt: skip


async def hand_in_copies(spools: Path, recorders: tuple[Recorder, Recorder]) -> None:
    """Both workers of each node hand in the same alert a few seconds apart, each node's recorder takes them
    (the second writes into what the first wrote), and node a's first worker hands in alerts that differ from it
    by name, reason or hour."""
    hour = NOW // 3600 * 3600
    for node, taker in enumerate(recorders):
        for worker in range(2):
            handed = [alert(at=hour + 60 + 10 * node + worker, client=f"192.0.2.{worker + 1}")]
            if (node, worker) == (0, 0):
                handed += [alert("other.example", at=hour + 61), alert(reason="tunnel", at=hour + 62)]
                handed += [alert(at=hour + 3600 + 1)]  # the next hour
            hand_over(spools / f"node-{node}" / f"worker-{worker}.json", [], handed)
        await taker.take()


def test_an_alert_seen_by_every_worker_of_two_nodes_is_listed_once(tmp_path, shared_redis, redis_prefix):
    """Issue 19: the same device, reason and name within the hour was listed once per worker that saw it. Two
    nodes sharing Redis, and one node without Redis (its admin process's own store, taking twice)."""

    async def run() -> tuple[list[dict], list[dict]]:
        stores = tuple(redis_policy_store(shared_redis.url, redis_prefix) for _ in range(2))
        await PolicyService(stores[0]).put_site("home", {"networks": ["192.0.2.0/24"]})
        activities = [RedisActivity(store.connection, ActivitySettings()) for store in stores]
        recorders = (
            Recorder(tmp_path / "redis" / "node-0", activities[0], stores[0]),
            Recorder(tmp_path / "redis" / "node-1", activities[1], stores[1]),
        )
        await hand_in_copies(tmp_path / "redis", recorders)
        shared = await activities[1].alerts("home")
        for store in stores:
            await store.close()
        store = FileStore(tmp_path / "policies.json", load_catalog())
        await PolicyService(store).put_site("home", {"networks": ["192.0.2.0/24"]})
        local = LocalActivity(ActivitySettings())
        alone = Recorder(tmp_path / "local" / "node-0", local, store)
        await hand_in_copies(tmp_path / "local", (alone, Recorder(tmp_path / "local" / "node-1", local, store)))
        return shared, await local.alerts("home")

    hour = NOW // 3600 * 3600
    for listed in asyncio.run(run()):
        assert [(item["name"], item["reason"], item["at"], item["client"]) for item in listed] == [
            ("kq3vz8xw.example", "dga", hour + 3601, "192.0.2.1"),
            ("kq3vz8xw.example", "tunnel", hour + 62, "192.0.2.1"),
            ("other.example", "dga", hour + 61, "192.0.2.1"),
            ("kq3vz8xw.example", "dga", hour + 60, "192.0.2.1"),  # the first one handed in; not its 3 copies
        ]


def test_alerts_beyond_the_cap_and_of_a_forgotten_device_leave_nothing_behind(shared_redis, redis_prefix):
    async def run() -> tuple[list[str], int, list[dict], int]:
        connection = RedisConnection(shared_redis.url, redis_prefix)
        activity = RedisActivity(connection, ActivitySettings(alerts_per_site=2))
        documents = connection.key("alertdocs", "home")
        await activity.record(Batch(alerts=[alert(f"n{n}.example", at=NOW + n) for n in range(4)]), NOW)
        capped = [item["name"] for item in await activity.alerts("home")]
        held = await connection.client.hlen(documents)
        await activity.forget("home", {"ip:192.0.2.1"}, NOW)
        left = await activity.alerts("home"), await connection.client.hlen(documents)
        await connection.close()
        return capped, held, *left

    capped, held, left, documents = asyncio.run(run())
    assert capped == ["n3.example", "n2.example"] and held == 2  # the oldest went, with their documents
    assert left == [] and documents == 0
