"""Processes and sockets: the supervisor binds every socket, forks one worker per core, and stops them cleanly.

Python runs one core per process, so N workers each run their own uvloop event loop, cache and upstream
sockets. Each worker has its own UDP and TCP socket per listen address, all bound with SO_REUSEPORT, so the
kernel spreads clients over the workers. The supervisor binds them all before forking: a bind error (port 53
without privileges, an address in use) is reported once, at start-up, before anything runs. It keeps its
copies so that a worker that dies can be replaced on the same sockets without losing the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import select
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from resolver.shared.certificates import Certificates, load_pair
from resolver.shared.config import AdminSettings, Config, reloaded, shown
from resolver.shared.errors import BnsError, StartupError
from resolver.shared.lists import Lists, cache_dir_of, usable_cache_dir
from resolver.shared.loading import load_policy_and_lists
from resolver.shared.run_directory import RunDirectory
from resolver.shared.signals import CHILD_SIGNALS, STOP_SIGNALS
from resolver.shared.sockets import (
    HttpSockets,
    SocketSet,
    bind_http_sockets,
    bind_sockets,
    bound_addresses,
    check_addresses,
    claim_ports,
    endpoint_of,
)
from resolver.worker.process import run_worker

log = logging.getLogger(__name__)

_PORT_LOCKS = Path(tempfile.gettempdir()) / f"bns-ports-{os.getuid()}"


ADMIN = -1  # the admin process's index among the children


class Supervisor:
    """Forks the workers and the admin process, replaces one that dies, reloads on SIGHUP, and stops them all
    on SIGTERM or SIGINT. Signals only note what happened; the loop in `run` acts on them, between waits."""

    _RESPAWN_WINDOW = 5.0  # a worker that dies sooner than this after starting counts as a crash loop
    _MAX_QUICK_DEATHS = 5

    def __init__(
        self,
        config: Config,
        socket_sets: list[SocketSet],
        http: HttpSockets,
        run: RunDirectory,
        load_config: Callable[[], Config] | None = None,
        certificates: Certificates | None = None,
    ) -> None:
        """`run`: this node's run directory, removed when it stops. `load_config`: reads the configuration
        again (the file and the command line's flags) on SIGHUP. `certificates`: the DoT and DoH listeners'
        (made before the workers are forked: see certificates.py)."""
        self.config = config
        self.certificates = certificates
        self.socket_sets = socket_sets
        self.http = http
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
        for handled in (*CHILD_SIGNALS, signal.SIGCHLD):
            signal.signal(handled, self._note_signal)
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
            log.info("admin API on http://%s/", endpoint_of(self.http.admin))
            if not self.config.admin.tokens and not self.config.admin.read_tokens:
                log.warning(
                    "admin API: no token is configured, so it answers /health and site tokens only and "
                    "refuses everything else (401); set admin.tokens, or $BNS_ADMIN_TOKENS "
                    "(e.g. export BNS_ADMIN_TOKENS=$(openssl rand -hex 16)), and restart"
                )
        if self.http.pages:
            log.info("block and warning pages on %s", ", ".join(f"http://{endpoint_of(s)}/" for s in self.http.pages))
        if self.http.device_pages:
            log.info(
                "devices' own warning pages on every address of %s, port %d",
                ", ".join(self.config.pages.device_networks),
                self.config.pages.port,
            )
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
            log.error("%s (pid %d) exited with %s", "admin process" if index == ADMIN else f"worker {index}", pid, code)
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
            log.info(
                "%s: stopping (draining for up to %.1f s)",
                signal.Signals(signum).name,
                self.config.server.drain_timeout,
            )
        self._stop_children()

    def _stop_children(self) -> None:
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _reload(self) -> None:
        """SIGHUP: read the configuration again; apply what can change live, in every process; say what needs
        a restart. A configuration that does not load, or a list that does not verify, changes nothing."""
        if self.load_config is None:
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
            log.warning("SIGHUP: %s changed but needs a restart; still %s", key, shown(self.config, key))
        if not applied:
            if self.certificates is None:
                log.info("SIGHUP: nothing to apply")
                return
            log.info("SIGHUP: nothing to apply but the TLS certificate files, read again if they changed")
        else:
            self.config = config
            logging.getLogger().setLevel(config.log.level.upper())
        self.run_directory.write_config(self.config)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if applied:
            log.info("SIGHUP: applied %s", ", ".join(f"{key} = {shown(config, key)}" for key in applied))

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
                    code = run_worker(
                        self.config, self.socket_sets[index], index, self.run_directory, self.certificates
                    )
            except BaseException:
                log.exception("%s failed", "the admin process" if index == ADMIN else f"worker {index}")
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())  # known before a pending stop signal is handled
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
        if self.stopping:  # a stop arrived while forking: make sure the new child hears it too
            self._stop_children()


def _yield_to_workers(settings: AdminSettings) -> None:
    """API work must not delay answers much, nor starve when the workers take every core (exactly when an
    operator needs to look): the admin process runs niced (10: about a tenth of a core against a busy worker)
    and, only if asked, under SCHED_IDLE (then a worker takes the CPU from it at once, and under load /health
    waits seconds: bench/admin_load.py)."""
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


def raise_descriptor_limit(config: Config) -> None:
    """Every upstream query has a socket of its own (RFC 5452 ports), and a hedged one several: take the hard
    limit on open files, which systemd and containers leave far above the soft 1,024; say so when even that
    is short of what a worker may need at its caps."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    upstream = config.upstream
    attempts = int(upstream.deadline / upstream.timeout) + 1
    tls = config.tls
    encrypted = tls.max_connections if tls.dot_listen or tls.doh_listen else 0
    need = upstream.max_outstanding * attempts + config.server.tcp_max_connections + encrypted + 256
    have = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if have < need:
        log.warning(
            "open files are limited to %d per process; a worker at upstream.max_outstanding, "
            "server.tcp_max_connections%s may need %d (raise `ulimit -n`, or LimitNOFILE= in the unit)",
            have,
            " and tls.max_connections" if encrypted else "",
            need,
        )


def check(config: Config) -> Lists:
    """What `serve` makes sure of before it binds anything, and all that `bns config --check` does, so that
    no configuration passes one and fails the other: the cache directory is usable, the catalogue and the
    list load (or the last list verified for that path stands in), the default policy holds, every
    address to listen on is this machine's, and with DoT or DoH the certificate and its key are readable, a
    pair, valid now and for tls.name (certificates.py). Ports are not tried: the node checked may be the one
    running. Returns the lists, as the workers will find them."""
    usable_cache_dir(config.lists)
    _catalog, _maker, lists = load_policy_and_lists(config)
    check_addresses(config)
    if config.tls.dot_listen or config.tls.doh_listen:
        load_pair(config.tls, time.time())
    return lists


def serve(config: Config, load_config: Callable[[], Config] | None = None) -> int:
    """Check, bind, fork, supervise. A bad list, policy or address fails here, before anything runs."""
    raise_descriptor_limit(config)
    lists = check(config)
    try:
        run = RunDirectory.create(cache_dir_of(config.lists))
    except OSError as exc:
        raise StartupError(
            f"lists.cache_dir: cannot create a run directory in {cache_dir_of(config.lists)}: {exc.strerror}"
        ) from None
    try:
        certificates = Certificates(config.tls) if config.tls.dot_listen or config.tls.doh_listen else None
        claim_ports(config, _PORT_LOCKS)
        socket_sets = bind_sockets(config, config.server.worker_count)
        http = bind_http_sockets(config)
    except BaseException:
        run.remove()
        raise
    following = "; the version published through Redis replaces it once learnt" if config.store.redis else ""
    log.info("lists: %s%s", lists.describe(), following)
    log.info("upstreams: %s", ", ".join(str(endpoint) for endpoint in config.upstream.servers))
    return Supervisor(config, socket_sets, http, run, load_config, certificates).run()
