"""The policy store of a single box: every site and profile in one JSON file, rewritten atomically under a lock file;
readers notice changes by polling."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from blocklists.artifact import write_atomically
from blocklists.catalog import Catalog
from resolver.shared.config import LimitsSettings
from resolver.shared.errors import NotFound, StoreUnavailable
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

_PRIVATE = 0o600  # the file holds webhook secrets: its owner (the user bns runs as) alone reads it


class FileStore(Store):
    """All sites and profiles in one JSON file: `{"format": 1, "sites": {id: {"doc", "version", "incarnation",
    "tokens"}}, "profiles": {name: {"doc", "version"}}}` (policies.py says what a site's incarnation and tokens
    are). For one box; every reader holds the whole file in memory. Every write makes the file anew, readable
    by its owner only (0600), as is its lock file."""

    def __init__(
        self,
        path: Path,
        catalog: Catalog,
        poll_interval: float = 0.25,
        limits: LimitsSettings | None = None,
        webhook_allow: tuple[str, ...] = (),
    ) -> None:
        super().__init__(catalog, limits, webhook_allow)
        self.path = Path(path)
        self._interval = poll_interval
        self._identity: tuple[int, int, int] | None = None
        self._data: dict[str, Any] = {"format": 1, "sites": {}, "profiles": {}}
        self._networks: dict[int, dict[int, dict[str, str]]] = {}
        self._cpes: dict[str, str] = {}
        self._client_ids: dict[str, str] = {}
        self._apply: Apply | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns

    def _read_file(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": 1, "sites": {}, "profiles": {}, "records": {"doc": [], "version": 0}}
        except (OSError, ValueError) as exc:
            raise StoreUnavailable(f"{self.path}: cannot read the policy file: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != 1:
            raise StoreUnavailable(f"{self.path}: not a bns policy file (format 1)")
        data.setdefault("sites", {})
        data.setdefault("profiles", {})
        data.setdefault("records", {"doc": [], "version": 0})
        return data

    def refresh(self) -> bool:
        """Read the file again if it changed; True when it did."""
        identity = self._stat()
        if identity == self._identity and identity is not None:
            return False
        self._data = self._read_file()
        self._identity = identity
        self._networks, self._cpes, self._client_ids = {}, {}, {}
        for site_id, entry in self._data["sites"].items():
            for network in entry["doc"].get("networks", []):
                parsed = ipaddress.ip_network(network)
                self._networks.setdefault(parsed.version, {}).setdefault(parsed.prefixlen, {})[network] = site_id
            for cpe in entry["doc"].get("cpe_ids", []):
                self._cpes[cpe] = site_id
            for device in (entry["doc"].get("devices") or {}).values():
                for client_id in device.get("client_ids") or ():
                    self._client_ids[client_id] = site_id
        return True

    async def site_document(self, site_id: str) -> tuple[SiteDocument, int] | None:
        self.refresh()
        entry = self._data["sites"].get(site_id)
        return (entry["doc"], entry["version"]) if entry else None

    async def load_site(self, site_id: str) -> Site | None:
        found = await self.site_document(site_id)
        return parse_site(found[0], self.catalog, found[1]) if found else None

    async def find_site(self, address: str, cpe_id: str | None) -> str | None:
        self.refresh()
        if cpe_id is not None and cpe_id in self._cpes:
            return self._cpes[cpe_id]
        lengths = {family: list(by_length) for family, by_length in self._networks.items()}
        ip_version = ipaddress.ip_address(address).version
        for candidate in lookup_candidates(address, lengths):
            length = int(candidate.rsplit("/", 1)[1])
            site_id = self._networks[ip_version][length].get(candidate)
            if site_id is not None:
                return site_id
        return None

    async def find_client_id(self, client_id: str) -> str | None:
        self.refresh()
        return self._client_ids.get(client_id)

    async def site_networks(self) -> list[str]:
        self.refresh()
        return [network for by_length in self._networks.values() for held in by_length.values() for network in held]

    async def site_versions(self, site_ids: list[str]) -> dict[str, int]:
        self.refresh()
        return {site_id: self._data["sites"].get(site_id, {}).get("version", 0) for site_id in site_ids}

    async def list_sites(self) -> list[str]:
        self.refresh()
        return sorted(self._data["sites"])

    async def check(self) -> None:
        self.refresh()

    async def site_tokens(self, site_id: str) -> tuple[str, TokenRecords] | None:
        self.refresh()
        entry = self._data["sites"].get(site_id)
        return (entry.get("incarnation", ""), dict(entry.get("tokens", {}))) if entry else None

    async def load_profiles(self) -> dict[str, PolicySpec]:
        self.refresh()
        return {name: parse_profile(name, entry["doc"], self.catalog) for name, entry in self._data["profiles"].items()}

    def watch(self, apply: Apply) -> None:
        self._apply = apply

    async def poll(self) -> None:
        """Until cancelled: the changes seen by polling the file, to whoever watches (nobody: no polling)."""
        apply = self._apply
        if apply is None:
            return
        async for change in self._changes():
            await apply(change)

    async def _changes(self) -> AsyncIterator[Change]:
        """Writes between two polls come as one notice with the latest version."""
        try:
            self.refresh()  # the baseline: what the file holds now is not a change
        except StoreUnavailable as exc:
            yield Change("down", str(exc))
        yield Change("up")
        while True:
            await asyncio.sleep(self._interval)
            before_sites = {k: v["version"] for k, v in self._data["sites"].items()}
            before_profiles = {k: v["version"] for k, v in self._data["profiles"].items()}
            before_records = self._data["records"]["version"]
            before_networks = (self._networks, self._cpes, self._client_ids)
            try:
                changed = self.refresh()
            except StoreUnavailable as exc:
                yield Change("down", str(exc))
                continue
            if not changed:
                continue
            after_sites = {k: v["version"] for k, v in self._data["sites"].items()}
            for site_id in before_sites.keys() | after_sites.keys():
                before, after = before_sites.get(site_id, 0), after_sites.get(site_id, 0)
                if before != after:
                    if 0 < after < before:  # deleted and made again between two polls: say both
                        yield Change("site", site_id, 0)
                    yield Change("site", site_id, after)
            for name in before_profiles.keys() | self._data["profiles"].keys():
                if before_profiles.get(name) != self._data["profiles"].get(name, {}).get("version"):
                    yield Change("profile", name, 1)
            if before_records != self._data["records"]["version"]:
                yield Change("records", "-", 1)
            if before_networks != (self._networks, self._cpes, self._client_ids):
                yield Change("networks")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(
            os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, _PRIVATE), "w"
        ) as lock:
            os.fchmod(lock.fileno(), _PRIVATE)  # one made before bns made it private
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._identity = None  # read the file again under the lock
            self.refresh()
            yield
            write_atomically(self.path, [json.dumps(self._data, indent=1, sort_keys=True).encode()], _PRIVATE)
            self._identity = None

    async def update_site(self, site_id: str, mutate: Mutation) -> Site | None:
        with self._locked():
            entry = self._data["sites"].get(site_id)
            old = entry["doc"] if entry else None
            version = (entry["version"] if entry else 0) + 1
            site = self._validated(site_id, mutate(old), version, old)
            if site is None:
                self._data["sites"].pop(site_id, None)
                return None
            self._check_owners(site)
            self._put(site, version)
            return site

    def _check_owners(self, site: Site, prefix: str = "") -> None:
        """PolicyError naming the field of a network, CPE id or client id of `site` that another site holds."""
        for kind, field, value in owned(site):
            if kind == NETWORKS:
                owner = self._owner_of_network(value)
            else:
                owner = (self._cpes if kind == CPE_IDS else self._client_ids).get(value)
            if owner not in (None, site.id):
                raise PolicyError(prefix + field, taken(kind, value, owner))

    async def change_site_tokens(self, site_id: str, change: Callable[[TokenRecords], TokenRecords]) -> str:
        with self._locked():
            entry = self._data["sites"].get(site_id)
            if entry is None:
                raise NotFound(f"no site {site_id!r}")
            entry["tokens"] = change(dict(entry.get("tokens", {})))
            return entry.setdefault("incarnation", new_incarnation())

    def _put(self, site: Site, version: int) -> None:
        """The site's new document and version. Its incarnation is kept (a new site's is made here, as is the
        first of a site stored before incarnations), and so are its token records."""
        entry = self._data["sites"].setdefault(site.id, {})
        entry.update(doc=site_document(site), version=version)
        entry.setdefault("incarnation", new_incarnation())

    async def import_sites(self, documents: list[SiteDocument]) -> int:
        sites = self._validated_import(documents)
        with self._locked():
            for index, site in enumerate(sites):
                self._check_owners(site, f"sites[{index}].")
            for site in sites:
                self._put(site, self._data["sites"].get(site.id, {}).get("version", 0) + 1)
        return len(sites)

    def _owner_of_network(self, network: str) -> str | None:
        parsed = ipaddress.ip_network(network)
        return self._networks.get(parsed.version, {}).get(parsed.prefixlen, {}).get(network)

    async def load_records(self) -> tuple[str, ...]:
        self.refresh()
        return tuple(self._data["records"]["doc"])

    async def set_records(self, lines: Any) -> tuple[str, ...]:
        records = parse_shared_records(lines)
        with self._locked():
            self._data["records"] = {"doc": list(records), "version": self._data["records"]["version"] + 1}
        return records

    async def set_profile(self, name: str, document: dict[str, Any] | None) -> None:
        if document is not None:
            parse_profile(name, document, self.catalog)
        with self._locked():
            if document is None:
                self._data["profiles"].pop(name, None)
            else:
                version = self._data["profiles"].get(name, {}).get("version", 0) + 1
                self._data["profiles"][name] = {"doc": document, "version": version}
