"""A worker's counters, written to the node's run directory every second for the admin process to add up (counting
stays off the query path: the cache, the blocked-answer builder and the forwarder count as they go)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blocklists.artifact import write_atomically
from blocklists.catalog import Catalog
from resolver.worker.pipeline import Resolver

_INTERVAL = 1.0


def worker_counters(resolver: Resolver, catalog: Catalog) -> dict[str, Any]:
    verdicts: dict[str, int] = {}
    for verdict, count in resolver.blocked.counts.items():
        for category in catalog.ids(verdict.categories) or [""]:
            key = f"{verdict.action}|{category}|{verdict.reason if not verdict.categories else ''}"
            verdicts[key] = verdicts.get(key, 0) + count
    forwarder = resolver.forwarder
    threats = resolver.threats
    return {
        "cache_hits": resolver.cache.hits,
        "stale_answers": resolver.cache.stale_answers,
        "cache_misses": resolver.cache.misses,
        "verdicts": verdicts,
        "upstream_replies": forwarder.replies,
        "upstream_seconds": forwarder.reply_seconds,
        "upstream_rejected": dict(forwarder.rejected),
        "upstream_send_errors": forwarder.send_errors,
        "lists_version": resolver.lists.snapshot.version,
        "threats": dict(threats.counts),
        "refused_claims": dict(resolver.directory.refused_claims),
        "local_answers": resolver.local_zones.counts(),
        "forwards": resolver.local_zones.forward_counts(time.monotonic()),  # the clock of the loop's time()
        "threat_alerts": [dataclasses.asdict(alert) for alert in threats.recent],
    }


async def write_counters(directory: Path, index: int, counters: Callable[[], dict[str, Any]]) -> None:
    """Until cancelled: this worker's counters to `directory/worker-<index>.json`, every second."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"worker-{index}.json"
    while True:
        write_atomically(path, [json.dumps({"pid": os.getpid(), "at": time.time(), **counters()}).encode()])
        await asyncio.sleep(_INTERVAL)
