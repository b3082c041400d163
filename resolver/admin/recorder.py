"""The admin process's half of device activity: every `_EVERY` seconds it takes the files its workers handed
over (worker/activity.py), keeps what is for sites that exist (a site deleted meanwhile gets nothing back), adds
it to the activity store, and forgets the least recently seen devices of a site beyond its cap.

Taking a file is renaming it (the worker writes the next one as soon as the name is free), reading it and
removing it. While the store cannot be written, what was taken waits here, at most `_MAX_WAITING` items: a
long outage loses the oldest activity, counted, never the node's memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from resolver.shared.errors import StoreUnavailable
from resolver.shared.policy.model import Site, mac_text
from resolver.shared.store.activity import Activity, Batch
from resolver.shared.store.policies import Store

log = logging.getLogger(__name__)

_EVERY = 2.0
_MAX_WAITING = 200_000


def configured_keys(site: Site) -> dict[str, str]:
    """The seen-device key of every identity a site's configured devices have → the device's id."""
    keys = {}
    for device in site.devices.values():
        keys.update(dict.fromkeys((f"mac:{mac_text(mac)}" for mac in device.macs), device.id))
        keys.update(dict.fromkeys((f"id:{client_id}" for client_id in device.client_ids), device.id))
        keys.update(dict.fromkeys((f"ip:{address}" for address in device.addresses), device.id))
    return keys


class Recorder:
    def __init__(
        self, spool: Path, activity: Activity, store: Store | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.spool = spool
        self.activity = activity
        self.store = store
        self._clock = clock
        self._waiting = Batch()
        self.lost = 0  # items dropped: by workers whose hand-over was full, or here during a store outage
        self.evicted = 0
        self._failing = False

    async def run(self) -> None:
        while True:
            await self.take()
            await asyncio.sleep(_EVERY)

    async def take(self) -> None:
        """Take what the workers handed over and add it to the store."""
        batch = self._waiting
        for path in sorted(self.spool.glob("worker-*.json*")):
            taking = path if path.suffix == ".taking" else path.with_name(path.name + ".taking")
            try:
                if taking is not path:
                    path.rename(taking)
                document = json.loads(taking.read_bytes())
                taking.unlink()
                devices, queries, alerts = document["devices"], document["queries"], document["alerts"]
                dropped = int(document["dropped"])
            except (OSError, ValueError, KeyError) as exc:
                log.warning("activity: cannot read %s (%s); skipped", path.name, exc)
                taking.unlink(missing_ok=True)
                continue
            batch.devices += devices
            batch.queries += queries
            batch.alerts += alerts
            self.lost += dropped
        self._waiting = Batch()
        if not batch or self.store is None:
            return
        try:
            sites = sorted(batch.sites())
            versions = await self.store.site_versions(sites)
            living = {site for site in sites if versions.get(site)}
            await self.activity.record(batch.only(living), self._clock())
            for site_id in sorted({entry["site"] for entry in batch.devices} & living):
                await self._evict(site_id)
        except StoreUnavailable as exc:
            if not self._failing:
                log.warning("activity: the store cannot be written (%s); keeping what the workers count meanwhile", exc)
            self._failing = True
            self._keep(batch)
            return
        if self._failing:
            log.info("activity: the store is written again")
            self._failing = False

    def _keep(self, batch: Batch) -> None:
        excess = len(batch) - _MAX_WAITING
        if excess > 0:
            self.lost += excess
            del batch.devices[: min(excess, len(batch.devices))]
            excess = len(batch) - _MAX_WAITING
            del batch.queries[: max(excess, 0)]
        self._waiting = batch

    async def _evict(self, site_id: str) -> None:
        if await self.activity.seen_count(site_id) <= self.activity.settings.devices_per_site:
            return
        assert self.store is not None
        site = await self.store.load_site(site_id)
        configured = set(configured_keys(site)) if site is not None else set()
        self.evicted += await self.activity.evict(site_id, configured, self._clock())
