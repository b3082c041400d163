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
import fcntl
import gc
import ipaddress
import logging
import os
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from blocklists.catalog import Catalog, load_catalog
from blocklists.errors import BlocklistError
from resolver.cache import AnswerCache
from resolver.config import AdminSettings, Config, Endpoint, reloaded
from resolver.errors import BnsError, StartupError
from resolver.identity import TrustedNetworks
from resolver.listener import InFlight, TcpConnection, UdpListener
from resolver.lists import Lists, cache_dir_of, served_path, verified_link
from resolver.metrics import worker_counters, write_counters
from resolver.pipeline import Resolver
from resolver.policy.directory import Directory
from resolver.policy.effective import PolicyMaker, answering_from, default_policy
from resolver.policy.store import open_store
from resolver.run_directory import UNSET, RunDirectory
from resolver.signals import CHILD_SIGNALS, STOP_SIGNALS, handle_signals
from resolver.upstream import Forwarder

log = logging.getLogger(__name__)

_UDP_RECEIVE_BUFFER = 4 << 20  # absorbs bursts while the loop is busy; the kernel caps it at rmem_max
_TCP_BACKLOG = 1024
_PORT_ZERO_RETRIES = 20
_PORT_LOCKS = Path(tempfile.gettempdir()) / f"bns-ports-{os.getuid()}"


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


def claim_ports(endpoints: tuple[Endpoint, ...], lock_dir: Path) -> None:
    """Make sure no other process serves these addresses, and that none can start to while we run.

    SO_REUSEPORT, which lets our workers share a port, would as well let a second `bns serve` (or any
    server of the same user that sets it) share it silently, and the kernel would then spread clients over
    both: some would be answered by a server without the list. So before binding, each address is probed
    with a socket that does not share (any server on it makes that bind fail), and a lock file per address,
    held by this supervisor and (inherited) its workers until they all exit, stops a second bns started at
    the same moment."""
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    locks: list[int] = []
    try:
        for endpoint in endpoints:
            if endpoint.port == 0:
                continue  # a port the kernel picks is nobody's
            path = lock_dir / f"{endpoint.host}-{endpoint.port}.lock"
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            locks.append(descriptor)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
                raise StartupError(f"cannot listen on {endpoint}: another bns serve (pid {holder}) serves it; stop "
                                   f"it first, or choose another server.listen") from None
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                _probe(endpoint, kind)
    except BaseException:
        for descriptor in locks:
            os.close(descriptor)
        raise


def _probe(endpoint: Endpoint, kind: socket.SocketKind) -> None:
    with socket.socket(endpoint.family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a past run is no owner
        if endpoint.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((endpoint.host, endpoint.port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise _explain_bind_error(endpoint, exc) from None
            protocol = "udp" if kind == socket.SOCK_DGRAM else "tcp"
            owner = port_owner(endpoint, protocol)
            raise StartupError(
                f"cannot listen on {endpoint}: address already in use: another process serves {protocol} there"
                f"{f' ({owner})' if owner else ''}; find it with `ss -{protocol[0]}lnp 'sport = :{endpoint.port}'`, "
                f"stop it or choose another server.listen") from None


def port_owner(endpoint: Endpoint, protocol: str) -> str | None:
    """"pid 1234, dnsmasq" for the process holding a socket bound to `endpoint` (as far as /proc lets this
    user see), else None."""
    family = "6" if endpoint.family == socket.AF_INET6 else ""
    inodes = set()
    try:
        lines = Path(f"/proc/net/{protocol}{family}").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        address, _, port = fields[1].partition(":")
        listening = protocol == "udp" or fields[3] == "0A"
        if int(port, 16) == endpoint.port and listening and _proc_address(address) in (
                endpoint.host, "0.0.0.0", "::"):
            inodes.add(f"socket:[{fields[9]}]")
    for process in Path("/proc").iterdir():
        if not process.name.isdigit() or int(process.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (process / "fd").iterdir()):
                return f"pid {process.name}, {(process / 'comm').read_text().strip()}"
        except OSError:
            continue
    return None


def _proc_address(text: str) -> str:
    """An address as /proc/net writes it (32-bit words in host order, hex) in its usual form."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return ipaddress.ip_address(words).compressed


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


def load_policy_and_lists(config: Config) -> tuple[Catalog, PolicyMaker, Lists]:
    """The catalogue, the policy maker (with the default policy) and the lists, or a StartupError or
    ConfigError saying what is wrong. A list file found corrupt is replaced by the last list this node
    verified for its path (see Lists), if it has one."""
    try:
        catalog = load_catalog(Path(config.lists.catalog) if config.lists.catalog else None)
        path, required = served_path(config.lists)
        lists = Lists(path, catalog, config.lists.hot_names, config.lists.check_interval,
                      cache_dir_of(config.lists), required, verified_link(config.lists))
    except BlocklistError as exc:
        raise StartupError(f"lists: {exc} (and this node holds no earlier verified list for that path)") from None
    return catalog, policy_maker(config, catalog), lists


def policy_maker(config: Config, catalog: Catalog) -> PolicyMaker:
    return PolicyMaker(catalog, answering_from(config.policy), default_policy(config.policy, catalog))


_NOT_READY_LOG_INTERVAL = 5.0
_READY_POLL = 0.05


class Worker:
    """Everything one worker process serves with; usable in-process (tests) or under the supervisor.

    `run`: the node's run directory (counters, reloaded configuration, the list target). A worker of a node
    that follows lists published through Redis answers nothing but SERVFAIL with EDE 14 "Not Ready" until
    it serves the version the admin process set as the target there: a node must never answer from no list,
    or an old one, while the list it should serve is on its way (see README, "Starting")."""

    def __init__(self, config: Config, sockets: SocketSet, index: int = 0, run: RunDirectory | None = None
                 ) -> None:
        self.config = config
        self.sockets = sockets
        self.index = index
        self.run = run
        catalog, maker, self.lists = load_policy_and_lists(config)
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

    @property
    def ready(self) -> bool:
        return not self.resolver.held

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.run is not None and self.config.store.redis:
            self.resolver.hold()
            self._tasks.append(loop.create_task(self._release_when_lists_are_in(self.run)))
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
        self._tasks += [loop.create_task(self.lists.watch()), loop.create_task(self.directory.follow())]
        if self.run is not None:
            self._tasks.append(loop.create_task(write_counters(
                self.run.path, self.index,
                lambda: {**worker_counters(self.resolver, self.catalog), "ready": self.ready,
                         "lists_fallback": self.lists.fallback})))

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
                log.warning("worker %d: not answering yet (SERVFAIL, EDE 14) for %.0f s: %s", self.index,
                            time.monotonic() - started,
                            "waiting for the admin process to learn the current list from Redis" if target is UNSET
                            else f"waiting for list version {target} (serving {self.lists.snapshot.version})")
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
        if config.upstream != old.upstream:
            retired, self.resolver.forwarder = self.resolver.forwarder, Forwarder(config.upstream)
            # queries already sent keep their sockets until they are answered or give up
            asyncio.get_running_loop().call_later(old.upstream.deadline + 1, retired.close)

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


async def _serve_until_signalled(config: Config, sockets: SocketSet, index: int, run: RunDirectory | None) -> int:
    worker = Worker(config, sockets, index, run)
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


def run_worker(config: Config, sockets: SocketSet, index: int, run: RunDirectory | None = None) -> int:
    return uvloop.run(_serve_until_signalled(config, sockets, index, run))


ADMIN = -1  # the admin process's index among the children


class Supervisor:
    """Forks the workers and the admin process, replaces one that dies, reloads on SIGHUP, and stops them all
    on SIGTERM or SIGINT. Signals only note what happened; the loop in `run` acts on them, between waits."""

    _RESPAWN_WINDOW = 5.0  # a worker that dies sooner than this after starting counts as a crash loop
    _MAX_QUICK_DEATHS = 5

    def __init__(self, config: Config, socket_sets: list[SocketSet], http: HttpSockets | None = None,
                 run: RunDirectory | None = None, load_config: Callable[[], Config] | None = None) -> None:
        """`run`: this node's run directory, removed when it stops. `load_config`: reads the configuration
        again (the file and the command line's flags) on SIGHUP."""
        self.config = config
        self.socket_sets = socket_sets
        self.http = http or HttpSockets(None, [])
        self.run_directory = run
        self.load_config = load_config
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
        self.stopping = False
        self._quick_deaths = 0
        self._signals: list[int] = []

    def run(self) -> int:
        wakeup, self._wakeup = socket.socketpair()
        wakeup.setblocking(False)
        self._wakeup.setblocking(False)
        signal.set_wakeup_fd(self._wakeup.fileno(), warn_on_full_buffer=False)
        for signum in (*CHILD_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, self._note_signal)
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
            select.select([wakeup], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                while wakeup.recv(4096):
                    pass
            noted, self._signals = self._signals, []
            for signum in noted:
                if signum in STOP_SIGNALS:
                    self._on_stop_signal(signum)
                elif signum == signal.SIGHUP and not self.stopping:
                    self._reload()
            failed |= self._reap()
        signal.set_wakeup_fd(-1)
        for socket_set in self.socket_sets:
            socket_set.close()
        if self.run_directory is not None:
            self.run_directory.remove()
        log.info("stopped")
        return 1 if failed else 0

    def _note_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _reap(self) -> bool:
        """Collect the children that exited; replace them unless stopping. True if a stop went wrong."""
        failed = False
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return failed
            if pid == 0:
                return failed
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
        return failed

    def _on_stop_signal(self, signum: int) -> None:
        if not self.stopping:
            log.info("%s: stopping (draining for up to %.1f s)", signal.Signals(signum).name,
                     self.config.server.drain_timeout)
        self._stop_children()

    def _stop_children(self) -> None:
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _reload(self) -> None:
        """SIGHUP: read the configuration again; apply what can change live, in every process; say what needs
        a restart. A configuration that does not load, or a list that does not verify, changes nothing."""
        if self.load_config is None or self.run_directory is None:
            log.info("SIGHUP: nothing to reload from")
            return
        try:
            config, applied, needs_restart = reloaded(self.config, self.load_config())
            if applied:
                load_policy_and_lists(config)  # the new list and default policy must be usable
        except BnsError as exc:
            log.error("SIGHUP: configuration not reloaded, still running as before: %s", exc)
            return
        for key in needs_restart:
            log.warning("SIGHUP: %s changed but needs a restart; still %s", key, _value_of(self.config, key))
        if not applied:
            log.info("SIGHUP: nothing to apply")
            return
        self.config = config
        self.run_directory.write_config(config)
        logging.getLogger().setLevel(config.log.level.upper())
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        log.info("SIGHUP: applied %s", ", ".join(f"{key} = {_value_of(config, key)}" for key in applied))

    def _spawn(self, index: int) -> None:
        # Signals stay blocked across fork until the child's event loop has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent(parent)
                signal.set_wakeup_fd(-1)
                self._wakeup.close()
                for signum in (*CHILD_SIGNALS, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                for other, socket_set in enumerate(self.socket_sets):
                    if other != index:
                        socket_set.close()
                if index == ADMIN:
                    from resolver.admin.process import run_admin  # noqa: PLC0415  (aiohttp: admin only)

                    _yield_to_workers(self.config.admin)

                    code = run_admin(self.config, self.http, self.run_directory)
                else:
                    self.http.close()
                    code = run_worker(self.config, self.socket_sets[index], index, self.run_directory)
            except BaseException:
                log.exception("%s failed", "the admin process" if index == ADMIN else f"worker {index}")
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())  # known before a pending stop signal is handled
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
        if self.stopping:  # a stop arrived while forking: make sure the new child hears it too
            self._stop_children()


def _value_of(config: Config, key: str) -> object:
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    return [str(item) for item in value] if isinstance(value, tuple) else value


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


def serve(config: Config, load_config: Callable[[], Config] | None = None) -> int:
    """Check, bind, fork, supervise. A bad list, policy or address fails here, before anything runs."""
    try:
        run = RunDirectory.create(cache_dir_of(config.lists))
    except OSError as exc:
        raise StartupError(f"lists.cache_dir: cannot create a run directory in {cache_dir_of(config.lists)}: "
                           f"{exc.strerror}") from None
    try:
        load_policy_and_lists(config)
        claim_ports(config.server.listen, _PORT_LOCKS)
        socket_sets = bind_sockets(config.server.listen, config.server.worker_count)
        http = bind_http_sockets(config)
    except BaseException:
        run.remove()
        raise
    return Supervisor(config, socket_sets, http, run, load_config).run()


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
