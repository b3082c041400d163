"""Where policies live: the interface every policy store offers (Redis: redis_policies.py, the truth shared
by every node; the embedded file: file_policies.py, a single box), and what they have in common.

Every write is a read-modify-write of one site document: the new document is validated whole, its networks,
CPE ids and its devices' client ids are checked against other sites (each belongs to one site of the fleet: a
DoT or DoH client is found by its client id alone), and it is applied with its version, its indexes and its
change notice at once. A write that fails validation raises PolicyError and changes nothing.

Beside its document, every stored site has two things of the store's own, which no document carries (a
document naming them is refused: unknown field) and every write of the site keeps:

- its incarnation, random, made when the site comes into existence (by any write: a PUT, a PATCH that creates,
  an import) and gone with it, so that a site deleted and made again under the same id is another site. A site
  stored before incarnations existed gets one at its next write, or when a site token is made for it.
- the records of its live site tokens (admin/site_tokens.py): token id → when it expires. A token is good only
  while its record is there and it names the site's incarnation; revoking one removes its record.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blocklists.catalog import Catalog
from resolver.shared.config import LimitsSettings
from resolver.shared.policy.model import PolicyError, PolicySpec, Site, check_bounds, check_webhook_url, parse_site

log = logging.getLogger(__name__)

SiteDocument = dict[str, Any]
Mutation = Callable[[SiteDocument | None], SiteDocument | None]  # None in: no such site; None out: delete it
TokenRecords = dict[str, float]  # a site's live site tokens: id → when it expires


def new_incarnation() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Change:
    """A notice from the store: `site`/`profile` (key, version), `networks`, `records`, or `resync` (after a gap)."""

    kind: str
    key: str = ""
    version: int = 0


Apply = Callable[[Change], Awaitable[None]]


# The indexes of what no two sites may hold, each named as the Redis store names its hash.
NETWORKS, CPE_IDS, CLIENT_IDS = "net", "cpe", "clientid"


def taken(kind: str, value: str, owner: str) -> str:
    """Why a write cannot claim `value`: another site has it. A client id is a device's credential, so whose
    it is stays unsaid (a subscriber guessing ids must learn nothing, not even that a site exists)."""
    if kind == CLIENT_IDS:
        return "is another device's client id: make one with the client-id route or command"
    return f"{value} already belongs to site {owner}"


def owned(site: Site) -> list[tuple[str, str, str]]:
    """(index, field, value) of what no other site may hold: its networks, CPE ids and its devices' client ids."""
    found = [(NETWORKS, f"networks[{index}]", network) for index, network in enumerate(site.networks)]
    found += [(CPE_IDS, f"cpe_ids[{index}]", cpe) for index, cpe in enumerate(site.cpe_ids)]
    found += [
        (CLIENT_IDS, f"devices.{device.id}.client_ids[{index}]", client_id)
        for device in site.devices.values()
        for index, client_id in enumerate(device.client_ids)
    ]
    return found


def lookup_candidates(address: str, lengths: dict[int, list[int]]) -> list[str]:
    """Networks of every prefix length in use that could contain `address`, longest first."""
    ip = ipaddress.ip_address(address)
    return [
        ipaddress.ip_network(f"{ip}/{length}", strict=False).compressed
        for length in sorted(lengths.get(ip.version, ()), reverse=True)
    ]


class Store(ABC):
    """The operations the workers (reads, change notices) and the policy service (writes) need."""

    def __init__(
        self, catalog: Catalog, limits: LimitsSettings | None = None, webhook_allow: tuple[str, ...] = ()
    ) -> None:
        self.webhook_allow = webhook_allow  # admin.webhook_allow: where a webhook written here may point
        self.catalog = catalog
        self.limits = limits or LimitsSettings()  # what a write may store in a site document

    # reads
    @abstractmethod
    async def load_site(self, site_id: str) -> Site | None: ...

    @abstractmethod
    async def site_document(self, site_id: str) -> tuple[SiteDocument, int] | None: ...

    @abstractmethod
    async def find_site(self, address: str, cpe_id: str | None) -> str | None: ...

    async def locate(self, address: str, cpe_id: str | None) -> tuple[str, int] | None:
        """The site a client belongs to (by CPE id, else by address) and its version, without the document:
        a worker that holds that version already need not fetch and parse it again (a site of thousands of
        devices is a large document)."""
        site_id = await self.find_site(address, cpe_id)
        if site_id is None:
            return None
        return site_id, (await self.site_versions([site_id]))[site_id]

    @abstractmethod
    async def find_client_id(self, client_id: str) -> str | None:
        """The site with a device of this client id."""

    async def locate_client_id(self, client_id: str) -> tuple[str, int] | None:
        """`locate` for a client id: its site, fleet-wide, and the site's version."""
        site_id = await self.find_client_id(client_id)
        if site_id is None:
            return None
        return site_id, (await self.site_versions([site_id]))[site_id]

    @abstractmethod
    async def site_networks(self) -> list[str]:
        """The networks of every site: their sources are answered (server.allow)."""

    @abstractmethod
    async def site_versions(self, site_ids: list[str]) -> dict[str, int]: ...

    @abstractmethod
    async def list_sites(self) -> list[str]: ...

    @abstractmethod
    async def check(self) -> None:
        """Raises StoreUnavailable unless the store answers (cheaply: health checks call it often)."""

    @abstractmethod
    async def load_profiles(self) -> dict[str, PolicySpec]: ...

    @abstractmethod
    def watch(self, apply: Apply) -> None:
        """Have `apply` hear every change from now on: `site`, `profile`, `networks`, `records`, and `up`, `down`,
        `resync` (notices may have been missed). They come while the backends follow (backends.py)."""

    @abstractmethod
    async def site_tokens(self, site_id: str) -> tuple[str, TokenRecords] | None:
        """The site's incarnation and its token records, in one read (every request a site token makes asks).
        None: no such site; an incarnation of "": a site stored before incarnations, which no token names."""

    # writes
    @abstractmethod
    async def update_site(self, site_id: str, mutate: Mutation) -> Site | None: ...

    @abstractmethod
    async def change_site_tokens(self, site_id: str, change: Callable[[TokenRecords], TokenRecords]) -> str:
        """Replace the site's token records with `change(records)`, atomically, and return its incarnation
        (made now if it has none yet). Raises NotFound when there is no such site."""

    @abstractmethod
    async def set_profile(self, name: str, document: dict[str, Any] | None) -> None: ...

    @abstractmethod
    async def load_records(self) -> tuple[str, ...]:
        """The operator's records written through the API, answered by every worker beside local.records."""

    @abstractmethod
    async def set_records(self, lines: Any) -> tuple[str, ...]:
        """Replace the operator's records (PolicyError names the line at fault) and announce them."""

    @abstractmethod
    async def import_sites(self, documents: list[SiteDocument]) -> int:
        """Create or replace many sites. Every document is validated, and its networks and CPE ids checked
        against the others and the store, before anything is written: a bad import writes nothing."""

    def _validated_import(self, documents: list[SiteDocument]) -> list[Site]:
        sites = []
        owners: dict[tuple[str, str], str] = {}
        for index, document in enumerate(documents):
            if not isinstance(document, dict) or not isinstance(document.get("id"), str):
                raise PolicyError(f"sites[{index}].id", "missing or not a string")
            try:
                site = self._validated(document["id"], document, 0, None)
            except PolicyError as exc:
                raise PolicyError(f"sites[{index}]" + (f".{exc.field}" if exc.field else ""), exc.reason) from None
            assert site is not None
            for kind, field, value in owned(site):
                owner = owners.setdefault((kind, value), site.id)
                if owner != site.id:
                    raise PolicyError(f"sites[{index}].{field}", f"{value} is also in site {owner}")
            sites.append(site)
        return sites

    async def close(self) -> None:
        return None

    def _validated(
        self, site_id: str, document: SiteDocument | None, version: int, before: SiteDocument | None
    ) -> Site | None:
        """The site a write stores, validated whole and within `limits`, refused with the field at fault;
        `before`: the document until now. A webhook is checked only when its URL is new, so a site whose
        webhook admin.webhook_allow no longer admits can still be paused; its alerts are refused when sent."""
        if document is None:
            return None
        if document.get("id", site_id) != site_id:
            raise PolicyError("id", f"{document.get('id')!r} does not match the site being written ({site_id!r})")
        site = parse_site({**document, "id": site_id}, self.catalog, version)
        check_bounds(site, before, self.limits)
        if site.webhook is not None and site.webhook.url != ((before or {}).get("webhook") or {}).get("url"):
            check_webhook_url(site.webhook.url, self.webhook_allow)
        return site


# --- Redis -------------------------------------------------------------------------------------------------


# --- the embedded file -------------------------------------------------------------------------------------
