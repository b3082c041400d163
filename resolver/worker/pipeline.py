"""The query path: one request, one direction, the order of its stages written once.

    parse → local → identify → policy → filter → safe search → cache → upstream → CNAME check → answer

`Resolver.answer` runs the stages up to identify; `_answer_for` runs the rest. Local answers come first:
they depend on no client and no list, and reveal nothing a policy keeps from anyone (a synthesized HINFO for
ANY, REFUSED for other classes and zone transfers; for resolver.arpa, this resolver's own encrypted endpoints,
RFC 9462, where every client's policy applies as here), so a CHAOS query for a blocked name is refused, not
given an IN SOA. The filter answers the bypass canaries, and raises an alert for a device that asks for a
public encrypted DNS server while its policy blocks them. A query is answered synchronously when it can (a
known client and a cache hit, an error, a blocked or local answer); otherwise a future is returned that the
listener awaits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any

from resolver.shared.config import LocalSettings, TlsSettings
from resolver.shared.dns import CLASS_IN, EdeCode, Rcode, RRType, ede_option
from resolver.shared.identity import in_site_networks, made_here
from resolver.shared.lists import Lists
from resolver.shared.page_pool import PagePool
from resolver.shared.policy.decision import Action, AnswerMode, Policy, Verdict, decide, judge_chain
from resolver.shared.policy.safesearch import restrict_name
from resolver.worker.activity import Tally
from resolver.worker.answers import BlockedAnswers, safe_search_answer
from resolver.worker.cache import AnswerCache, CachedAnswer, failure_reply
from resolver.worker.directory import Client, Directory, Nobody
from resolver.worker.discovery import Discovery
from resolver.worker.local_zones import LocalZones
from resolver.worker.threats import ThreatWatch
from resolver.worker.upstream import Forwarding, Overloaded, UpstreamFailed
from resolver.worker.wire import (
    LOCAL_TYPES,
    Peer,
    QueryParser,
    Request,
    ScannedReply,
    read_query,
    registered_domain,
    resource_record,
    synthesized_answer,
    truncated_answer,
)

log = logging.getLogger(__name__)

# RFC 8482 §4.2: answer ANY with one synthesized HINFO record instead of every RRset of the name.
_ANY_ANSWER = resource_record(RRType.HINFO, 3600, b"\x07RFC8482\x00")
_NO_UPSTREAM = ede_option(EdeCode.NO_REACHABLE_AUTHORITY, "no upstream answered")
_OVERLOADED = ede_option(EdeCode.OTHER, "too many upstream queries in flight")
_ZONE_BUSY = ede_option(EdeCode.OTHER, "too many upstream queries in flight for this domain")
_CLIENT_BUSY = ede_option(EdeCode.OTHER, "too many of your queries are waiting for upstreams")
_STORE_NOT_READY = ede_option(EdeCode.NOT_READY, "the policy store cannot be reached")
_NOT_READY = ede_option(EdeCode.NOT_READY, "the filter is starting: its blocklist is not in yet")
# No text: a refusal goes to strangers, whose source may be forged, and must be no larger than their query.
_PROHIBITED = ede_option(EdeCode.PROHIBITED)
# RFC 8914 §4.21 names this code for a REFUSED to a query with RD clear; 18 Prohibited would tell the client
# it may not use this server at all, which is not so: with RD set, it would be answered.
_NOT_RECURSING = ede_option(EdeCode.NOT_AUTHORITATIVE, "RD is clear and the answer is not cached")

Answer = bytes | asyncio.Future[bytes]

_FLAG_RD = 0x01  # in the high flags byte


class Resolver:
    """Answers one query. Raises Malformed for queries the listener turns into rcodes."""

    def __init__(
        self,
        cache: AnswerCache,
        forwarder: Forwarding,
        lists: Lists,
        directory: Directory,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        page_pool: PagePool | None = None,
        discovery: Discovery | None = None,
        local: LocalSettings | None = None,
    ) -> None:
        # More queries interned than answers cached: the cache's hits are the parser's too, and a working set
        # of blocked names as large as the cache (whose answers are not cached) still fits.
        self.discovery = discovery or Discovery(TlsSettings())  # resolver.arpa: by default, no DoT or DoH
        self._parser_size = max(cache.size * 2, 1024)
        self._local = local or LocalSettings()
        self.shared_records: tuple[str, ...] = ()  # the operator's records from the admin API
        self.local_zones = LocalZones(self._local, self.discovery, forwarder.settings)
        self.parser = QueryParser(self._parser_size, self.local_zones.find)
        self.directory = directory
        self.lists = lists
        self.blocked = BlockedAnswers(max(cache.size * 2, 1024))
        self.cache = cache
        self.forwarder = forwarder
        self.page_pool = page_pool or None  # warning page addresses of their own for devices behind routers
        self._clock = clock
        self._wall_clock = wall_clock
        self._fetches: dict[bytes, asyncio.Future[CachedAnswer]] = {}
        # Flood isolation: a source, or a domain asked for random names, may hold only so much of the
        # upstream capacity (upstream.max_per_client, max_per_zone); the rest is refused at once.
        self._waiting: dict[Hashable, int] = {}
        self._zone_fetches: dict[bytes, int] = {}
        self.shed_clients = self.shed_zones = 0  # queries so refused (metrics)
        self.refused_strangers = 0  # queries from outside server.allow whose client id named no device (metrics)
        # threats: signs of infection in a client's names (Web Protect's categories, DGAs, tunnels)
        self.threats = ThreatWatch(
            {category.mask: category.id for category in directory.catalog if category.action == "warn"}
        )
        self._threat_bits = sum(self.threats.listed_categories)
        # bypass: a public DNS-over-HTTPS or -TLS server asked for while the policy blocks it
        self._bypass_bits = sum(category.mask for category in directory.catalog if category.id == "encrypted-dns")
        self.tally = Tally(directory.catalog, self.threats)
        self.held = False

    def hold(self) -> None:
        """Until `release`, answer every query SERVFAIL with EDE 14 Not Ready (RFC 8914): the node is not
        ready to filter."""
        self.held = True

    def release(self) -> None:
        self.held = False

    def refusal(self, data: bytes, client: Peer, tcp: bool) -> bytes:
        """REFUSED with EDE 18, the question echoed: for a source outside server.allow. Raises Malformed."""
        query, _options = read_query(data, tcp)  # not interned: strangers' queries must not evict our clients'
        return synthesized_answer(Request(data, client, query), Rcode.REFUSED, ede=_PROHIBITED)

    def truncation(self, data: bytes, client: Peer, reply: bytes) -> bytes:
        """`reply` to the UDP query `data` cut to its question with TC=1: the client asks again over TCP."""
        return truncated_answer(self.parser.parse(data, client, False), reply[3] & 0x0F)

    def answer(self, data: bytes, client: Peer, tcp: bool, client_id: str | None = None) -> Answer:
        """`client_id`: the one a DoT or DoH client gave. It counts only when it names a device (directory.py: a
        device is found by it, fleet-wide); a malformed id, or one no device has, is as good as none: the query
        is its address's, as on port 53, never a looser policy's."""
        # parse: the lowercased name, type, class, EDNS and identity options, interned by the bytes.
        request = self.parser.parse(data, client, tcp)
        if self.held:
            return synthesized_answer(request, Rcode.SERVFAIL, ede=_NOT_READY)
        # local: what we never forward (RFC 8482 ANY, zone transfers, other classes, the zones served here).
        if request.query.local:
            return self._answer_locally(request)
        # identify: a client this worker knows costs a dict lookup; a new one is looked up in the store.
        if client_id:
            device = self.directory.client_by_id(client_id)
            if device is None:
                return asyncio.ensure_future(self._answer_new_id(request, client_id))
            if isinstance(device, Client):
                request.client_id = client_id
                return self._answer_for(request, device)
        known = self.directory.client(request)
        if known is None:
            return asyncio.ensure_future(self._answer_new_client(request))
        return self._answer_for(request, known)

    async def _answer_new_id(self, request: Request, client_id: str) -> bytes:
        device = await self.directory.resolve_id(request, client_id)
        known: Client | None
        if isinstance(device, Client):
            known = device
            request.client_id = client_id
        else:  # nobody's (or the store could not say): the query is its address's
            known = self.directory.client(request) or await self.directory.resolve(request)
        if known is None:  # the store could not say in time and store.cold_policy refuses such queries
            return synthesized_answer(request, Rcode.SERVFAIL, ede=_STORE_NOT_READY)
        answer = self._answer_for(request, known)
        return answer if type(answer) is bytes else await answer  # type: ignore[misc]

    def answer_stranger(self, data: bytes, client: Peer, client_id: str) -> Answer:
        """A DoT or DoH query from a source outside server.allow that gave a client id: an id made by the API is
        its credential, so it is answered as the device the id names, and REFUSED otherwise (an id of another
        form is refused before the store is asked: guessing costs the fleet nothing). Raises Malformed."""
        request = self.parser.parse(data, client, True)
        if not made_here(client_id):
            return self._refuse_stranger(request)
        device = self.directory.client_by_id(client_id)
        if device is None:
            return asyncio.ensure_future(self._answer_new_stranger(request, client_id))
        return self._answer_stranger(request, client_id, device)

    async def _answer_new_stranger(self, request: Request, client_id: str) -> bytes:
        device = await self.directory.resolve_id(request, client_id)
        answer = self._answer_stranger(request, client_id, device)
        return answer if type(answer) is bytes else await answer  # type: ignore[misc]

    def _answer_stranger(self, request: Request, client_id: str, known: Client | Nobody | None) -> Answer:
        if not isinstance(known, Client):
            return self._refuse_stranger(request)
        if self.held:
            return synthesized_answer(request, Rcode.SERVFAIL, ede=_NOT_READY)
        if request.query.local:
            return self._answer_locally(request)
        request.client_id = client_id
        return self._answer_for(request, known)

    def _refuse_stranger(self, request: Request) -> bytes:
        self.refused_strangers += 1
        return synthesized_answer(request, Rcode.REFUSED, ede=_PROHIBITED)

    async def _answer_new_client(self, request: Request) -> bytes:
        client = await self.directory.resolve(request)
        if client is None:  # the store could not say in time and store.cold_policy refuses such queries
            return synthesized_answer(request, Rcode.SERVFAIL, ede=_STORE_NOT_READY)
        answer = self._answer_for(request, client)
        return answer if type(answer) is bytes else await answer  # type: ignore[misc]

    def _answer_for(self, request: Request, known: Client) -> Answer:
        query = request.query
        # policy: the client's effective policy now, made again only at a schedule boundary or a change.
        now = self._wall_clock()
        policy = known.policy if now < known.until else known.refresh(now)
        if not known.queries:  # activity: counted on the client, collected off the query path
            self.tally.counted.append(known)
        known.queries += 1
        # filter: the one decision (shared/policy/decision.py). Before the cache, which is shared by every
        # client whose policy lets the name through.
        snapshot = self.lists.snapshot
        if query.listed_in != snapshot.generation:  # first sight of this query, or a new list since
            query.bits = snapshot.lookup(query.name)
            query.listed_in = snapshot.generation
        if query.bits & self._threat_bits:  # warned, blocked or passed: the device asked for it
            self.threats.listed(
                self.directory.key(request), _site_of(known), query.name, query.bits, self._clock(), known.device_key
            )
        decision = decide(policy, query.name, query.bits)
        if known.logged:
            self.tally.logged(known, query.name, query.qtype, decision.verdict, now)
        if decision.verdict is not None:
            if query.bits & self._bypass_bits and decision.verdict.action is Action.BLOCK:
                self.threats.bypass(
                    self.directory.key(request), _site_of(known), query.name, self._clock(), known.device_key
                )
            return self._blocked(request, known, decision.verdict, True)
        # local records: the site's own names, then the operator's, answered here once the policy lets them.
        names = known.names
        if names is not None:
            named = names.get(query.name)
            if named is not None:
                return named.answer(request)
        if query.zone is not None:
            return query.zone.answer(request)
        # safe search: the engine's restrict name instead of the name asked.
        if policy.safe_search:
            target = restrict_name(query.name)
            if target is not None:
                return asyncio.ensure_future(self._safe_search(request, target))
        # cache: keyed on question + DO/CD; a CNAME chain into a name this policy blocks is blocked.
        clock = self._clock()
        entry = self.cache.get(query.key, clock)
        if entry is not None:
            if entry.cname_targets and decision.chain is not None:
                found = judge_chain(policy, entry.cname_targets, self.lists.snapshot, decision.chain)
                if found is not None:
                    return self._blocked(request, known, found[1])
            if entry.machine_made:
                self.threats.machine_made(
                    self.directory.key(request), _site_of(known), query.name, clock, known.device_key
                )
            return entry.render(request, clock)
        refusal = _refuse_recursion(request)
        if refusal is not None:
            return refusal
        # stale: a name whose upstreams failed a moment ago is answered from its expired data (RFC 8767).
        stale = self.cache.failing(query.key, clock)
        if stale is not None:
            if stale.machine_made:
                self.threats.machine_made(
                    self.directory.key(request), _site_of(known), query.name, clock, known.device_key
                )
            return self._render(request, known, policy, decision.chain, stale)
        source = self.directory.key(request)  # a device behind a trusted router is a client of its own
        waiting = self._waiting.get(source, 0)
        held = self.cache.stale(query.key, clock)
        if waiting >= self.forwarder.settings.max_per_client:
            self.shed_clients += 1
            if held is not None:  # not asked upstream: its expired answer, rather than SERVFAIL
                return self._render(request, known, policy, decision.chain, held.stale_copy(clock))
            return synthesized_answer(request, Rcode.SERVFAIL, ede=_CLIENT_BUSY)
        # threats: a name no cache held is judged; its answer keeps the verdict for the next clients
        machine_made = self.threats.miss(source, _site_of(known), query.name, query.qtype, clock, known.device_key)
        # upstream: one fetch per key however many clients ask at once; the answer is rendered per client.
        self._waiting[source] = waiting + 1
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        fetch = self._fetch(query.key, query.do, query.cd)
        fetch.add_done_callback(
            partial(self._answer_fetched, answer, request, known, source, policy, decision.chain, machine_made)
        )
        if held is not None:  # an upstream slower than client_timeout: the client gets the expired answer
            timer = asyncio.get_running_loop().call_later(
                self.cache.settings.client_timeout,
                self._answer_stale,
                answer,
                request,
                known,
                policy,
                decision.chain,
                held,
            )
            answer.add_done_callback(lambda _answered: timer.cancel())  # what it holds goes with the answer
        return answer

    def _answer_stale(
        self,
        answer: asyncio.Future[bytes],
        request: Request,
        known: Client,
        policy: Policy,
        chain: int | None,
        held: CachedAnswer,
    ) -> None:
        if not answer.done():  # the upstream is still being asked, and its answer will be cached for the next
            answer.set_result(self._render(request, known, policy, chain, held.stale_copy(self._clock())))

    def _answer_fetched(
        self,
        answer: asyncio.Future[bytes],
        request: Request,
        known: Client,
        source: Hashable,
        policy: Policy,
        chain: int | None,
        machine_made: bool,
        fetch: asyncio.Future[CachedAnswer],
    ) -> None:
        # A callback, not a task per miss: the miss path is where a forwarder spends most of its CPU.
        _count_down(self._waiting, source)
        if answer.done():
            return
        if fetch.cancelled():
            answer.cancel()
            return
        try:
            entry = fetch.result()
            if machine_made:
                entry.machine_made = True
            answer.set_result(self._render(request, known, policy, chain, entry))
        except Exception as error:  # the listener turns it into SERVFAIL and logs it
            answer.set_exception(error)

    def _render(self, request: Request, known: Client, policy: Policy, chain: int | None, entry: CachedAnswer) -> bytes:
        """A fetched or stale answer for this client: blocked if its CNAME chain leads into a name the policy
        blocks (judged now, against the current lists)."""
        if entry.cname_targets and chain is not None:
            found = judge_chain(policy, entry.cname_targets, self.lists.snapshot, chain)
            if found is not None:
                return self._blocked(request, known, found[1])
        if entry.stale:
            self.cache.stale_answers += 1
        return entry.render(request, self._clock())

    def _blocked(self, request: Request, known: Client, verdict: Verdict, asked: bool = False) -> bytes:
        """The answer for a verdict, counted for the device of a site (worker/activity.py). A warning for the
        name `asked` (not one met along its CNAME chain, which no page can explain) may get the device's own
        page address."""
        if known.site is not None:
            if not known.queries and known.blocks is None:  # a late answer (its CNAME chain) after a collection
                self.tally.counted.append(known)
            self.tally.blocked(known, verdict, request.query)
        if asked and verdict.action is Action.WARN and known.device is not None and self.page_pool is not None:
            return self._device_warning(request, known, verdict)
        return self.blocked.answer(request, verdict)

    def _device_warning(self, request: Request, known: Client, verdict: Verdict) -> bytes:
        """A warning answered with the device's own page address, when it may have one (page_pool.py): its
        page, reached from its router's address, can then tell whose it is."""
        qtype = request.query.qtype
        pool = self.page_pool
        site = known.site
        # The page finds the site by the address the browser comes from (its router's, behind one): only a
        # device whose address is in its site's networks (not one whose site was found by CPE id alone) is told
        # apart there.
        if (
            verdict.mode is AnswerMode.PAGE
            and pool is not None
            and site is not None
            and known.device is not None
            and in_site_networks(site, known.identity)
        ):
            version = 4 if qtype == RRType.A else 6 if qtype == RRType.AAAA else 0
            if version:
                page = pool.address(site, known.device, request.query.name, version)
                if page is not None:
                    return self.blocked.answer(request, verdict, page)
        return self.blocked.answer(request, verdict)

    async def _safe_search(self, request: Request, target: bytes) -> bytes:
        query = request.query
        key = target + query.key[-5:]  # the same type, class and DO/CD, for the restrict name
        now = self._clock()
        entry = self.cache.get(key, now)
        if entry is None:
            refusal = _refuse_recursion(request)
            if refusal is not None:
                return refusal
            # the restrict name failed a moment ago: its expired answer, as any name's (no client_timeout here)
            entry = self.cache.failing(key, now)
            if entry is None:
                entry = await asyncio.shield(self._fetch(key, query.do, query.cd))
        return safe_search_answer(request, target, entry, self._clock())

    def _fetch(self, key: bytes, do: bool, cd: bool) -> asyncio.Future[CachedAnswer]:
        fetch = self._fetches.get(key)
        if fetch is not None:
            return fetch
        fetch = asyncio.get_running_loop().create_future()
        zone = registered_domain(key[:-5])
        in_flight = self._zone_fetches.get(zone, 0)
        if in_flight >= self.forwarder.settings.max_per_zone:  # not kept, as below
            self.shed_zones += 1
            fetch.set_result(self._unasked(key, _ZONE_BUSY))
            return fetch
        # local.forward: a zone with servers of its own (its names already went through the policy, as all)
        forwarder = self.local_zones.forwarder_for(key[:-5]) or self.forwarder
        try:
            upstream = forwarder.query(key[:-1], do, cd)
        except Overloaded:  # not kept: the load passes
            fetch.set_result(self._unasked(key, _OVERLOADED))
            return fetch
        self._fetches[key] = fetch
        self._zone_fetches[zone] = in_flight + 1
        upstream.add_done_callback(partial(self._fetched, key, zone, fetch))
        return fetch

    def _unasked(self, key: bytes, ede: bytes) -> CachedAnswer:
        """The answer to a question not sent upstream (a bound was reached): its expired answer if one is held,
        else SERVFAIL saying why; neither kept."""
        now = self._clock()
        held = self.cache.stale(key, now)
        return held.stale_copy(now) if held is not None else CachedAnswer(failure_reply(), [], 0, now, ede)

    def _fetched(
        self, key: bytes, zone: bytes, fetch: asyncio.Future[CachedAnswer], upstream: asyncio.Future[ScannedReply]
    ) -> None:
        del self._fetches[key]
        _count_down(self._zone_fetches, zone)
        if upstream.cancelled():
            fetch.cancel()
            return
        try:
            error = upstream.exception()
            if error is None:
                fetch.set_result(self.cache.store(key, upstream.result(), self._clock()))
            elif isinstance(error, UpstreamFailed):
                fetch.set_result(self.cache.store_failure(key, self._clock(), _NO_UPSTREAM))
            else:
                fetch.set_exception(error)
        except Exception as failure:
            fetch.set_exception(failure)

    def _answer_locally(self, request: Request) -> bytes:
        """RFC 8482 for ANY; REFUSED for other classes (CHAOS version probes included) and zone transfers;
        the answers of the zones served here (local_zones.py, and resolver.arpa's: discovery.py)."""
        query = request.query
        if query.qclass != CLASS_IN:
            return synthesized_answer(request, Rcode.REFUSED)
        if query.qtype == RRType.ANY:
            return synthesized_answer(request, Rcode.NOERROR, _ANY_ANSWER, 1)
        if query.qtype in LOCAL_TYPES:
            return synthesized_answer(request, Rcode.REFUSED)
        zone = query.zone
        assert zone is not None  # local, and for none of the reasons above: the parser found its zone
        return zone.answer(request)

    def use_local(self, local: LocalSettings) -> LocalZones:
        """Serve these local zones, records and forwards from now on (SIGHUP), with the records of the admin
        API; returns the ones retired, whose forwarders the caller closes once the queries they sent are done.
        The parser starts afresh: the queries it interned know their zone."""
        self._local = local
        try:
            zones = LocalZones(
                dataclasses.replace(local, records=local.records + self.shared_records),
                self.discovery,
                self.forwarder.settings,
            )
        except ValueError as exc:  # checked alone each, the two sets may still clash (a CNAME beside a record)
            log.error("local records: those of the admin API are not served with local.records: %s", exc)
            zones = LocalZones(local, self.discovery, self.forwarder.settings)
        retired, self.local_zones = self.local_zones, zones
        self.parser = QueryParser(self._parser_size, self.local_zones.find)
        return retired

    def use_shared_records(self, records: tuple[str, ...]) -> LocalZones:
        """Serve the admin API's records from now on, beside local.records (use_local)."""
        self.shared_records = records
        return self.use_local(self._local)

    def close(self) -> None:
        self.forwarder.close()
        self.local_zones.close()


def _site_of(client: Client) -> str | None:
    return client.site.id if client.site is not None else None


def _count_down(counts: dict[Any, int], key: Hashable) -> None:
    """One less for `key`; none left, no entry: the flood-isolation tables hold only what is in flight."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def _refuse_recursion(request: Request) -> bytes | None:
    """REFUSED for a query with RD clear, which is answered from the cache only and never forwarded
    (RFC 1034 §4.3.1); None for one that may be. Asked on a cache miss only: a hit costs nothing more."""
    if request.data[2] & _FLAG_RD:
        return None
    return synthesized_answer(request, Rcode.REFUSED, ede=_NOT_RECURSING)
