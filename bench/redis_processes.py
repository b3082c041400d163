"""Real redis-server and redis-sentinel processes on free loopback ports, for the tests and the benches:
one server that can be killed, frozen and restarted with its data, or a Sentinel deployment."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class RedisServer:
    """A real redis-server on a free loopback port, with its data in a temporary directory (append-only
    file, fsync always) so that it can be killed and started again with everything it had."""

    def __init__(self, directory: Path, *extra: str, persistent: bool = True) -> None:
        """`extra`: more redis-server arguments (`--replicaof 127.0.0.1 6379`). Not `persistent`: nothing is
        kept on disk (the benches, which load millions of keys)."""
        self.directory = directory
        self.extra = extra
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *self.persistence,
                "--dir",
                str(self.directory),
                "--protected-mode",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.ping():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> bytes:
        """One command over a raw connection (RESP), for the few things tests do behind the store's back."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            connection.sendall(payload.encode())
            return connection.recv(65536)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SentinelDeployment:
    """A primary, two replicas and three sentinels (quorum 2), as a deployment that must survive the loss of
    its primary would run them; down after 1 s, so a failover takes a few seconds."""

    SERVICE = "bns"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[RedisServer] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://{hosts}/{self.SERVICE}/0"

    def start(self) -> None:
        primary = RedisServer(self.directory / "primary")
        self.servers.append(primary)
        for server_index in range(2):
            self.servers.append(
                RedisServer(self.directory / f"replica{server_index}", "--replicaof", "127.0.0.1", str(primary.port))
            )
        for server in self.servers:
            server.directory.mkdir(parents=True)
            server.start()
        binary = shutil.which("redis-sentinel")
        assert binary is not None
        for sentinel_index in range(3):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            config = self.directory / f"sentinel{sentinel_index}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.directory}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 10000\n"
            )
            self.sentinels.append(
                subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            self.sentinel_ports.append(port)
        deadline = time.monotonic() + 20
        while not (self.primary_port() == primary.port and all(self._replicas_known(p) for p in self.sentinel_ports)):
            assert time.monotonic() < deadline, "the sentinels did not come up"
            time.sleep(0.1)

    def _ask(self, port: int, *args: str) -> bytes:
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(payload.encode())
                return connection.recv(65536)
        except OSError:
            return b""

    def _replicas_known(self, port: int) -> bool:
        reply = self._ask(port, "SENTINEL", "REPLICAS", self.SERVICE)
        return reply.count(b"slave") >= 2 and b"s_down" not in reply

    def primary_port(self) -> int | None:
        """The primary as the first sentinel that answers sees it."""
        for port in self.sentinel_ports:
            reply = self._ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
            parts = reply.split(b"\r\n")
            if len(parts) >= 5:
                return int(parts[4])
        return None

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.terminate()
            sentinel.wait(10)
        for server in self.servers:
            server.stop()
