"""What every bench needs: query names, free ports, servers started as processes, machine facts, medians."""

from __future__ import annotations

import contextlib
import gzip
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.redis_processes import RedisServer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


def top_site_names(data: Path, count: int) -> list[str]:
    """The first `count` names of the Umbrella top-sites workload, or synthetic names if it is absent."""
    path = data / "queries" / "top-sites.txt.gz"
    if not path.exists():
        print(f"note: {path} not found; using {count} synthetic names", file=sys.stderr)
        return [f"site{index}.bench.example" for index in range(count)]
    names = []
    with gzip.open(path, "rt") as lines:
        for line in lines:
            names.append(line.strip().split(",", 1)[1])
            if len(names) >= count:
                break
    return names


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 at the time of asking."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def answers(port: int, name: str = "ready.bench.example", timeout: float = 0.2) -> bool:
    wire = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\x00"
    query = struct.pack("!HHHHHH", 4242, 0x0100, 1, 0, 0, 0) + wire + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            reply = sock.recv(4096)
        except OSError:
            return False
        return reply[:2] == query[:2] and reply[3] & 0x0F != 2  # not SERVFAIL: a node not ready says that


@contextlib.contextmanager
def started(command: list[str], *, log: Path | None = None, cwd: Path = REPO) -> Iterator[subprocess.Popen[bytes]]:
    """A process, its output to `log` (or nowhere); stopped with SIGTERM (SIGKILL if it will not) at the end."""
    sink = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            sink.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def running(
    command: list[str], port: int, *, startup: float = 15.0, log: Path | None = None, cwd: Path = REPO
) -> Iterator[int]:
    """Start a server process, wait until it answers on `port`, yield its pid, stop it with SIGTERM."""
    with started(command, log=log, cwd=cwd) as process:
        deadline = time.monotonic() + startup
        while not answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} did not start (exit {process.poll()})")
            time.sleep(0.1)
        yield process.pid


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[int]:
    """A redis-server on a free loopback port that keeps nothing on disk; yields its port once it answers."""
    server = RedisServer(directory, persistent=False)
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


def bns_command(port: int, upstream_port: int, workers: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "resolver",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--admin-listen",
        "",
        *extra,
    ]  # no admin API unless asked: benches run servers side by side


def pinned(command: list[str], cores: str) -> list[str]:
    """`command` run on these cores only (taskset's list, such as "0" or "1-3"), where taskset is installed."""
    return ["taskset", "-c", cores, *command] if shutil.which("taskset") else command


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    dnsperf = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        help_text = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True, check=False)
        dnsperf = help_text.stdout + help_text.stderr
        dnsperf = next((line for line in dnsperf.splitlines() if line.startswith("Version")), "")
    return (
        f"{model}, {len(os.sched_getaffinity(0))} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, dnsperf {dnsperf.removeprefix('Version ') or 'absent'}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], fraction: float) -> float:
    """The value `fraction` of the way up the sorted values (1.0: the largest); NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
