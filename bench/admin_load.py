"""The admin API while dnsperf keeps the DNS workers at 100 % CPU: latency of `GET /health` as a probe asks it
(no token) and of the app's device list (`GET /v1/sites/home/devices`, with a token), p50, p99 and the worst.

Issue 19: the admin process ran under SCHED_IDLE (and nice 19), so exactly when the workers took every core,
when an operator needs to look, /health, the API and the app could starve. Each variant is a node started
with its own `[admin]` settings (`niceness`, `idle_scheduling`); the variants are measured in turn, `--runs`
times, interleaved, so that a noisy neighbour hurts each alike. The node answers a site whose networks hold
loopback, so dnsperf's queries are a site's device's and the admin process merges their activity as it would
a customer's; the site has `--devices` configured devices besides. While dnsperf runs (`--seconds`, its
first second left out), the two requests alternate, one every `--gap` seconds, each waited for (up to 60 s).
The workers' CPU over that window is reported, and how busy the node's cores were (with anyone's work), to show
they were saturated.

    python -m bench.admin_load --runs 3 --seconds 20
    python -m bench.admin_load --variant "SCHED_IDLE, nice 19:niceness=19,idle_scheduling=true" \\
        --variant "nice 10:niceness=10,idle_scheduling=false"

Target (issue 19): p99 at most 1 s for both requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    DEFAULT_DATA,
    bns_command,
    free_port,
    machine,
    percentile,
    pinned,
    running,
    top_site_names,
)
from bench.load import LoadResult, have_dnsperf, process_tree_cpu, run_dnsperf, write_query_file

TOKEN = "bench-admin-token-000000001"
DEFAULT_VARIANTS = (
    "SCHED_IDLE, nice 19 (before):niceness=19,idle_scheduling=true",
    "defaults (after):",
)
_REQUEST_TIMEOUT = 60.0


@dataclass
class Variant:
    label: str
    admin: dict[str, Any]
    health: list[float] = field(default_factory=list)  # seconds per request, every run
    devices: list[float] = field(default_factory=list)
    failed: int = 0
    worker_cpu: list[float] = field(default_factory=list)  # the workers' share of their cores, per run
    cores_busy: list[float] = field(default_factory=list)  # how busy the node's cores were (anyone's work), per run
    qps: list[float] = field(default_factory=list)
    p99_per_run: list[tuple[float, float]] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    """`label:key=value,key=value` (admin settings; empty: the defaults)."""
    label, _, settings = text.rpartition(":")
    admin: dict[str, Any] = {}
    for pair in filter(None, settings.split(",")):
        key, _, value = pair.partition("=")
        admin[key.strip()] = json.loads(value.strip())
    return Variant(label or "defaults", admin)


def write_config(directory: Path, variant: Variant, upstream: int, admin_port: int) -> Path:
    directory.mkdir(parents=True)
    admin = {"listen": f"127.0.0.1:{admin_port}", "tokens": [TOKEN], **variant.admin}
    lines = [
        "[upstream]",
        f'servers = ["127.0.0.1:{upstream}"]',
        "[store]",
        'file = "policies.json"',
        "[lists]",
        'cache_dir = "cache"',
        "[admin]",
        *(f"{key} = {json.dumps(value)}" for key, value in admin.items()),
    ]
    path = directory / "bns.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def call(api: str, path: str, token: str | None = None, body: Any = None, method: str = "GET") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def put_site(api: str, devices: int) -> None:
    site = {
        "networks": ["127.0.0.0/8"],
        "mode": "device",
        "groups": {"kids": {"name": "Kids"}},
        "devices": {
            f"device{number}": {
                "name": f"Device {number}",
                "macs": [f"02:00:00:00:{number >> 8:02x}:{number & 255:02x}"],
                **({"group": "kids"} if number % 2 else {}),
            }
            for number in range(devices)
        },
    }
    status, answer = call(api, "/v1/sites/home", TOKEN, site, "PUT")
    if status != 200:
        raise RuntimeError(f"PUT /v1/sites/home: {status} {answer!r}")


def wait_healthy(api: str, deadline: float) -> None:
    while call(api, "/health")[0] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{api}/health did not say ok")
        time.sleep(0.1)


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's children but the last (the admin process is spawned after the workers)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children[:-1]]


def cores_of(text: str) -> set[int]:
    """taskset's list ("0", "0-1,3") as a set of cores."""
    cores: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


def core_times(cores: set[int]) -> tuple[float, float]:
    """(busy, total) clock ticks of these cores since boot, from /proc/stat (all cores when none are named)."""
    busy = total = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name != "cpu" and (not cores or int(name[3:]) in cores):
            values = [float(tick) for tick in ticks[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
            total += sum(values)
    return busy, total


def measure(
    variant: Variant,
    command: list[str],
    port: int,
    api: str,
    query_file: Path,
    args: argparse.Namespace,
    node_cores: set[int],
    load_cores: str | None,
) -> None:
    with running(command, port, startup=60) as supervisor:
        wait_healthy(api, time.monotonic() + 30)
        put_site(api, args.devices)
        run_dnsperf(port, query_file, runs=2, clients=args.clients, outstanding=200, max_qps=20_000, cores=load_cores)
        workers = worker_pids(supervisor)
        loads: list[LoadResult] = []
        load = threading.Thread(
            target=lambda: loads.append(
                run_dnsperf(
                    port,
                    query_file,
                    seconds=args.seconds,
                    clients=args.clients,
                    outstanding=args.outstanding,
                    cores=load_cores,
                )
            ),
            daemon=True,
        )
        load.start()
        time.sleep(1.0)  # dnsperf ramps up
        cpu_before = sum(process_tree_cpu(pid) for pid in workers)
        cores_before = core_times(node_cores)
        started = time.monotonic()
        health: list[float] = []
        devices: list[float] = []
        while time.monotonic() - started < args.seconds - 1.5:
            for path, token, into in (("/health", None, health), ("/v1/sites/home/devices", TOKEN, devices)):
                sent = time.perf_counter()
                try:
                    status, _answer = call(api, path, token)
                except OSError:
                    status = 0
                if status == 200:
                    into.append(time.perf_counter() - sent)
                else:
                    variant.failed += 1
                time.sleep(args.gap)
        window = time.monotonic() - started
        variant.worker_cpu.append((sum(process_tree_cpu(pid) for pid in workers) - cpu_before) / window / len(workers))
        busy, total = (after - before for after, before in zip(core_times(node_cores), cores_before, strict=True))
        variant.cores_busy.append(busy / total if total else 0.0)
        load.join(args.seconds + 30)
        variant.qps += [result.qps for result in loads]
    variant.health += health
    variant.devices += devices
    variant.p99_per_run.append((percentile(health, 0.99), percentile(devices, 0.99)))


def report(variants: list[Variant], args: argparse.Namespace, argv: list[str]) -> str:
    def ms(values: list[float], fraction: float) -> str:
        return f"{percentile(values, fraction) * 1e3:,.0f}"

    def span(shares: list[float]) -> str:
        return f"{min(shares, default=0) * 100:.0f}–{max(shares, default=0) * 100:.0f} %"

    lines = [
        f"Command: `python -m bench.admin_load {' '.join(argv)}`  ",
        f"Machine: {machine()}  ",
        f"{args.runs} runs × {args.seconds:.0f} s per variant, interleaved; the node on cores "
        f"{args.node_cores or 'any'} (a worker per core), dnsperf on the others; {args.clients} clients, "
        f"{args.outstanding} outstanding, cached names; a site of {args.devices} configured devices; "
        f"one request every {args.gap} s, /health and the device list in turn.",
        "",
        "| variant | /health p50 ms | p99 ms | worst ms | devices p50 ms | p99 ms | worst ms | requests "
        "(failed) | workers' CPU | node's cores busy | DNS qps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        count = len(variant.health) + len(variant.devices)
        lines.append(
            f"| {variant.label} | {ms(variant.health, 0.5)} | {ms(variant.health, 0.99)} | "
            f"{ms(variant.health, 1.0)} | {ms(variant.devices, 0.5)} | {ms(variant.devices, 0.99)} | "
            f"{ms(variant.devices, 1.0)} | {count} ({variant.failed}) | "
            f"{span(variant.worker_cpu)} | {span(variant.cores_busy)} | "
            f"{percentile(variant.qps, 0.5):,.0f} |"
        )
    lines.append("")
    lines.append(
        "p99 per run (/health, devices; ms): "
        + "; ".join(
            f"{variant.label}: " + ", ".join(f"{h * 1e3:,.0f}/{d * 1e3:,.0f}" for h, d in variant.p99_per_run)
            for variant in variants
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data directory (names)")
    parser.add_argument("--names", type=int, default=10_000, help="distinct (cached) names dnsperf asks")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="dnsperf's run, per variant and run")
    parser.add_argument(
        "--node-cores",
        default="0",
        help='cores the node runs on (taskset\'s list; "" for any): its workers, one per core, and its admin '
        "process share them; dnsperf runs on the others",
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--outstanding", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=50, help="configured devices of the site")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between two requests")
    parser.add_argument(
        "--variant",
        action="append",
        help='"label:key=value,…" of [admin] settings (repeatable); default: SCHED_IDLE with nice 19, and the defaults',
    )
    args = parser.parse_args(argv)
    if not have_dnsperf():
        parser.error("this bench needs dnsperf (Debian: apt-get install dnsperf)")
    if args.seconds < 5:
        parser.error("--seconds: at least 5 (the first second and the last are left out)")
    variants = [parse_variant(text) for text in args.variant or DEFAULT_VARIANTS]
    node_cores = cores_of(args.node_cores)
    others = sorted(os.sched_getaffinity(0) - node_cores)
    load_cores = ",".join(map(str, others)) if node_cores and others else None
    upstream = free_port()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        query_file = write_query_file(top_site_names(args.data, args.names), scratch / "queries.txt")
        command = [sys.executable, "-m", "bench.upstream", "--port", str(upstream), "--ttl", "86400"]
        with running(command, upstream):
            for run in range(args.runs):
                for number, variant in enumerate(variants):
                    port, admin_port = free_port(), free_port()
                    config = write_config(scratch / f"run{run}-{number}", variant, upstream, admin_port)
                    node = bns_command(port, upstream, len(node_cores), "--config", str(config))
                    node += ["--admin-listen", f"127.0.0.1:{admin_port}"]
                    if node_cores:
                        node = pinned(node, args.node_cores)
                    measure(
                        variant, node, port, f"http://127.0.0.1:{admin_port}", query_file, args, node_cores, load_cores
                    )
                    health, devices = variant.p99_per_run[-1]
                    print(
                        f"run {run + 1}, {variant.label}: p99 /health {health * 1e3:,.0f} ms, devices "
                        f"{devices * 1e3:,.0f} ms, workers' CPU {variant.worker_cpu[-1] * 100:.0f} %, node's cores "
                        f"busy {variant.cores_busy[-1] * 100:.0f} %",
                        file=sys.stderr,
                    )
    print(report(variants, args, argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
