"""Each worker's hot copy of the policies it uses: who a query is from, and what applies to them now.

- Clients (one per source address, or per source and identity options from a trusted network) are kept,
  bounded, with their effective policy, made again only at the next schedule boundary or change. A warm
  query costs a dict lookup, a flag and a comparison with the clock: no store round trip. Eviction is
  CLOCK (second chance) rather than strict LRU: a hit only marks the client used instead of relinking it.
- A client not seen before is resolved from the store (its site by CPE id or address, then the device in
  the site by MAC, client id or address) in one task per client however many queries arrive (single
  flight), and one store round trip (batched with the other new clients of the moment); the query waits at
  most `store.cold_wait`.
- Sites are kept in a bounded LRU too, apart from the clients, with an index of their networks and CPE ids.
  A change notice reloads a site that is held, and rebinds its clients in place; after the notices were
  interrupted, every held site's version is checked (resync).
- A query the store cannot answer in time (slow, down, restarted) fails to the best this worker knows, never
  to the world: the client's site if the worker holds it (found by CPE id or network: a paused site stays
  paused, a new device gets the site's default group), else the global default. `store.cold_policy =
  "servfail"` refuses such queries instead. The resolution goes on meanwhile and binds the client when it
  completes. While the store is down, everything held keeps being served; the outage is logged once with
  its cause, and its end.
- The networks of every site are loaded whole (at start, after a `networks` notice, at a resync) and handed
  to `on_site_networks`: their sources are answered (access.py, server.allow).
- A DoT or DoH client whose client id (the DoH path, the TLS server name) names a device is keyed by the id
  alone, wherever it asks from, and found fleet-wide: the store's index of client ids names its site, where
  the device with that id is its device. An id that names none (unknown, or malformed) is as good as none: the query is
  its address's, as on port 53, never a looser policy's.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any

from blocklists.catalog import Catalog
from resolver.shared.config import StoreSettings
from resolver.shared.errors import StoreUnavailable
from resolver.shared.identity import (
    Claim,
    Identity,
    NetworkSet,
    confine,
    identity_from,
    in_networks,
    in_site_networks,
)
from resolver.shared.logs import Throttled
from resolver.shared.policy.decision import Policy, Verdict
from resolver.shared.policy.effective import Governing, PolicyMaker, find_device, governing, guest_profile
from resolver.shared.policy.model import Device, PolicyError, PolicySpec, Site, parse_shared_records
from resolver.shared.store.policies import Change, Store, lookup_candidates
from resolver.worker.local_zones import NameRecords, site_names
from resolver.worker.wire import Query, Request

log = logging.getLogger(__name__)
_failures = Throttled(log)
_claims = Throttled(log)

_UNKNOWN = None  # the site id under which clients of no known site are filed
_SOMEBODY_ELSES = ""  # no site's id: an address this worker cannot tell is not another site's
_RETRY_AFTER_FAILURE = 1.0  # while the store is down, new clients skip it for this long after a failure
_SECOND_CHANCES = 8  # used clients passed to the back per insert, at most: an insert never sweeps the table
# Notices for one site within this many seconds are one reload: a burst of writes to a site costs its
# workers a few reloads, not one each, and a change is still served well within a second.
_RELOAD_DELAY = 0.05
# A site reloaded in t seconds (parsing its whole document holds up the queries of every site meanwhile) is
# not reloaded again for this many t, at most _MOST_SPACING: a stream of writes to one site, however fast,
# then takes about 0.5 % of a worker's time (a site of limits.document_bytes takes about 5 ms), and its
# latest change still arrives within about a second (t is the worker's CPU time, which counts the queries
# it answered during the store's round trip too). A site written once in a while is reloaded at its first
# notice.
_RELOAD_SPACING = 200
_MOST_SPACING = 1.0


class Client:
    """One client as this worker knows it: who it is, which site, and its policy until `until`."""

    __slots__ = (
        "_maker",
        "blocks",
        "device",
        "device_key",
        "identity",
        "logged",
        "names",
        "policy",
        "queries",
        "rule",
        "site",
        "until",
        "used",
    )

    def __init__(
        self, identity: Identity, site: Site | None, rule: Governing, maker: PolicyMaker, device: Device | None = None
    ) -> None:
        self.identity = identity
        self.site = site
        self.device = device  # the site's device it is, if the site knows it (a warning page address of its own)
        self.rule = rule
        self._maker = maker
        self.policy: Policy = maker.default
        self.until = -math.inf  # made on first use
        self.used = False  # asked since eviction last passed it over
        # activity (worker/activity.py): queries and blocked answers since the last collection
        self.device_key = _device_key(identity, device)
        self.queries = 0
        self.blocks: dict[Query | None, dict[Verdict, int]] | None = None
        self.logged = site is not None and site.query_log  # the site opted in to the query log
        self.names: dict[bytes, NameRecords] | None = site_names(site)  # its site's own names (records)

    def refresh(self, now: float) -> Policy:
        self.policy, self.until = self._maker.effective(self.rule, now)
        return self.policy


def _device_key(identity: Identity, device: Device | None) -> str:
    """The key of a client's seen-devices record: the identity its site's device was found by (find_device: a
    DoT or DoH credential, its device's own key; else MAC, client id, address), so that the record joins the
    configured device; else the identity's own."""
    if device is not None and identity.credential is not None:
        return "device:" + device.id
    if device is None or (identity.mac is not None and identity.mac in device.macs):
        return identity.key
    if identity.client_id is not None and identity.client_id in device.client_ids:
        return "id:" + identity.client_id
    return "ip:" + identity.address


def id_key(client_id: str) -> str:
    """The key of a client known by the client id it gave: a digest, since keys reach logs and alerts and the id
    is a credential; no address is spelt so."""
    return "id#" + hashlib.blake2b(client_id.encode(), digest_size=8).hexdigest()


class Nobody:
    """What a client id names when no device has it (`NOBODY`): the query is its address's, as on port 53."""


NOBODY = Nobody()
_UNKNOWN_IDS = 10_000  # ids known to name no device, remembered per worker (forgotten all at once when full)


class SiteIndex:
    """The held sites' CPE ids, client ids and networks, to find a client's site without the store."""

    def __init__(self) -> None:
        self._cpes: dict[str, str] = {}
        self._client_ids: dict[str, str] = {}
        self._networks: dict[str, str] = {}  # CIDR → site id
        self._lengths: dict[int, dict[int, int]] = {}  # IP version → prefix length → networks of it held

    def add(self, site: Site) -> None:
        for cpe in site.cpe_ids:
            self._cpes[cpe] = site.id
        for client_id in site.by_client_id:
            self._client_ids[client_id] = site.id
        for network in site.networks:
            if self._networks.setdefault(network, site.id) == site.id:
                parsed = ipaddress.ip_network(network)
                by_length = self._lengths.setdefault(parsed.version, {})
                by_length[parsed.prefixlen] = by_length.get(parsed.prefixlen, 0) + 1

    def remove(self, site: Site) -> None:
        for cpe in site.cpe_ids:
            if self._cpes.get(cpe) == site.id:
                del self._cpes[cpe]
        for client_id in site.by_client_id:
            if self._client_ids.get(client_id) == site.id:
                del self._client_ids[client_id]
        for network in site.networks:
            if self._networks.get(network) == site.id:
                del self._networks[network]
                parsed = ipaddress.ip_network(network)
                by_length = self._lengths[parsed.version]
                by_length[parsed.prefixlen] -= 1
                if not by_length[parsed.prefixlen]:
                    del by_length[parsed.prefixlen]

    def find_client_id(self, client_id: str) -> str | None:
        """The held site with a device of this client id."""
        return self._client_ids.get(client_id)

    def find(self, identity: Identity) -> str | None:
        """The held site of a CPE id, else of the longest held network holding the address."""
        if identity.cpe_id is not None and identity.cpe_id in self._cpes:
            return self._cpes[identity.cpe_id]
        lengths = {version: list(by_length) for version, by_length in self._lengths.items()}
        for candidate in lookup_candidates(identity.address, lengths):
            if candidate in self._networks:
                return self._networks[candidate]
        return None


class Directory:
    def __init__(
        self,
        store: Store | None,
        maker: PolicyMaker,
        catalog: Catalog,
        trusted: NetworkSet,
        settings: StoreSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        if store is not None:
            store.watch(self._hear)
        self.maker = maker
        self.trusted = trusted
        self._settings = settings
        self._clock = clock
        self.catalog = catalog
        self.profiles: dict[str, PolicySpec] = {"guest": guest_profile(catalog)}
        self._builtin_profiles = dict(self.profiles)
        self.default_client = Client(Identity(""), None, governing(None, None, self.profiles), maker)
        self.default_client.until = math.inf
        self._clients: OrderedDict[Hashable, Client] = OrderedDict()
        self._site_clients: dict[str | None, set[Hashable]] = {}
        self._sites: OrderedDict[str, Site] = OrderedDict()
        self._index = SiteIndex()
        self._site_of: dict[tuple[str, str | None], str | None] = {}
        self._stand_ins: dict[Hashable, Client] = {}  # the best-known clients given while the store lags
        self._resolving: dict[Hashable, asyncio.Future[Client]] = {}
        self._resolving_ids: dict[Hashable, asyncio.Future[Client | Nobody]] = {}
        self._loading: dict[str, asyncio.Future[Site | None]] = {}
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._needs_resync = False
        self._due: dict[str, None] = {}  # sites with newer versions announced, to reload, oldest notice first
        self._reloader: asyncio.Task[None] | None = None
        self._spaced: dict[str, float] = {}  # site → when it may be reloaded again (time.monotonic)
        self._spacing_timer: asyncio.TimerHandle | None = None
        self.on_site_networks: Callable[[Iterable[str]], None] | None = None
        self.on_records: Callable[[tuple[str, ...]], None] | None = None  # the operator's records from the API
        self._records: tuple[str, ...] = ()
        self._bad_records = False  # said once, until good ones are read
        self._networks_loader: asyncio.Task[None] | None = None
        self._networks_due = False
        self.refused_claims: dict[str, int] = {}  # a router's claims about another site, by kind (Claim)
        # client ids given over DoT and DoH, as resolved: naming a device, or not (metrics)
        self.client_ids: dict[str, int] = {"known": 0, "unknown": 0}
        self._unknown_ids: set[str] = set()  # DoT/DoH client ids the store said no device has
        self._site_networks: NetworkSet | None = None  # every site's networks, once loaded

    def __len__(self) -> int:
        return len(self._clients)

    def use_maker(self, maker: PolicyMaker) -> None:
        """A new global default policy (SIGHUP): every client's policy is made again."""
        self.maker = maker
        self.default_client = Client(Identity(""), None, governing(None, None, self.profiles), maker)
        self.default_client.until = math.inf
        self._rebind_all()

    def use_settings(self, settings: StoreSettings) -> None:
        self._settings = settings

    # --- the query path ----------------------------------------------------------------------------------

    def key(self, request: Request) -> Hashable:
        if request.client_id is not None:
            return id_key(request.client_id)
        source = request.client[0]
        identity = request.identity
        if identity is not None and self.trusted[source]:
            return source, identity
        return source

    def client(self, request: Request) -> Client | None:
        """The client a query is from, if this worker knows it; None means: call `resolve`."""
        if self.store is None:
            return self.default_client
        # `key`, written out: one call less per query.
        source = request.client[0]
        identity = request.identity
        client = self._clients.get((source, identity) if identity is not None and self.trusted[source] else source)
        if client is not None:
            client.used = True
        return client

    def client_by_id(self, client_id: str) -> Client | Nobody | None:
        """The device a DoT or DoH client id names, if this worker knows it; NOBODY for an id known to name no
        device; None means: call `resolve_id`."""
        if self.store is None:
            return NOBODY
        client = self._clients.get(id_key(client_id))
        if client is not None:
            client.used = True
            return client
        return NOBODY if client_id in self._unknown_ids else None

    async def resolve_id(self, request: Request, client_id: str) -> Client | Nobody | None:
        """The device of a client id not seen before (one store call, batched; single flight per id), NOBODY
        when no device has it. While the store cannot say within `cold_wait`, the held sites decide, and an
        id none of them has counts as nobody's for now (the query is its address's, never a looser policy's)."""
        key = id_key(client_id)
        pending = self._resolving_ids.get(key)
        if pending is None:
            if self.down_since is not None and self._clock() < self._retry_at:
                return self._held_device(key, request, client_id)
            pending = self._resolving_ids[key] = asyncio.ensure_future(self._build_id(key, request, client_id))
            pending.add_done_callback(lambda done: self._forget_resolution(self._resolving_ids, key, done))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self._settings.cold_wait)
        except Exception:  # slow, down, or failing: logged once by _mark_down or _forget_resolution
            return self._held_device(key, request, client_id)

    async def _build_id(self, key: Hashable, request: Request, client_id: str) -> Client | Nobody:
        try:
            site = await self._site_of_client_id(client_id)
        except StoreUnavailable as exc:
            self._mark_down(str(exc))
            raise
        self._mark_up()
        if site is None:
            self.client_ids["unknown"] += 1
            if len(self._unknown_ids) >= _UNKNOWN_IDS:
                self._unknown_ids.clear()
            self._unknown_ids.add(client_id)
            return NOBODY
        self.client_ids["known"] += 1
        return self._bind(key, Identity(request.client[0], credential=client_id), site)

    def _held_device(self, key: Hashable, request: Request, client_id: str) -> Client | Nobody:
        """`_build_id` as far as the sites this worker holds can tell."""
        site = self._held(self._index.find_client_id(client_id))
        if site is None:
            return NOBODY
        return self._bind(key, Identity(request.client[0], credential=client_id), site)

    async def resolve(self, request: Request) -> Client | None:
        """The client of a query not seen before. If the store cannot say within `cold_wait`, the best this
        worker knows (see the module's docstring), or None with `cold_policy = "servfail"`."""
        key = self.key(request)
        pending = self._resolving.get(key)
        if pending is None:
            if self.down_since is not None and self._clock() < self._retry_at:
                return self._from_memory(key, request) or self._stand_in(key, request)
            pending = self._resolving[key] = asyncio.ensure_future(self._build(key, request))
            pending.add_done_callback(lambda done: self._forget_resolution(self._resolving, key, done))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self._settings.cold_wait)
        except Exception:  # slow, down, or failing: logged once by _mark_down or _forget_resolution
            return self._stand_in(key, request)

    def _from_memory(self, key: Hashable, request: Request) -> Client | None:
        """The client, bound as the store would bind it, when this worker knows its address's site and holds
        it (a new device behind a known router); None when that needs the store."""
        identity = self._identity(key, request)
        if identity.router is not None:
            router = (identity.router, None)
            if router not in self._site_of:
                return None  # whether the router may speak for the site it names takes the store
            own = self._held(self._site_of[router])
            if own is not None:
                if not in_networks(own, identity.address) and (identity.address, None) not in self._site_of:
                    return None  # whose address it claims takes the store
                believed = self._confined(identity, own, self._address_site_in_memory(own, identity))
                return self._bind(key, believed, own)
            if self._site_of[router] is not None:
                return None  # the router's own site, not held here
        site = self._held(self._site_of.get((identity.address, identity.cpe_id)))
        return self._bind(key, identity, site) if site is not None else None

    def _held(self, site_id: str | None) -> Site | None:
        return self._sites.get(site_id) if site_id is not None else None

    def _stand_in(self, key: Hashable, request: Request) -> Client | None:
        """The client as far as this worker can tell without the store: its held site, else nobody's."""
        if self._settings.cold_policy == "servfail":
            return None
        client = self._stand_ins.get(key)
        if client is None:
            identity, site = self._held_site(self._identity(key, request))
            if site is None:
                return self.default_client
            if len(self._stand_ins) >= self._settings.client_cache:
                self._stand_ins.clear()
            device = find_device(site, identity)
            client = self._stand_ins[key] = Client(
                identity, site, governing(site, device, self.profiles), self.maker, device
            )
        return client

    @staticmethod
    def _forget_resolution(resolving: dict[Hashable, Any], key: Hashable, done: asyncio.Future[Any]) -> None:
        resolving.pop(key, None)
        if not done.cancelled() and not isinstance(done.exception(), StoreUnavailable | None):
            _failures.exception("resolving a client failed", done.exception() or True)

    @staticmethod
    def _identity(key: Hashable, request: Request) -> Identity:
        source = request.client[0]
        return identity_from(source, request.options) if isinstance(key, tuple) else Identity(source)

    async def _build(self, key: Hashable, request: Request) -> Client:
        identity = self._identity(key, request)
        try:
            identity, site = await self._site_of_identity(identity)
        except StoreUnavailable as exc:
            self._mark_down(str(exc))
            raise
        self._mark_up()
        return self._bind(key, identity, site)

    async def _site_of_client_id(self, client_id: str) -> Site | None:
        """The site with a device of this client id, fleet-wide: one store call (batched), and the site loaded
        unless held at its version. None when no site has it."""
        assert self.store is not None
        site = await self._site_located(await self.store.locate_client_id(client_id))
        return site if site is not None and client_id in site.by_client_id else None

    async def _site_of_identity(self, identity: Identity) -> tuple[Identity, Site | None]:
        """The site of a client, and its identity as believed: a router's claims only within the router's own
        site, when it has one (identity.confine). The router's site and the claimed address's are asked
        together (one store round trip, batched)."""
        if identity.router is not None:
            own: Site | None
            address_site: str | None = None
            if identity.address == identity.router:
                own = await self._site_at(identity.router, None)
            else:
                # Starred, gather is typed as the list it returns (a tuple type fails when compiled).
                lookups: list[Awaitable[Any]] = [
                    self._site_at(identity.router, None),
                    self._site_id_at(identity.address),
                ]
                found = await asyncio.gather(*lookups)
                own, address_site = found[0], found[1]
            if own is not None:
                return self._confined(identity, own, address_site), own
        return identity, await self._site_at(identity.address, identity.cpe_id)

    def _held_site(self, identity: Identity) -> tuple[Identity, Site | None]:
        """`_site_of_identity` as far as this worker can tell without the store. A router whose own site it
        cannot tell (it might be a neighbour's router) has its address and CPE id claims set aside."""
        if identity.router is not None:
            known, own = self._router_site_in_memory(identity.router)
            if not known:
                return Identity(identity.router, identity.mac, identity.client_id, None, identity.router), None
            if own is not None:
                return self._confined(identity, own, self._address_site_in_memory(own, identity)), own
        return identity, self._held(self._index.find(identity))

    def _address_site_in_memory(self, own: Site, identity: Identity) -> str | None:
        """The site whose networks hold the address a router of `own` claims, as far as this worker knows it
        without the store; one it cannot tell counts as another site's (the claim is set aside)."""
        if in_networks(own, identity.address):
            return own.id
        lookup = (identity.address, None)
        if lookup in self._site_of:
            return self._site_of[lookup]
        if self._site_networks is not None and not self._site_networks[identity.address]:
            return None  # a LAN address: no site's
        return _SOMEBODY_ELSES

    def _router_site_in_memory(self, router: str) -> tuple[bool, Site | None]:
        """Whether this worker can tell, without the store, which site's networks hold a router's address, and
        that site (None: no site's, so the router is an edge speaking for any)."""
        lookup = (router, None)
        if lookup in self._site_of:
            site_id = self._site_of[lookup]
            held = self._held(site_id)
            return site_id is None or held is not None, held
        held = self._held(self._index.find(Identity(router)))
        if held is not None:
            return True, held
        return self._site_networks is not None and not self._site_networks[router], None

    def _confined(self, identity: Identity, own: Site, address_site: str | None) -> Identity:
        believed, refused = confine(identity, own, address_site)
        for claim in refused:
            self.refused_claims[claim] = self.refused_claims.get(claim, 0) + 1
            _claims.warning(
                "router %s of site %s claimed %s %s, not its own: ignored",
                identity.router,
                own.id,
                "the address" if claim is Claim.ADDRESS else "the CPE id",
                identity.address if claim is Claim.ADDRESS else identity.cpe_id,
            )
        return believed

    async def _site_at(self, address: str, cpe_id: str | None) -> Site | None:
        """The site of an address (or CPE id): from memory when this worker knows it and holds the site; else
        one store call."""
        lookup = (address, cpe_id)
        if lookup in self._site_of:
            site_id = self._site_of[lookup]
            if site_id is None:
                return None
            site = self._sites.get(site_id)
            if site is not None:
                self._sites.move_to_end(site_id)
                return site
        return await self._site_located(await self._locate(lookup))

    async def _site_located(self, located: tuple[str, int] | None) -> Site | None:
        """The site the store located (its id and version): the one held if it is as new, else loaded."""
        if located is None:
            return None
        site_id, version = located
        held = self._sites.get(site_id)
        if held is not None and held.version >= version:
            self._sites.move_to_end(site_id)
            return held  # the site of thousands of devices is fetched and parsed once, not per device
        site = await self._load(site_id)
        if site is not None:
            self._hold_site(site)
        return site

    async def _site_id_at(self, address: str) -> str | None:
        """The id of the site whose networks hold `address`, without loading the site."""
        lookup = (address, None)
        if lookup in self._site_of:
            return self._site_of[lookup]
        located = await self._locate(lookup)
        return located[0] if located is not None else None

    async def _locate(self, lookup: tuple[str, str | None]) -> tuple[str, int] | None:
        """The store's answer for an (address, CPE id): the site and its version, remembered by site id."""
        assert self.store is not None
        located = await self.store.locate(*lookup)
        if len(self._site_of) >= self._settings.client_cache:
            self._site_of.clear()
        self._site_of[lookup] = located[0] if located is not None else None
        return located

    async def _load(self, site_id: str) -> Site | None:
        """One load of a site however many of its new clients ask for it at once."""
        loading = self._loading.get(site_id)
        if loading is None:
            assert self.store is not None
            loading = self._loading[site_id] = asyncio.ensure_future(self.store.load_site(site_id))
            loading.add_done_callback(lambda _done: self._loading.pop(site_id, None))
        return await asyncio.shield(loading)

    def _hold_site(self, site: Site, used: bool = True) -> None:
        """Hold `site` (a newer version replaces the old in place; `used` counts as a use for the LRU)."""
        old = self._sites.get(site.id)
        if old is not None:
            self._index.remove(old)
        self._sites[site.id] = site
        if used:
            self._sites.move_to_end(site.id)
        self._index.add(site)
        self._stand_ins.clear()
        while len(self._sites) > self._settings.site_cache:
            evicted_id, evicted = self._sites.popitem(last=False)
            self._index.remove(evicted)
            for key in self._site_clients.pop(evicted_id, set()):
                self._clients.pop(key, None)

    def _bind(self, key: Hashable, identity: Identity, site: Site | None) -> Client:
        device = find_device(site, identity) if site is not None else None
        client = Client(identity, site, governing(site, device, self.profiles), self.maker, device)
        old = self._clients.pop(key, None)
        if old is not None:
            client.used = old.used  # rebinding (a site reload) is not a use, nor a reason to forget one
            self._site_clients.get(old.site.id if old.site else _UNKNOWN, set()).discard(key)
        else:
            self._make_room()
        self._clients[key] = client
        self._site_clients.setdefault(site.id if site else _UNKNOWN, set()).add(key)
        return client

    def _make_room(self) -> None:
        """Evict until a new client fits: the oldest not used since it was last passed over; a few used ones
        get a second chance (to the back, unmarked), so an insert never sweeps the whole table."""
        chances = _SECOND_CHANCES
        while len(self._clients) >= self._settings.client_cache:
            evicted_key, evicted = self._clients.popitem(last=False)
            if evicted.used and chances:
                chances -= 1
                evicted.used = False
                self._clients[evicted_key] = evicted
                continue
            self._site_clients.get(evicted.site.id if evicted.site else _UNKNOWN, set()).discard(evicted_key)

    # --- keeping up with changes -------------------------------------------------------------------------

    async def _hear(self, change: Change) -> None:
        """The store's notices, as they come (see Store.watch)."""
        try:
            await self.apply(change)
        except Exception:
            log.exception("applying a policy change (%s) failed; the next resync catches up", change)
            self._needs_resync = True
        # Notices read in one go would otherwise be handled back to back while queries wait: a burst of
        # writes elsewhere must not stall this worker's answers.
        await asyncio.sleep(0)

    async def follow(self) -> None:
        """Until cancelled: retry a failed catch-up every second (the notices come through `_hear`)."""
        if self.store is None:
            return
        await self.apply(Change("networks"))
        try:
            while True:
                await asyncio.sleep(_RETRY_AFTER_FAILURE)
                if self._needs_resync:
                    await self.apply(Change("resync"))
        finally:
            for task in (self._reloader, self._networks_loader):
                if task is not None:
                    task.cancel()
            if self._spacing_timer is not None:
                self._spacing_timer.cancel()

    async def apply(self, change: Change) -> None:
        """Apply one notice. If the store fails meanwhile, what was missed is caught up by a resync later."""
        try:
            if change.kind == "down":
                self._mark_down(change.key)
            elif change.kind == "up":
                self._mark_up()
                await self._reload_profiles()
                await self._reload_records()
            elif change.kind == "site":
                held = self._sites.get(change.key)
                # A notice older than the version held was overtaken by a reload (a burst of writes to one
                # site costs a reload per notice only while each is newer). Version 0 is a deletion and 1 a
                # new site: one deleted and made again starts over at 1.
                if held is not None and (change.version <= 1 or change.version > held.version):
                    self._due[change.key] = None
                    self._reload_soon()
            elif change.kind == "networks":
                self._forget_addresses()
                self._load_site_networks_soon()
            elif change.kind == "profile":
                await self._reload_profiles()
            elif change.kind == "records":
                await self._reload_records()
            elif change.kind == "resync":
                await self._resync()
                await self._reload_records()
                self._needs_resync = False
                self._mark_up()
        except StoreUnavailable as exc:
            self._lost_store(exc)

    def _reload_soon(self) -> None:
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.ensure_future(self._reload_due())

    async def _reload_due(self) -> None:
        """Reload the sites due, each as soon as its spacing allows (`_RELOAD_SPACING`); come back for the
        ones still spaced out, while a notice of another site starts a reload of it at once."""
        await asyncio.sleep(_RELOAD_DELAY)
        try:
            while True:
                now = time.monotonic()
                site_id = next((site for site in self._due if self._spaced.get(site, 0.0) <= now), None)
                if site_id is None:
                    break
                del self._due[site_id]
                # The reload's cost in this thread's CPU time, not the wall clock's: another process taking
                # the CPU meanwhile (a busy machine) must not space a site's changes out to a second.
                cost = time.thread_time()
                await self._reload_site(site_id)
                cost = time.thread_time() - cost
                finished = time.monotonic()
                if len(self._spaced) > len(self._sites):  # forget the spacings that have passed
                    self._spaced = {site: until for site, until in self._spaced.items() if until > finished}
                self._spaced[site_id] = finished + min(cost * _RELOAD_SPACING, _MOST_SPACING)
        except StoreUnavailable as exc:
            self._lost_store(exc)
            return
        if self._due:
            wait = min(self._spaced[site] for site in self._due) - time.monotonic()
            self._spacing_timer = asyncio.get_running_loop().call_later(max(wait, 0.0), self._reload_soon)

    def _load_site_networks_soon(self) -> None:
        self._networks_due = True
        if self.on_site_networks is not None and (self._networks_loader is None or self._networks_loader.done()):
            self._networks_loader = asyncio.ensure_future(self._load_site_networks())

    async def _load_site_networks(self) -> None:
        # One load for a burst of notices (an import of many sites): every network of every site is read.
        assert self.store is not None and self.on_site_networks is not None
        while self._networks_due:
            await asyncio.sleep(_RELOAD_DELAY)
            self._networks_due = False
            try:
                networks = await self.store.site_networks()
                self._site_networks = NetworkSet(networks)
                self.on_site_networks(networks)
            except StoreUnavailable as exc:
                self._lost_store(exc)
                return

    def _lost_store(self, exc: StoreUnavailable) -> None:
        """Changes may be missed from here on: the resync after the outage compares every held site."""
        self._due.clear()
        self._mark_down(str(exc))
        self._needs_resync = True

    async def _reload_site(self, site_id: str) -> None:
        assert self.store is not None
        site = await self.store.load_site(site_id)
        keys = self._site_clients.pop(site_id, set())
        if site is None:
            gone = self._sites.pop(site_id, None)
            if gone is not None:
                self._index.remove(gone)
            for key in keys:
                self._clients.pop(key, None)  # resolved again: their addresses may now be nobody's
            self._forget_addresses()
            return
        if site_id in self._sites:
            self._hold_site(site, used=False)
        for key in keys:
            client = self._clients.get(key)
            if client is None:
                continue
            if self._still_of(site, key, client.identity):
                self._bind(key, client.identity, site)
            else:
                self._clients.pop(key, None)  # no longer of this site (a network, CPE id or client id went away)

    @staticmethod
    def _still_of(site: Site, key: Hashable, identity: Identity) -> bool:
        if identity.credential is not None:
            return identity.credential in site.by_client_id
        if identity.cpe_id is not None and identity.cpe_id in site.cpe_ids:
            return True
        return in_site_networks(site, identity)

    def _forget_addresses(self) -> None:
        """Addresses may have moved between sites: look them up again, and the clients of no site too."""
        self._site_of.clear()
        self._stand_ins.clear()
        for key in self._site_clients.pop(_UNKNOWN, set()):
            self._clients.pop(key, None)

    async def _reload_profiles(self) -> None:
        assert self.store is not None
        self.profiles = {**self._builtin_profiles, **await self.store.load_profiles()}
        self._rebind_all()

    async def _reload_records(self) -> None:
        assert self.store is not None
        try:
            records = parse_shared_records(list(await self.store.load_records()))
        except (PolicyError, ValueError, TypeError) as exc:  # not as the API writes them
            if not self._bad_records:
                log.error("local records in the store cannot be read (%s); still serving the last ones", exc)
            self._bad_records = True
            return
        self._bad_records = False
        if records != self._records:
            self._records = records
            if self.on_records is not None:
                self.on_records(records)

    def _rebind_all(self) -> None:
        self._stand_ins.clear()
        for key, client in list(self._clients.items()):
            self._bind(key, client.identity, client.site)

    async def _resync(self) -> None:
        """Notices may have been missed: compare every held site's version with the store's."""
        assert self.store is not None
        held = list(self._sites)
        versions = await self.store.site_versions(held) if held else {}
        for site_id in held:
            if versions.get(site_id, 0) != self._sites[site_id].version:
                await self._reload_site(site_id)
        self._forget_addresses()
        self._load_site_networks_soon()
        await self._reload_profiles()
        log.info("policy store: resynchronised %d held sites", len(held))

    def _mark_down(self, reason: str) -> None:
        self._retry_at = self._clock() + _RETRY_AFTER_FAILURE
        if self.down_since is None:
            self.down_since = self._clock()
            log.warning(
                "policy store unavailable (%s): serving the %d clients in memory; new clients get %s until it is back",
                reason,
                len(self._clients),
                "SERVFAIL (store.cold_policy)"
                if self._settings.cold_policy == "servfail"
                else f"the policy of their site if one of the {len(self._sites)} held sites is theirs, else "
                "the default policy",
            )

    def _mark_up(self) -> None:
        if self.down_since is not None:
            self._stand_ins.clear()
            log.info("policy store reachable again after %.1f s", self._clock() - self.down_since)
            self.down_since = None
