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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resolver.shared.errors import StoreUnavailable
from resolver.shared.logs import Throttled
from resolver.shared.policy.model import Site, mac_text
from resolver.shared.store.activity import Activity, Batch
from resolver.shared.store.policies import Store

log = logging.getLogger(__name__)
_failures = Throttled(log)

_EVERY = 2.0
_TRIM_EVERY = 30.0
_MAX_WAITING = 200_000


def configured_keys(site: Site) -> dict[str, str]:
    """The seen-device key of every identity a site's configured devices have → the device's id."""
    keys = {}
    for device in site.devices.values():
        keys[f"device:{device.id}"] = device.id  # a device found by its DoT/DoH credential is filed so
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
        next_trim = 0.0
        while True:
            try:
                await self.take()
                if self._clock() >= next_trim:  # the query logs' retention, kept even where nothing is written
                    await self.activity.trim(self._clock())
                    next_trim = self._clock() + _TRIM_EVERY
            except StoreUnavailable:
                pass  # said once by take(); tried again next turn
            except Exception:  # a bug must not end the recording: the workers would stop handing over
                _failures.exception("activity: recording failed")
            await asyncio.sleep(min(_EVERY, self.activity.settings.hand_over_seconds))

    async def take(self) -> None:
        """Take what the workers handed over and add it to the store."""
        batch = self._waiting
        # A file left half-taken by an admin process that was killed first, before a new one takes its name.
        for path in sorted(self.spool.glob("worker-*.json*"), key=lambda path: path.suffix != ".taking"):
            taking = path if path.suffix == ".taking" else path.with_name(path.name + ".taking")
            try:
                if taking is not path:
                    path.rename(taking)
                taken = _taken(json.loads(taking.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("activity: cannot read %s (%s); skipped", path.name, exc)
                taken = None
            taking.unlink(missing_ok=True)
            if taken is not None:
                batch.devices += taken.devices
                batch.queries += taken.queries
                batch.alerts += taken.alerts
                self.lost += taken.dropped
        self._waiting = Batch()
        if not batch or self.store is None:
            return
        try:
            sites = sorted(batch.sites())
            versions = await self.store.site_versions(sites)
            living = {site for site in sites if versions.get(site)}
            await self.activity.record(batch.only(living), self._clock())
        except StoreUnavailable as exc:
            if not self._failing:
                log.warning("activity: the store cannot be written (%s); keeping what the workers count meanwhile", exc)
            self._failing = True
            self._keep(batch)
            return
        if self._failing:
            log.info("activity: the store is written again")
            self._failing = False
        # Written: nothing of it is written again. A site deleted since it was found is forgotten again (its
        # deletion forgot it before this write); the rest keep to their caps.
        versions = await self.store.site_versions(sorted(living))
        for site_id in sorted(living):
            if not versions.get(site_id):
                await self.activity.forget_site(site_id, self._clock())
        for site_id in sorted({entry["site"] for entry in batch.devices} & living):
            await self._evict(site_id)

    def _keep(self, batch: Batch) -> None:
        """Keep a batch for the next turn, its oldest items dropped beyond `_MAX_WAITING` (and counted)."""
        for items in (batch.devices, batch.queries, batch.alerts):
            excess = min(len(batch) - _MAX_WAITING, len(items))
            if excess > 0:
                del items[:excess]
                self.lost += excess
        self._waiting = batch

    async def _evict(self, site_id: str) -> None:
        """Keep a site to `devices_per_site` seen devices, its configured ones always."""
        excess = await self.activity.seen_count(site_id) - self.activity.settings.devices_per_site
        if excess <= 0:
            return
        assert self.store is not None
        site = await self.store.load_site(site_id)
        if site is None:  # deleted meanwhile, or unreadable: which devices are configured cannot be told
            return
        self.evicted += await self.activity.evict(site_id, excess, set(configured_keys(site)), self._clock())


@dataclass
class _Taken:
    devices: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    dropped: int


def _taken(document: Any) -> _Taken:
    """A worker's hand-over, its shape checked. Raises KeyError or TypeError."""
    taken = _Taken(document["devices"], document["queries"], document["alerts"], int(document["dropped"]))
    for items in (taken.devices, taken.queries, taken.alerts):
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise TypeError("not lists of objects")
    return taken
