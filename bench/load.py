"""Load generation: dnsperf when it is installed, a Python (uvloop) generator otherwise; and process CPU time.

Both drivers return a LoadResult with throughput and latency percentiles. Latency percentiles come from
per-query timings (dnsperf -v, or our own), so runs that need them are rate-limited to keep the generator
itself from being the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import percentile, pinned

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class LoadResult:
    sent: int
    completed: int
    seconds: float
    rcodes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, when measured per query
    average_latency: float = 0.0
    generator_cpu: float = 0.0  # CPU seconds the load generator itself spent

    @property
    def qps(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.completed

    def percentile(self, fraction: float) -> float:
        return percentile(self.latencies, fraction)


def have_dnsperf() -> bool:
    return shutil.which("dnsperf") is not None


def write_query_file(names: list[str], path: Path, qtype: str = "A") -> Path:
    path.write_text("".join(f"{name} {qtype}\n" for name in names))
    return path


def run_dnsperf(
    port: int,
    query_file: Path,
    *,
    seconds: float | None = None,
    runs: int | None = None,
    clients: int = 4,
    outstanding: int = 200,
    max_qps: int | None = None,
    per_query: bool = False,
    tcp: bool = False,
    binary: bool = False,
    host: str = "127.0.0.1",
    cores: str | None = None,
) -> LoadResult:
    """dnsperf against `port` (on `cores` only, if given: taskset's list)."""
    command = [
        "dnsperf",
        "-s",
        host,
        "-p",
        str(port),
        "-d",
        str(query_file),
        "-c",
        str(clients),
        "-q",
        str(outstanding),
        "-t",
        "2",
    ]
    if seconds is not None:
        command += ["-l", str(seconds)]
    if runs is not None:
        command += ["-n", str(runs)]
    if max_qps is not None:
        command += ["-Q", str(max_qps)]
    if per_query:
        command.append("-v")
    if tcp:
        command += ["-m", "tcp"]
    if binary:
        command.append("-B")  # the file holds wire queries, each after a two-byte length
    if cores is not None:
        command = pinned(command, cores)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse_dnsperf(output)
    result.generator_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def parse_dnsperf(output: str) -> LoadResult:
    def number(label: str) -> float:
        match = re.search(rf"{label}:\s+([\d.]+)", output)
        if match is None:
            raise ValueError(f"dnsperf output has no {label!r}:\n{output[-2000:]}")
        return float(match.group(1))

    result = LoadResult(
        sent=int(number("Queries sent")),
        completed=int(number("Queries completed")),
        seconds=number(r"Run time \(s\)"),
        average_latency=number(r"Average Latency \(s\)"),
    )
    codes = re.search(r"Response codes:\s+(.*)", output)
    if codes:
        for code, count in re.findall(r"([A-Z]+) (\d+)", codes.group(1)):
            result.rcodes[code] = int(count)
    result.latencies = [float(value) for value in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", output, re.M)]
    return result


def _query(name: str, query_id: int) -> bytes:
    wire = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".") if label) + b"\x00"
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + wire + b"\x00\x01\x00\x01"


async def _python_load(port: int, names: list[str], seconds: float, outstanding: int, host: str) -> LoadResult:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((host, port))
    pending: dict[int, float] = {}
    latencies: list[float] = []
    rcodes: dict[str, int] = {}
    sent = 0
    done = asyncio.Event()
    deadline = time.perf_counter() + seconds
    next_id = 0

    def send_one() -> None:
        nonlocal sent, next_id
        next_id = (next_id + 1) & 0xFFFF
        while next_id in pending:
            next_id = (next_id + 1) & 0xFFFF
        pending[next_id] = time.perf_counter()
        sock.send(_query(names[sent % len(names)], next_id))
        sent += 1

    def on_readable() -> None:
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                break
            started = pending.pop(data[0] << 8 | data[1], None)
            if started is None:
                continue
            now = time.perf_counter()
            latencies.append(now - started)
            code = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")[min(data[3] & 0xF, 5)]
            rcodes[code] = rcodes.get(code, 0) + 1
            if now < deadline:
                send_one()
            elif not pending:
                done.set()

    loop.add_reader(sock.fileno(), on_readable)
    started = time.perf_counter()
    for _ in range(outstanding):
        send_one()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), seconds + 2)
    elapsed = min(time.perf_counter(), deadline) - started
    loop.remove_reader(sock.fileno())
    sock.close()
    return LoadResult(
        sent, len(latencies), elapsed, rcodes, latencies, statistics.fmean(latencies) if latencies else 0.0
    )


def run_python_load(
    port: int, names: list[str], seconds: float, outstanding: int = 64, host: str = "127.0.0.1"
) -> LoadResult:
    import uvloop

    return uvloop.run(_python_load(port, names, seconds, outstanding, host))


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and all its live descendants."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        stack.extend(int(child) for child in children)
    return total
