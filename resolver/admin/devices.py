"""What a site's subscriber sees of its devices: every device seen or configured, with its vendor, group, effective
status (status.py) and counts, and each device's activity by hour. Built from the site document and the activity
store (shared/store/activity.py) when asked; nothing here is on the query path.

Vendors come from the MAC's OUI in the IEEE registry as the netaddr package ships it (kept up to date with
each release of the package, which is why it is a dependency rather than a table of ours). A MAC with the
locally administered bit set is not a maker's: phones and laptops make one up per network for privacy.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import netaddr

from blocklists.catalog import Catalog
from resolver.admin.recorder import configured_keys
from resolver.admin.status import profiles_of, status_of
from resolver.shared.errors import NotFound
from resolver.shared.policy.effective import PolicyMaker
from resolver.shared.policy.model import Device, PolicySpec, Site, time_document
from resolver.shared.store.activity import Activity
from resolver.shared.store.policies import Store

ONLINE_SECONDS = 300.0  # a device seen this recently is online


@lru_cache(maxsize=4096)
def vendor_of(mac: str | None) -> str | None:
    """The maker registered for a MAC's OUI, "private address" for a made-up one, None if unknown."""
    if mac is None:
        return None
    if int(mac[:2], 16) & 0x02:
        return "private address"
    try:
        return str(netaddr.EUI(mac).oui.registration().org)
    except (netaddr.NotRegisteredError, netaddr.AddrFormatError, IndexError):
        return None


async def site_devices(
    store: Store, activity: Activity, maker: PolicyMaker, catalog: Catalog, site_id: str, now: float
) -> list[dict[str, Any]]:
    """`device_list` of a site as the stores have it now. Raises NotFound, StoreUnavailable."""
    site = await store.load_site(site_id)
    if site is None:
        raise NotFound(f"no site {site_id!r}")
    return device_list(site, await activity.devices(site_id), maker, await profiles_of(store, catalog), now)


def device_list(
    site: Site, seen: dict[str, dict[str, Any]], maker: PolicyMaker, profiles: dict[str, PolicySpec], now: float
) -> list[dict[str, Any]]:
    """Every device seen (by its key) or configured (`device:<id>` when never seen), most recently seen first."""
    owners = configured_keys(site)
    listed: list[dict[str, Any]] = []
    shown: set[str] = set()
    for key, record in seen.items():
        device = site.devices.get(owners[key]) if key in owners else None
        if device is not None:
            shown.add(device.id)
        listed.append(_entry(key, record, device, site, maker, profiles, now))
    for device in site.devices.values():
        if device.id not in shown:
            listed.append(_entry(f"device:{device.id}", {}, device, site, maker, profiles, now))
    listed.sort(key=lambda entry: (-(entry["last_seen"] or 0), entry["name"], entry["key"]))
    return listed


def _entry(
    key: str,
    record: dict[str, Any],
    device: Device | None,
    site: Site,
    maker: PolicyMaker,
    profiles: dict[str, PolicySpec],
    now: float,
) -> dict[str, Any]:
    mac = record.get("mac") or (key[4:] if key.startswith("mac:") else None)
    last = record.get("last_seen")
    status = status_of(site, device, maker, profiles, now)
    return {
        "key": key,
        "device": device.id if device else None,
        "name": device.name or device.id if device else "",
        "vendor": vendor_of(mac),
        "mac": mac,
        "client_id": record.get("client_id"),
        "address": record.get("address"),
        "group": status["group"],
        "first_seen": record.get("first_seen"),
        "last_seen": last,
        "online": last is not None and now - last < ONLINE_SECONDS,
        "queries": record.get("queries", 0),
        "blocked": record.get("blocked", 0),
        "warned": record.get("warned", 0),
        "paused_until": time_document(device.paused_until) if device else None,
        "status": status["state"],
        "effective": status,
    }


async def activity_view(
    activity: Activity, site: str, device: str | None, since: float, top: int = 20
) -> dict[str, Any]:
    """Counts by hour from `since` (only hours with traffic, oldest first) and the most blocked names (by day:
    over the days from `since`'s), of one device or all."""
    by_hour: dict[int, dict[str, Any]] = {}
    for (key, hour), counts in (await activity.hours(site, since)).items():
        if device is not None and key != device:
            continue
        slot = by_hour.setdefault(hour, {"queries": 0, "blocked": 0, "warned": 0, "categories": {}})
        for what, count in counts.items():
            if "|" in what:
                category = what.partition("|")[2]
                slot["categories"][category] = slot["categories"].get(category, 0) + count
            else:
                slot[what] += count
    names: dict[tuple[str, str], int] = {}
    for (key, verdict_name), count in (await activity.top(site, since)).items():
        if device is None or key == device:
            verdict, _, name = verdict_name.partition("|")
            names[(name, verdict)] = names.get((name, verdict), 0) + count
    ranked = sorted(names.items(), key=lambda item: (-item[1], item[0]))[:top]
    return {
        "hours": [
            {
                "hour": time_document(hour),
                "allowed": slot["queries"] - slot["blocked"] - slot["warned"],
                **slot,
            }
            for hour, slot in sorted(by_hour.items())
        ],
        "top_blocked": [{"name": name, "verdict": verdict, "count": count} for (name, verdict), count in ranked],
    }


def identity_fields(key: str) -> dict[str, list[str]]:
    """The device-document fields that make a configured device of a seen key. Raises ValueError."""
    kind, _, value = key.partition(":")
    field = {"mac": "macs", "id": "client_ids", "ip": "addresses"}.get(kind)
    if field is None or not value:
        raise ValueError(f"{key!r} is not a seen device's key (mac:…, id:… or ip:…)")
    return {field: [value]}
