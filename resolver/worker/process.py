"""The DNS worker process: its sockets, query path, policy copy and lists, and how it starts, reloads and stops."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time

import uvloop

from resolver.shared.certificates import Certificates
from resolver.shared.config import Config
from resolver.shared.identity import NetworkSet
from resolver.shared.lists import served_path
from resolver.shared.loading import load_policy_and_lists, policy_maker
from resolver.shared.page_pool import PagePool
from resolver.shared.run_directory import UNSET, RunDirectory
from resolver.shared.signals import handle_signals
from resolver.shared.sockets import SocketSet
from resolver.shared.store.backends import open_backends
from resolver.worker.access import AccessControl
from resolver.worker.activity import hand_over_every
from resolver.worker.cache import AnswerCache
from resolver.worker.counters import worker_counters, write_counters
from resolver.worker.directory import Directory
from resolver.worker.discovery import Discovery
from resolver.worker.doh import DohConnection
from resolver.worker.dot import DotConnection
from resolver.worker.listener import InFlight, TcpConnection, UdpListener
from resolver.worker.local_zones import LocalZones
from resolver.worker.pipeline import Resolver
from resolver.worker.rate_limit import ResponseRateLimiter
from resolver.worker.tls import TlsGate
from resolver.worker.upstream import Forwarder

log = logging.getLogger(__name__)

_NOT_READY_LOG_INTERVAL = 5.0

_READY_POLL = 0.05


class Worker:
    """Everything one worker process serves with; usable in-process (tests) or under the supervisor.

    `run`: the node's run directory (counters, reloaded configuration, the list target). A worker of a node
    that follows lists published through Redis answers nothing but SERVFAIL with EDE 14 "Not Ready" until
    it serves the version the admin process set as the target there: a node must never answer from no list,
    or an old one, while the list it should serve is on its way (see docs/operations.md, "Starting")."""

    def __init__(
        self,
        config: Config,
        sockets: SocketSet,
        index: int = 0,
        run: RunDirectory | None = None,
        certificates: Certificates | None = None,
    ) -> None:
        """`certificates`: the DoT and DoH listeners' (the supervisor's, made before it forked; else made here)."""
        self.config = config
        self.sockets = sockets
        self.index = index
        self.run = run
        catalog, maker, self.lists = load_policy_and_lists(config)
        self.catalog = catalog
        self.backends = open_backends(config, catalog)
        self.directory = Directory(
            self.backends.policies, maker, catalog, NetworkSet(config.identity.trusted_networks), config.store
        )
        self.resolver = Resolver(
            AnswerCache(config.cache),
            Forwarder(config.upstream),
            self.lists,
            self.directory,
            page_pool=PagePool(config.pages.device_networks),
            discovery=Discovery(config.tls),
            local=config.local,
        )
        self.access = AccessControl(config.server, config.rate_limit, config.identity)
        self.directory.on_site_networks = self.access.use_site_networks
        self.directory.on_records = self._use_shared_records
        self.limiter = ResponseRateLimiter(config.rate_limit)
        self.in_flight = InFlight()
        self.connections: set[TcpConnection] = set()
        self.gate: TlsGate | None = None
        if sockets.dot or sockets.doh:
            self.gate = TlsGate(config.tls, certificates or Certificates(config.tls), time.monotonic)
        self._udp: list[UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return not self.resolver.held

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.run is not None and self.config.store.redis:
            self.resolver.hold()
            self._tasks.append(loop.create_task(self._release_when_lists_are_in(self.run)))
        for sock in self.sockets.udp:
            listener = UdpListener(self.resolver, self.in_flight, self.access, self.limiter)
            await loop.create_datagram_endpoint(functools.partial(_same, listener), sock=sock)
            self._udp.append(listener)
        settings = self.config.server
        for sock in self.sockets.tcp:
            server = await loop.create_server(
                lambda: TcpConnection(self.resolver, settings, self.connections, self.in_flight, self.access),
                sock=sock,
            )
            self._tcp.append(server)
        if self.gate is not None:
            await self._serve_encrypted(self.gate)
        self._tasks += [
            loop.create_task(task) for task in (self.lists.watch(), self.backends.follow(), self.directory.follow())
        ]
        if self.run is not None:
            self._tasks.append(
                loop.create_task(
                    hand_over_every(
                        self.resolver.tally,
                        self.run.activity / f"worker-{self.index}.json",
                        self.config.activity.hand_over_seconds,
                    )
                )
            )
            self._tasks.append(
                loop.create_task(
                    write_counters(
                        self.run.path,
                        self.index,
                        lambda: {
                            **worker_counters(self.resolver, self.catalog),
                            "ready": self.ready,
                            "lists_fallback": self.lists.fallback,
                            "shed": self.shed(),
                            "tls": self.encrypted(),
                        },
                    )
                )
            )

    async def _serve_encrypted(self, gate: TlsGate) -> None:
        loop = asyncio.get_running_loop()
        gate.certificates.check()  # a worker started again after the files changed serves the new pair at once
        self._tasks.append(loop.create_task(gate.certificates.watch()))
        settings, resolver, in_flight, access = self.config.server, self.resolver, self.in_flight, self.access
        for sock in self.sockets.dot:
            dot = gate.accepting("dot", lambda: DotConnection(resolver, settings, gate, in_flight, access))
            self._tcp.append(await loop.create_server(dot, sock=sock))
        for sock in self.sockets.doh:
            doh = gate.accepting("doh", lambda: DohConnection(resolver, gate, in_flight, access))
            self._tcp.append(await loop.create_server(doh, sock=sock))

    def encrypted(self) -> dict[str, object]:
        """The DoT and DoH listeners' counters (metrics: bns_tls_*); empty when they are off."""
        gate = self.gate
        if gate is None:
            return {}
        return {
            "open": gate.open_count(),
            "handshakes": dict(gate.handshakes),
            "cut": dict(gate.cut),
            "client_ids": {**self.directory.client_ids, "malformed": gate.malformed_ids},
            "doh_statuses": {str(status): count for status, count in gate.statuses.items()},
            "certificate_not_after": gate.certificates.pair.not_after,
            "certificate_reloads": dict(gate.certificates.reloads),
        }

    def shed(self) -> dict[str, int]:
        """Queries not answered in full, by why (metrics: bns_shed_total)."""
        return {
            "refused_source": self.access.refused + self.resolver.refused_strangers,
            "rate_limit_dropped": self.limiter.dropped,
            "rate_limit_slipped": self.limiter.slipped,
            "client_busy": self.resolver.shed_clients,
            "zone_busy": self.resolver.shed_zones,
        }

    async def _release_when_lists_are_in(self, run: RunDirectory) -> None:
        started = time.monotonic()
        next_log = started + _NOT_READY_LOG_INTERVAL
        while True:
            target = run.lists_target()
            if target is not UNSET and target in (None, self.lists.snapshot.version):
                break
            await self.lists.check()
            if time.monotonic() >= next_log:
                next_log += _NOT_READY_LOG_INTERVAL
                log.warning(
                    "worker %d: not answering yet (SERVFAIL, EDE 14) for %.0f s: %s",
                    self.index,
                    time.monotonic() - started,
                    "waiting for the admin process to learn the current list from Redis"
                    if target is UNSET
                    else f"waiting for list version {target} (serving {self.lists.snapshot.version})",
                )
            await asyncio.sleep(_READY_POLL)
        self.resolver.release()
        log.info("worker %d: serving list version %s; answering", self.index, self.lists.snapshot.version)

    def reload(self, config: Config) -> None:
        """Apply a configuration reloaded on SIGHUP (only the keys marked live differ from the current one)."""
        old, self.config = self.config, config
        logging.getLogger().setLevel(config.log.level.upper())
        if config.lists != old.lists:
            self.lists.retarget(served_path(config.lists)[0], config.lists.check_interval)
        if config.policy != old.policy:
            self.directory.use_maker(policy_maker(config, self.catalog))
        if config.store != old.store:
            self.directory.use_settings(config.store)
        if config.server != old.server or config.rate_limit != old.rate_limit:
            self.access.configure(config.server, config.rate_limit, config.identity)
            self.limiter.configure(config.rate_limit)
        if config.upstream != old.upstream:
            retired, self.resolver.forwarder = self.resolver.forwarder, Forwarder(config.upstream)
            # queries already sent keep their sockets until they are answered or give up
            for forwarder in [retired, *self.resolver.local_zones.use_upstream(config.upstream)]:
                asyncio.get_running_loop().call_later(old.upstream.deadline + 1, forwarder.close)
            if config.upstream.trust_ad != old.upstream.trust_ad:
                self.resolver.cache.clear()  # its answers carry the AD bit as the old setting left it
        if config.cache != old.cache:
            self.resolver.cache.use_settings(config.cache)
        if config.local != old.local:
            self._retire(self.resolver.use_local(config.local), old.upstream.deadline)
        if self.gate is not None:
            self.gate.certificates.check()  # SIGHUP: the certificate files may have been replaced

    def _use_shared_records(self, records: tuple[str, ...]) -> None:
        self._retire(self.resolver.use_shared_records(records), self.config.upstream.deadline)

    def _retire(self, zones: LocalZones, deadline: float) -> None:
        """Zones replaced: their forwarders are closed once the queries they sent are done, and the cache
        emptied (answers of a zone forwarded before, or to other servers, or of a name now local)."""
        asyncio.get_running_loop().call_later(deadline + 1, zones.close)
        self.resolver.cache.clear()

    async def stop(self) -> None:
        """Stop reading, answer what was read, then close: within `server.drain_timeout`."""
        deadline = time.monotonic() + self.config.server.drain_timeout
        for listener in self._udp:
            listener.draining = True
        for server in self._tcp:
            server.close()
        for connection in list(self.connections):
            connection.drain()
        encrypted = self.gate.open if self.gate is not None else set()
        if self.gate is not None:
            self.gate.stopping = True
        for tls in list(encrypted):
            tls.drain()
        await self.in_flight.drained(max(deadline - time.monotonic(), 0))
        while (self.connections or encrypted) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for listener in self._udp:
            listener.close()
        for task in self._tasks:
            task.cancel()
        await self.backends.close()
        self.resolver.close()


def _same(listener: UdpListener) -> UdpListener:
    return listener


async def _serve_until_signalled(
    config: Config, sockets: SocketSet, index: int, run: RunDirectory | None, certificates: Certificates | None
) -> int:
    worker = Worker(config, sockets, index, run, certificates)
    await worker.start()
    # A worker's heap grows with the clients and sites it holds (100 MB and more); a full collection walks
    # all of it and stalls every query meanwhile. What exists at start-up is set aside for good, and
    # collections run less often: the query path makes few reference cycles.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    stop = handle_signals(lambda: worker.reload(run.read_config()) if run is not None else None)
    log.debug("worker %d ready", index)
    await stop.wait()
    log.debug("worker %d stopping", index)
    await worker.stop()
    return 0


_GC_THRESHOLDS = (20_000, 20, 100)


def run_worker(
    config: Config,
    sockets: SocketSet,
    index: int,
    run: RunDirectory | None = None,
    certificates: Certificates | None = None,
) -> int:
    return uvloop.run(_serve_until_signalled(config, sockets, index, run, certificates))
