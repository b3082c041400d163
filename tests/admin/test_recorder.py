"""The admin process's half of device activity (resolver/admin/recorder.py) over the real stores: hand-overs
taken once each (a half-taken one first), bad ones skipped, a batch kept bounded through an outage and written
once, a site deleted while it was written forgotten again, and the query log trimmed to its retention with no
write to trigger it."""

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
    alerts = [{"at": NOW, "site": "home", "device": "ip:192.0.2.1", "reason": "dga"} for _ in range(8)]
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
