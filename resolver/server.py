"""Processes and sockets: the supervisor binds every socket, forks one worker per core, and stops them cleanly.

Python runs one core per process, so N workers each run their own uvloop event loop, cache and upstream
sockets. Each worker has its own UDP and TCP socket per listen address, all bound with SO_REUSEPORT, so the
kernel spreads clients over the workers. The supervisor binds them all before forking: a bind error (port 53
without privileges, an address in use) is reported once, at start-up, before anything runs. It keeps its
copies so that a worker that dies can be replaced on the same sockets without losing the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from blocklists.catalog import Catalog, load_catalog
from blocklists.errors import BlocklistError
from resolver.cache import AnswerCache
from resolver.config import AdminSettings, Config, Endpoint
from resolver.errors import StartupError
from resolver.identity import TrustedNetworks
from resolver.listener import InFlight, TcpConnection, UdpListener
from resolver.lists import Lists, cache_dir_of, served_path
from resolver.metrics import worker_counters, write_counters
from resolver.pipeline import Resolver
from resolver.policy.directory import Directory
from resolver.policy.effective import PolicyMaker, answering_from, default_policy
from resolver.policy.store import open_store
from resolver.upstream import Forwarder

log = logging.getLogger(__name__)

_STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT))
_UDP_RECEIVE_BUFFER = 4 << 20  # absorbs bursts while the loop is busy; the kernel caps it at rmem_max
_TCP_BACKLOG = 1024
_PORT_ZERO_RETRIES = 20


@dataclass
class SocketSet:
    """The sockets one worker serves on: one UDP and one TCP socket per listen address."""

    udp: list[socket.socket] = field(default_factory=list)
    tcp: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.udp + self.tcp:
            sock.close()


def _open_socket(endpoint: Endpoint, kind: socket.SocketKind, port: int) -> socket.socket:
    sock = socket.socket(endpoint.family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RECEIVE_BUFFER)
        if endpoint.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((endpoint.host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(_TCP_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _explain_bind_error(endpoint: Endpoint, exc: OSError) -> StartupError:
    if exc.errno == errno.EACCES:
        reason = (
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE "
            "(e.g. `sudo setcap cap_net_bind_service=+ep \"$(readlink -f \"$(command -v python3)\")\"`), "
            "or listen on a port of 1024 or more"
        )
    elif exc.errno == errno.EADDRINUSE:
        reason = "address already in use (another DNS server, such as systemd-resolved or dnsmasq?)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "no interface of this host has that address"
    else:
        reason = exc.strerror or str(exc)
    return StartupError(f"cannot listen on {endpoint}: {reason}")


def _bind_endpoint(endpoint: Endpoint, count: int) -> list[tuple[socket.socket, socket.socket]]:
    """`count` (UDP, TCP) pairs on one address. Port 0 picks one free port for UDP and TCP alike."""
    for _attempt in range(_PORT_ZERO_RETRIES):
        pairs: list[tuple[socket.socket, socket.socket]] = []
        port = endpoint.port
        try:
            for _ in range(count):
                udp = _open_socket(endpoint, socket.SOCK_DGRAM, port)
                port = udp.getsockname()[1]
                try:
                    tcp = _open_socket(endpoint, socket.SOCK_STREAM, port)
                except BaseException:
                    udp.close()
                    raise
                pairs.append((udp, tcp))
            return pairs
        except OSError as exc:
            for udp, tcp in pairs:
                udp.close()
                tcp.close()
            if not (endpoint.port == 0 and exc.errno == errno.EADDRINUSE):
                raise _explain_bind_error(endpoint, exc) from None
    raise StartupError(f"cannot listen on {endpoint}: found no port free for both UDP and TCP")


def bind_sockets(endpoints: tuple[Endpoint, ...], workers: int) -> list[SocketSet]:
    """One SocketSet per worker; everything is closed again if any address cannot be bound."""
    sets = [SocketSet() for _ in range(workers)]
    try:
        for endpoint in endpoints:
            for socket_set, (udp, tcp) in zip(sets, _bind_endpoint(endpoint, workers), strict=True):
                socket_set.udp.append(udp)
                socket_set.tcp.append(tcp)
    except BaseException:
        for socket_set in sets:
            socket_set.close()
        raise
    return sets


def bound_addresses(socket_set: SocketSet) -> list[str]:
    """`udp+tcp 127.0.0.1:5300` for each listen address of a set (ports resolved when 0 was asked)."""
    out = []
    for sock in socket_set.udp:
        host, port = sock.getsockname()[:2]
        out.append(f"udp+tcp {Endpoint(host, port)}")
    return out


def load_policy_and_lists(config: Config, verified: Path | None = None) -> tuple[Catalog, PolicyMaker, Lists]:
    """The catalogue, the policy maker (with the default policy) and the lists, or a StartupError or
    ConfigError saying what is wrong. `verified`: the node's link to its last verified list, for a worker
    or the admin process that finds the list file mid-rewrite (see Lists)."""
    try:
        catalog = load_catalog(Path(config.lists.catalog) if config.lists.catalog else None)
        path, required = served_path(config.lists)
        lists = Lists(path, catalog, config.lists.hot_names, config.lists.check_interval,
                      cache_dir_of(config.lists), required, verified)
    except BlocklistError as exc:
        raise StartupError(f"lists: {exc}") from None
    maker = PolicyMaker(catalog, answering_from(config.policy), default_policy(config.policy, catalog))
    return catalog, maker, lists


class Worker:
    """Everything one worker process serves with; usable in-process (tests) or under the supervisor."""

    def __init__(self, config: Config, sockets: SocketSet, index: int = 0, metrics_dir: Path | None = None,
                 verified_lists: Path | None = None) -> None:
        self.config = config
        self.sockets = sockets
        self.index = index
        self.metrics_dir = metrics_dir
        catalog, maker, self.lists = load_policy_and_lists(config, verified_lists)
        self.catalog = catalog
        settings = config.store
        self.store = open_store(settings, catalog)
        self.directory = Directory(self.store, maker, catalog, TrustedNetworks(config.identity.trusted_networks),
                                   settings)
        self.resolver = Resolver(AnswerCache(config.cache), Forwarder(config.upstream), self.lists,
                                 self.directory)
        self.in_flight = InFlight()
        self.connections: set[TcpConnection] = set()
        self._udp: list[UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets.udp:
            listener = UdpListener(self.resolver, self.in_flight)
            await loop.create_datagram_endpoint(lambda listener=listener: listener, sock=sock)
            self._udp.append(listener)
        settings = self.config.server
        for sock in self.sockets.tcp:
            server = await loop.create_server(
                lambda: TcpConnection(self.resolver, settings, self.connections, self.in_flight), sock=sock
            )
            self._tcp.append(server)
        self._tasks = [loop.create_task(self.lists.watch()), loop.create_task(self.directory.follow())]
        if self.metrics_dir is not None:
            self._tasks.append(loop.create_task(write_counters(
                self.metrics_dir, self.index, lambda: worker_counters(self.resolver, self.catalog))))

    async def stop(self) -> None:
        """Stop reading, answer what was read, then close: within `server.drain_timeout`."""
        deadline = time.monotonic() + self.config.server.drain_timeout
        for listener in self._udp:
            listener.draining = True
        for server in self._tcp:
            server.close()
        for connection in list(self.connections):
            connection.drain()
        await self.in_flight.drained(max(deadline - time.monotonic(), 0))
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for listener in self._udp:
            listener.close()
        for task in self._tasks:
            task.cancel()
        if self.store is not None:
            await self.store.close()
        self.resolver.close()


async def _serve_until_signalled(config: Config, sockets: SocketSet, index: int, metrics_dir: Path | None,
                                 verified_lists: Path | None) -> int:
    worker = Worker(config, sockets, index, metrics_dir, verified_lists)
    await worker.start()
    # A worker's heap grows with the clients and sites it holds (100 MB and more); a full collection walks
    # all of it and stalls every query meanwhile. What exists at start-up is set aside for good, and
    # collections run less often: the query path makes few reference cycles.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    log.debug("worker %d ready", index)
    await stop.wait()
    log.debug("worker %d stopping", index)
    await worker.stop()
    return 0


_GC_THRESHOLDS = (20_000, 20, 100)


def run_worker(config: Config, sockets: SocketSet, index: int, metrics_dir: Path | None = None,
               verified_lists: Path | None = None) -> int:
    return uvloop.run(_serve_until_signalled(config, sockets, index, metrics_dir, verified_lists))


ADMIN = -1  # the admin process's index among the children
_VERIFIED_LIST = "lists.bns"  # in the run directory: a link to the last list the node verified


class Supervisor:
    """Forks the workers, replaces one that dies, and stops them all on SIGTERM or SIGINT."""

    _RESPAWN_WINDOW = 5.0  # a worker that dies sooner than this after starting counts as a crash loop
    _MAX_QUICK_DEATHS = 5

    def __init__(self, config: Config, socket_sets: list[SocketSet], http: HttpSockets | None = None,
                 run_dir: Path | None = None) -> None:
        """`run_dir`: this node's directory (metrics, its last verified list), removed when it stops."""
        self.config = config
        self.socket_sets = socket_sets
        self.http = http or HttpSockets(None, [])
        self.metrics_dir = run_dir
        self.verified_lists = run_dir / _VERIFIED_LIST if run_dir is not None else None
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
        self.stopping = False
        self._quick_deaths = 0

    def run(self) -> int:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)
        for index in range(len(self.socket_sets)):
            self._spawn(index)
        if self.http.admin is not None or self.http.pages or self.config.store.redis:
            self._spawn(ADMIN)
        log.info(
            "serving DNS on %s with %d worker%s",
            ", ".join(bound_addresses(self.socket_sets[0])),
            len(self.socket_sets),
            "" if len(self.socket_sets) == 1 else "s",
        )
        if self.http.admin is not None:
            log.info("admin API on http://%s/", _endpoint_of(self.http.admin))
        if self.http.pages:
            log.info("block and warning pages on %s", ", ".join(f"http://{_endpoint_of(s)}/" for s in self.http.pages))
        failed = False
        while self.children:
            pid, status = os.wait()
            index, started = self.children.pop(pid, (-1, 0.0))
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                failed |= code != 0
                continue
            log.error("%s (pid %d) exited with %s", "admin process" if index == ADMIN else f"worker {index}", pid,
                      code)
            self._quick_deaths = self._quick_deaths + 1 if time.monotonic() - started < self._RESPAWN_WINDOW else 0
            if self._quick_deaths >= self._MAX_QUICK_DEATHS:
                log.error("workers keep dying at start-up; stopping")
                self._stop_children()
                failed = True
                continue
            time.sleep(min(0.1 * 2**self._quick_deaths, 5.0))
            if not self.stopping:
                self._spawn(index)
        for socket_set in self.socket_sets:
            socket_set.close()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("stopped")
        return 1 if failed else 0

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("%s: stopping (draining for up to %.1f s)", signal.Signals(signum).name,
                     self.config.server.drain_timeout)
        self._stop_children()

    def _stop_children(self) -> None:
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _spawn(self, index: int) -> None:
        # Stop signals stay blocked across fork until the child's event loop has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent(parent)
                for signum in _STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                for other, socket_set in enumerate(self.socket_sets):
                    if other != index:
                        socket_set.close()
                if index == ADMIN:
                    from resolver.admin.process import run_admin  # noqa: PLC0415  (aiohttp: admin only)

                    _yield_to_workers(self.config.admin)

                    code = run_admin(self.config, self.http, self.metrics_dir or Path("."), self.verified_lists)
                else:
                    self.http.close()
                    code = run_worker(self.config, self.socket_sets[index], index, self.metrics_dir,
                                      self.verified_lists)
            except BaseException:
                log.exception("%s failed", "the admin process" if index == ADMIN else f"worker {index}")
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())  # known before a pending stop signal is handled
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if self.stopping:  # a stop arrived while forking: make sure the new child hears it too
            self._stop_children()


def _yield_to_workers(settings: AdminSettings) -> None:
    """API work must not delay answers: the admin process runs niced and, where the kernel offers it, under
    SCHED_IDLE, so that a worker woken by a query takes the CPU from it at once (it still gets a share)."""
    os.nice(settings.niceness)
    if settings.idle_scheduling and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.warning("admin process: cannot use SCHED_IDLE (%s); running niced only", exc.strerror)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A supervisor killed outright (SIGKILL, OOM) cannot stop its children: have the kernel send them
    SIGTERM then, so that no orphan keeps the port and the CPU. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def serve(config: Config) -> int:
    """Check, bind, fork, supervise. A bad list, policy or address fails here, before anything runs."""
    run_dir = cache_dir_of(config.lists) / f"run-{os.getpid()}"  # this node's: metrics, its last list
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"lists.cache_dir: cannot create {run_dir}: {exc.strerror}") from None
    try:
        load_policy_and_lists(config, run_dir / _VERIFIED_LIST)
        socket_sets = bind_sockets(config.server.listen, config.server.worker_count)
        http = bind_http_sockets(config)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Supervisor(config, socket_sets, http, run_dir).run()


@dataclass
class HttpSockets:
    """The admin process's listening sockets, bound by the supervisor so that a bad address fails start-up."""

    admin: socket.socket | None
    pages: list[socket.socket]

    def close(self) -> None:
        for sock in (self.admin, *self.pages):
            if sock is not None:
                sock.close()


def bind_http_sockets(config: Config) -> HttpSockets:
    admin = _bind_http(config.admin.listen, "admin.listen") if config.admin.listen is not None else None
    pages = []
    if config.pages.serve:
        addresses = dict.fromkeys((*config.policy.block_page, *config.policy.warning_page))
        pages = [_bind_http(Endpoint(address, config.pages.port), "pages.port",
                            "policy.block_page and policy.warning_page must be addresses of this machine, or set "
                            "pages.serve = false when another server shows the pages")
                 for address in addresses]
    return HttpSockets(admin, pages)


def _bind_http(endpoint: Endpoint, key: str, elsewhere: str = "the address must be one of this machine's"
               ) -> socket.socket:
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = f" (another bns serve? set {key})"
        elif exc.errno == errno.EACCES and endpoint.port < 1024:
            hint = f" (ports below 1024 need root or CAP_NET_BIND_SERVICE; set {key})"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = f" ({elsewhere})"
        raise StartupError(f"{key}: cannot bind {endpoint}: {exc.strerror}{hint}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _endpoint_of(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)
