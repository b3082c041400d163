"""Sockets the supervisor binds for the processes it starts: DNS (UDP and TCP per listen address and worker, and TCP
per DoT and DoH address and worker, sharing ports with SO_REUSEPORT, one instance per port) and HTTP (the admin API
and the pages)."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from resolver.shared.config import Config, Endpoint
from resolver.shared.errors import StartupError
from resolver.shared.page_pool import PagePool

_UDP_RECEIVE_BUFFER = 4 << 20  # absorbs bursts while the loop is busy; the kernel caps it at rmem_max

_TCP_BACKLOG = 1024

_PORT_ZERO_RETRIES = 20


@dataclass
class SocketSet:
    """The sockets one worker serves on: one UDP and one TCP socket per listen address, one TCP socket per DoT
    and per DoH address."""

    udp: list[socket.socket] = field(default_factory=list)
    tcp: list[socket.socket] = field(default_factory=list)
    dot: list[socket.socket] = field(default_factory=list)
    doh: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.udp + self.tcp + self.dot + self.doh:
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
            '(e.g. `sudo setcap cap_net_bind_service=+ep "$(readlink -f "$(command -v python3)")"`), '
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


def _bind_stream(endpoint: Endpoint, count: int) -> list[socket.socket]:
    """`count` TCP sockets on one address (DoT, DoH); port 0 picks one port for all of them."""
    sockets: list[socket.socket] = []
    port = endpoint.port
    try:
        for _ in range(count):
            sockets.append(_open_socket(endpoint, socket.SOCK_STREAM, port))
            port = sockets[-1].getsockname()[1]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise _explain_bind_error(endpoint, exc) from None
    return sockets


# What each listen setting serves: UDP and TCP, or TCP alone.
_BOTH = (socket.SOCK_DGRAM, socket.SOCK_STREAM)
_STREAM = (socket.SOCK_STREAM,)


def listen_settings(config: Config) -> list[tuple[str, tuple[Endpoint, ...], tuple[socket.SocketKind, ...]]]:
    """(key, its addresses, the socket kinds each takes) of every DNS listen setting."""
    return [
        ("server.listen", config.server.listen, _BOTH),
        ("tls.dot_listen", config.tls.dot_listen, _STREAM),
        ("tls.doh_listen", config.tls.doh_listen, _STREAM),
    ]


def claim_ports(config: Config, lock_dir: Path) -> None:
    """Make sure no other process serves these addresses, and that none can start to while we run.

    SO_REUSEPORT, which lets our workers share a port, would as well let a second `bns serve` (or any
    server of the same user that sets it) share it silently, and the kernel would then spread clients over
    both: some would be answered by a server without the list. So before binding, each address is probed
    with a socket that does not share (any server on it makes that bind fail), and a lock file per address,
    held by this supervisor and (inherited) its workers until they all exit, stops a second bns started at
    the same moment."""
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    locks: list[int] = []
    claims = [(key, endpoint, kinds) for key, endpoints, kinds in listen_settings(config) for endpoint in endpoints]
    try:
        for key, endpoint, kinds in claims:
            if endpoint.port == 0:
                continue  # a port the kernel picks is nobody's
            path = lock_dir / f"{endpoint.host}-{endpoint.port}{'' if kinds == _BOTH else '-tcp'}.lock"
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            locks.append(descriptor)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
                raise StartupError(
                    f"cannot listen on {endpoint}: another bns serve (pid {holder}) serves it; stop "
                    f"it first, or choose another {key}"
                ) from None
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            for kind in kinds:
                _probe(endpoint, kind, key)
    except BaseException:
        for descriptor in locks:
            os.close(descriptor)
        raise


def _probe(endpoint: Endpoint, kind: socket.SocketKind, key: str) -> None:
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
                f"stop it or choose another {key}"
            ) from None


def port_owner(endpoint: Endpoint, protocol: str) -> str | None:
    """ "pid 1234, dnsmasq" for the process holding a socket bound to `endpoint` (as far as /proc lets this
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
        if int(port, 16) == endpoint.port and listening and _proc_address(address) in (endpoint.host, "0.0.0.0", "::"):
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


def bind_sockets(config: Config, workers: int) -> list[SocketSet]:
    """One SocketSet per worker; everything is closed again if any address cannot be bound."""
    sets = [SocketSet() for _ in range(workers)]
    try:
        for endpoint in config.server.listen:
            for socket_set, (udp, tcp) in zip(sets, _bind_endpoint(endpoint, workers), strict=True):
                socket_set.udp.append(udp)
                socket_set.tcp.append(tcp)
        for endpoint in config.tls.dot_listen:
            for socket_set, sock in zip(sets, _bind_stream(endpoint, workers), strict=True):
                socket_set.dot.append(sock)
        for endpoint in config.tls.doh_listen:
            for socket_set, sock in zip(sets, _bind_stream(endpoint, workers), strict=True):
                socket_set.doh.append(sock)
    except BaseException:
        for socket_set in sets:
            socket_set.close()
        raise
    return sets


def bound_addresses(socket_set: SocketSet) -> list[str]:
    """`udp+tcp 127.0.0.1:5300`, `dot 127.0.0.1:853`, `doh 127.0.0.1:443` for each listen address of a set (ports
    resolved when 0 was asked)."""
    return [
        f"{kind} {endpoint_of(sock)}"
        for kind, sockets in (("udp+tcp", socket_set.udp), ("dot", socket_set.dot), ("doh", socket_set.doh))
        for sock in sockets
    ]


@dataclass
class HttpSockets:
    """The admin process's listening sockets, bound by the supervisor so that a bad address fails start-up."""

    admin: socket.socket | None
    pages: list[socket.socket]
    device_pages: list[socket.socket] = field(default_factory=list)  # one per address of pages.device_networks

    def close(self) -> None:
        for sock in (self.admin, *self.pages, *self.device_pages):
            if sock is not None:
                sock.close()


_PAGES_ELSEWHERE = "the pages are served there: set pages.serve = false when another server shows them"
_DEVICE_PAGES_ELSEWHERE = (
    "on Linux a route such as `ip route add local 198.51.100.0/28 dev lo` makes a whole network local"
)


def check_addresses(config: Config) -> None:
    """Every address the node would listen on is one of this machine's, else a StartupError naming the
    setting. Only the address is tried (a socket bound to port 0): the ports may be the running node's."""
    wanted = [(key, endpoint.host, "") for key, endpoints, _kinds in listen_settings(config) for endpoint in endpoints]
    if config.admin.listen is not None:
        wanted.append(("admin.listen", config.admin.listen.host, ""))
    if config.pages.serve:
        wanted += [("policy.block_page", address, _PAGES_ELSEWHERE) for address in config.policy.block_page]
        wanted += [("policy.warning_page", address, _PAGES_ELSEWHERE) for address in config.policy.warning_page]
    pool = PagePool(config.pages.device_networks).addresses()
    wanted += [("pages.device_networks", address, _DEVICE_PAGES_ELSEWHERE) for address in pool]
    for key, host, hint in wanted:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, 0))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise StartupError(
                        f"{key}: {host} is not an address of this machine{f'; {hint}' if hint else ''}"
                    ) from None
                raise StartupError(f"{key}: cannot listen on {host}: {exc.strerror}") from None


def bind_http_sockets(config: Config) -> HttpSockets:
    admin = _bind_http(config.admin.listen, "admin.listen") if config.admin.listen is not None else None
    pages = []
    if config.pages.serve:
        addresses = dict.fromkeys((*config.policy.block_page, *config.policy.warning_page))
        pages = [
            _bind_http(Endpoint(address, config.pages.port), "pages.port", _PAGES_ELSEWHERE) for address in addresses
        ]
    http = HttpSockets(admin, pages)
    try:
        for address in PagePool(config.pages.device_networks).addresses():
            http.device_pages.append(
                _bind_http(Endpoint(address, config.pages.port), "pages.device_networks", _DEVICE_PAGES_ELSEWHERE)
            )
    except BaseException:
        http.close()
        raise
    return http


def _bind_http(
    endpoint: Endpoint, key: str, elsewhere: str = "the address must be one of this machine's"
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


def endpoint_of(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)
