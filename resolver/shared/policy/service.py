"""The write API for sites, groups, devices, policies, pauses and profiles.

Every operation is one atomic read-modify-write of a site document in the store: the whole new document is
validated before anything is stored, so a bad field refuses the write with its path and reason, and
nothing is half-written. The CLI (`bns policy`) and the admin API call these methods.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Any

from resolver.shared.config import TlsSettings
from resolver.shared.errors import NotFound
from resolver.shared.identity import new_client_id
from resolver.shared.policy.model import PolicyError, Site, parse_time, site_document, time_document
from resolver.shared.store.activity import Activity
from resolver.shared.store.policies import SiteDocument, Store

Target = tuple[str, str | None]  # ("site", None), ("group", id) or ("device", id)


def client_id_endpoints(tls: TlsSettings, client_id: str) -> dict[str, str]:
    """Where a device gives its client id: Android's Private DNS host name and a DoH template (empty without
    tls.name)."""
    if not tls.name:
        return {}
    return {"private_dns": f"{client_id}.{tls.name}", "doh_template": f"https://{tls.name}{tls.doh_path}/{client_id}"}


def _entity(document: SiteDocument, target: Target) -> dict[str, Any]:
    kind, entity_id = target
    if kind == "site":
        return document
    collection = document.setdefault("groups" if kind == "group" else "devices", {})
    if entity_id not in collection:
        raise NotFound(f"site {document.get('id')} has no {kind} {entity_id!r}")
    return collection[entity_id]


class PolicyService:
    def __init__(self, store: Store, activity: Activity | None = None) -> None:
        self.store = store
        self.activity = activity  # what the site's devices did: deleted with the site

    async def _update(self, site_id: str, change: Any, create: bool = False) -> Site | None:
        def mutate(document: SiteDocument | None) -> SiteDocument | None:
            if document is None and not create:
                raise NotFound(f"no site {site_id!r}")
            return change(copy.deepcopy(document) if document is not None else {"id": site_id})

        return await self.store.update_site(site_id, mutate)

    # --- sites ----------------------------------------------------------------------------------------------

    async def get_site(self, site_id: str) -> tuple[SiteDocument, int]:
        found = await self.store.site_document(site_id)
        if found is None:
            raise NotFound(f"no site {site_id!r}")
        return found

    async def list_sites(self) -> list[str]:
        return await self.store.list_sites()

    async def put_site(self, site_id: str, document: SiteDocument) -> Site:
        """Create or replace a whole site (subscriber, groups and devices)."""
        site = await self._update(site_id, lambda _old: {**document, "id": site_id}, create=True)
        assert site is not None
        return site

    async def set_site_fields(self, site_id: str, fields: dict[str, Any], create: bool = True) -> Site:
        """Set some of a site's own fields (name, networks, cpe_ids, timezone, mode, default_group…)."""

        def change(document: SiteDocument) -> SiteDocument:
            document.update(fields)
            return document

        site = await self._update(site_id, change, create=create)
        assert site is not None
        return site

    async def delete_site(self, site_id: str) -> None:
        """Delete a site and what its devices did. The activity is forgotten before the site (a failure
        between leaves no activity of a site that is gone) and after (what was recorded meanwhile); the
        recorder forgets what it wrote for a site deleted while it wrote (admin/recorder.py)."""
        if self.activity is not None:
            await self.activity.forget_site(site_id, time.time())
        await self._update(site_id, lambda _old: None)
        if self.activity is not None:
            await self.activity.forget_site(site_id, time.time())

    # --- groups and devices -----------------------------------------------------------------------------------

    async def put_group(self, site_id: str, group_id: str, fields: dict[str, Any]) -> Site:
        def change(document: SiteDocument) -> SiteDocument:
            groups = document.setdefault("groups", {})
            groups[group_id] = {**groups.get(group_id, {}), **fields}
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    async def delete_group(self, site_id: str, group_id: str) -> Site:
        """Remove a group; its devices stay, in no group."""

        def change(document: SiteDocument) -> SiteDocument:
            _entity(document, ("group", group_id))
            del document["groups"][group_id]
            for device in document.get("devices", {}).values():
                if device.get("group") == group_id:
                    device["group"] = None
            if document.get("default_group") == group_id:
                document["default_group"] = None
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    async def put_device(self, site_id: str, device_id: str, fields: dict[str, Any]) -> Site:
        def change(document: SiteDocument) -> SiteDocument:
            devices = document.setdefault("devices", {})
            devices[device_id] = {**devices.get(device_id, {}), **fields}
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    async def delete_device(self, site_id: str, device_id: str) -> Site:
        def change(document: SiteDocument) -> SiteDocument:
            _entity(document, ("device", device_id))
            del document["devices"][device_id]
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    async def renew_client_id(self, site_id: str, device_id: str) -> tuple[Site, str]:
        """A new random client id for a device, replacing every client id it had (a leaked one stops working
        on every node at once); the site as written and the id."""
        client_id = new_client_id()

        def change(document: SiteDocument) -> SiteDocument:
            _entity(document, ("device", device_id))["client_ids"] = [client_id]
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site, client_id

    async def adopt_device(self, site_id: str, identity: dict[str, list[str]], fields: dict[str, Any]) -> Site:
        """Name or group a device found by one identity (`{"macs": [mac]}`, `{"client_ids": [...]}` or
        `{"addresses": [...]}`): the configured device that has it, else a new device with it, whose id is
        made from its name."""
        ((field, (value,)),) = identity.items()

        def change(document: SiteDocument) -> SiteDocument:
            devices = document.setdefault("devices", {})
            owner = next((key for key, device in devices.items() if value in (device.get(field) or ())), None)
            if owner is None:
                owner = _free_id(_slug(str(fields.get("name") or value)), devices)
                devices[owner] = {**identity}
            devices[owner].update(fields)
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    # --- policies and pauses ------------------------------------------------------------------------------------

    async def set_policy(self, site_id: str, target: Target, policy: dict[str, Any] | None) -> Site:
        """Set (or, with None, remove) the policy of the site, a group or a device."""

        def change(document: SiteDocument) -> SiteDocument:
            _entity(document, target)["policy"] = policy
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    async def pause(self, site_id: str, target: Target, until: str | float = "forever") -> Site:
        """Block everything for the target until a time (an RFC 3339 string or epoch seconds), or "forever".
        A time missing, unreadable or past is refused naming `until` (such a pause would do nothing)."""
        value = time_document(until) if isinstance(until, float | int) else until
        end = parse_time(value, "until")  # refuse a bad time before touching the document
        if end is None:
            raise PolicyError("until", 'missing: an RFC 3339 time, or "forever"')
        if end <= time.time():
            raise PolicyError("until", f"{value} has passed: a pause must end later than now")

        def change(document: SiteDocument) -> SiteDocument:
            _entity(document, target)["paused_until"] = value
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    async def unpause(self, site_id: str, target: Target) -> Site:
        def change(document: SiteDocument) -> SiteDocument:
            _entity(document, target)["paused_until"] = None
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    async def grant_pass(self, site_id: str, device_id: str, name: str, until: float, now: float) -> Site:
        """Let a device continue past Web Protect warnings for `name` until `until`. Passes that have ended
        are dropped; a pass already reaching further is kept as it is."""

        def change(document: SiteDocument) -> SiteDocument:
            device = _entity(document, ("device", device_id))
            passes = {
                other: end
                for other, end in (device.get("passes") or {}).items()
                if (parse_time(end, "passes") or 0) > now
            }
            current = parse_time(passes.get(name), "passes") or 0
            passes[name] = time_document(max(current, until))
            device["passes"] = passes
            return document

        site = await self._update(site_id, change)
        assert site is not None
        return site

    # --- profiles ---------------------------------------------------------------------------------------------

    async def set_profile(self, name: str, policy: dict[str, Any] | None) -> None:
        await self.store.set_profile(name, policy)


def _slug(text: str) -> str:
    """An id made of a name: lowercase letters, digits and dashes ("Anna's iPad" → "anna-s-ipad")."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:48] or "device"


def _free_id(wanted: str, taken: dict[str, Any]) -> str:
    candidate, number = wanted, 2
    while candidate in taken:
        candidate, number = f"{wanted}-{number}", number + 1
    return candidate


def describe(site: Site) -> SiteDocument:
    """A site as shown to users: its canonical document with its version."""
    return {**site_document(site), "version": site.version}
