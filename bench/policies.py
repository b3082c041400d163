"""Per-device policy at ISP scale: warm CPU per query, memory per cached device, cold-start latency.

    python -m bench.policies --data ../shared/data --sites 100000 --devices 10 --active 10000

Starts its own redis-server (a free loopback port, nothing kept on disk) and imports `--sites` sites of
`--devices` devices each (100,000 × 10 = 1,000,000 devices): half in device mode (a Kids group with a
category policy and a weekday schedule, a device with its own policy, allow and deny names), half in network
mode (a site-wide policy). Queries carry real EDNS identity options, as a router would add them: client
subnet (the device's site address) and the device's MAC, from a trusted source.

- warm: the same query stream (random active devices, random names among 1,000 cached top sites) against
  bns with the policies, and against the same bns with one global policy (no store, nothing trusted);
  interleaved runs; server CPU per query of each and the ratio.
- memory: the policy worker's RSS minus the global worker's after the warm runs, per active device.
- cold: a fresh server; one query per device never seen, each of another site, at a fixed rate; latency
  percentiles from dnsperf's per-query timings (the name is already cached, so this is the identity path).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import (
    DEFAULT_DATA,
    bns_command,
    free_port,
    machine,
    median,
    running,
    running_redis,
    top_site_names,
)
from bench.load import LoadResult, process_tree_cpu, run_dnsperf
from blocklists.catalog import load_catalog
from resolver.shared.store.redis import RedisConnection
from resolver.shared.store.redis_policies import RedisStore

_ECS, _MAC = 8, 65001


def site_address(site: int) -> bytes:
    """The first address of site `site`'s /29 in 10.0.0.0/8."""
    return struct.pack("!I", (10 << 24) + site * 8 + 1)


def mac(site: int, device: int) -> bytes:
    return bytes([0x02]) + struct.pack("!I", site) + bytes([device])


def site_document(site: int, devices: int) -> dict:
    base = (10 << 24) + site * 8
    network = ".".join(str(byte) for byte in struct.pack("!I", base)) + "/29"
    macs = [":".join(f"{b:02x}" for b in mac(site, device)) for device in range(devices)]
    if site % 2:
        return {
            "id": f"s{site}",
            "networks": [network],
            "mode": "network",
            "timezone": "Europe/London",
            "policy": {"block": ["pornography", "drugs"], "web_protect": True},
            "devices": {f"d{d}": {"macs": [macs[d]]} for d in range(devices)},
        }
    return {
        "id": f"s{site}",
        "networks": [network],
        "mode": "device",
        "timezone": "Europe/Berlin",
        "default_group": "kids",
        "groups": {
            "kids": {
                "name": "Kids",
                "policy": {
                    "block": ["pornography", "drugs", "hate", "violence-gore"],
                    "safe_search": False,
                    "schedules": [
                        {
                            "name": "homework",
                            "days": ["mon", "tue", "wed", "thu", "fri"],
                            "from": "16:00",
                            "to": "18:00",
                            "block": ["hacking"],
                        }
                    ],
                },
            }
        },
        "devices": {
            f"d{d}": {
                "macs": [macs[d]],
                "group": "kids",
                **({"policy": {"block": [], "allow": ["school.example"], "deny": ["bad.example"]}} if d == 0 else {}),
            }
            for d in range(devices)
        },
    }


async def populate(url: str, sites: int, devices: int) -> float:
    store = RedisStore(RedisConnection(url, "bench:"), load_catalog())
    started = time.monotonic()
    try:
        for start in range(0, sites, 5000):
            await store.import_sites([site_document(i, devices) for i in range(start, min(start + 5000, sites))])
    finally:
        await store.close()
    return time.monotonic() - started


def wire_query(name: str, options: list[tuple[int, bytes]]) -> bytes:
    labels = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\x00"
    rdata = b"".join(struct.pack("!HH", code, len(value)) + value for code, value in options)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(rdata)) + rdata
    return struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 1) + labels + b"\x00\x01\x00\x01" + opt


def identity_options(site: int, device: int) -> list[tuple[int, bytes]]:
    return [(_ECS, struct.pack("!HBB", 1, 32, 0) + site_address(site)), (_MAC, mac(site, device))]


def write_binary_queries(path: Path, queries: list[bytes]) -> Path:
    """dnsperf -B input: each query as a two-byte length and its wire form."""
    path.write_bytes(b"".join(struct.pack("!H", len(query)) + query for query in queries))
    return path


def _config(path: Path, redis_url: str | None) -> Path:
    if redis_url is None:
        path.write_text('[store]\nfile = ""\n')
    else:
        path.write_text(
            f'[store]\nredis = "{redis_url}"\nprefix = "bench:"\n[identity]\ntrusted_networks = ["127.0.0.1/32"]\n'
        )
    return path


def _rss_mb(pid: int) -> float:
    total = 0.0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sites", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--active", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cold", type=int, default=5_000, help="unseen devices in the cold-start run")
    parser.add_argument(
        "--cold-qps",
        type=int,
        nargs="+",
        default=[300, 1_000],
        help="rates of new devices per second, one cold run each (each on devices of its own)",
    )
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None or shutil.which("dnsperf") is None:
        raise SystemExit("this bench needs redis-server and dnsperf (Debian: redis-server, dnsperf)")

    rng = random.Random(11)
    names = top_site_names(args.data, 1_000)
    active = [(rng.randrange(args.sites), rng.randrange(args.devices)) for _ in range(args.active)]
    upstream_port = free_port()
    lines = []
    with tempfile.TemporaryDirectory() as scratch_dir, running_redis(Path(scratch_dir)) as redis_port:
        scratch = Path(scratch_dir)
        url = f"redis://127.0.0.1:{redis_port}/0"
        seconds = asyncio.run(populate(url, args.sites, args.devices))
        used = subprocess.run(
            ["redis-cli", "-p", str(redis_port), "info", "memory"], capture_output=True, text=True, check=False
        ).stdout
        redis_mb = next(
            (int(line.split(":")[1]) / 2**20 for line in used.splitlines() if line.startswith("used_memory:")),
            float("nan"),
        )
        lines.append(
            f"Imported {args.sites:,} sites with {args.sites * args.devices:,} devices into Redis in "
            f"{seconds:.1f} s (`bns` import path, validated); Redis memory {redis_mb:.0f} MB."
        )
        warm = [wire_query(rng.choice(names), identity_options(*rng.choice(active))) for _ in range(args.queries)]
        warm_file = write_binary_queries(scratch / "warm.bin", warm)
        names_file = write_binary_queries(scratch / "names.bin", [wire_query(name, []) for name in names])
        configs = {
            "one global policy": _config(scratch / "global.toml", None),
            "per-device policies (Redis)": _config(scratch / "redis.toml", url),
        }
        upstream = [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port), "--ttl", "86400"]
        with running(upstream, upstream_port):
            lines += warm_runs(args, configs, upstream_port, warm_file, names_file)
            for number, rate in enumerate(args.cold_qps):
                lines += cold_run(
                    args, rate, number, configs["per-device policies (Redis)"], upstream_port, names, scratch
                )
    command = "python -m bench.policies " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Command: `{command}`  \nMachine: {machine()}\n\n" + "\n".join(lines))
    return 0


def warm_runs(
    args: argparse.Namespace, configs: dict[str, Path], upstream_port: int, warm_file: Path, names_file: Path
) -> list[str]:
    ports = {label: free_port() for label in configs}
    cpu: dict[str, list[float]] = {label: [] for label in configs}
    qps: dict[str, list[float]] = {label: [] for label in configs}
    rss: dict[str, float] = {}
    contexts = {
        label: running(bns_command(ports[label], upstream_port, 1, "--config", str(path)), ports[label])
        for label, path in configs.items()
    }
    pids = {label: context.__enter__() for label, context in contexts.items()}
    try:
        for label in configs:  # warm: every name cached, every active device resolved
            run_dnsperf(ports[label], names_file, runs=1, clients=8, outstanding=100, binary=True)
            run_dnsperf(ports[label], warm_file, runs=1, clients=32, outstanding=500, binary=True)
        for _ in range(args.runs):
            for label in configs:
                before = process_tree_cpu(pids[label])
                result = run_dnsperf(
                    ports[label], warm_file, seconds=args.seconds, clients=32, outstanding=1000, binary=True
                )
                cpu[label].append((process_tree_cpu(pids[label]) - before) / max(result.completed, 1) * 1e6)
                qps[label].append(result.qps)
        rss = {label: _rss_mb(pid) for label, pid in pids.items()}
    finally:
        for context in contexts.values():
            context.__exit__(None, None, None)
    base, policies = configs
    ratio = median(cpu[policies]) / median(cpu[base])
    per_device = (rss[policies] - rss[base]) * 2**20 / args.active
    return [
        "",
        f"Warm: {args.queries:,} queries over {args.active:,} active devices (random) and 1,000 cached names; "
        f"{args.runs} runs × {args.seconds} s each, interleaved; 1 worker; dnsperf 32 clients, 1000 outstanding.",
        "",
        "| server | qps (median) | server CPU µs/query (median) | ratio |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {median(qps[label]):,.0f} | {median(cpu[label]):.2f} | "
            f"{median(cpu[label]) / median(cpu[base]):.2f}× |"
            for label in configs
        ),
        "",
        "Per-run µs/query: " + "; ".join(f"{label}: {[round(c, 2) for c in cpu[label]]}" for label in configs),
        "",
        f"Warm CPU per query with per-device policies: **{ratio:.2f}× the one-policy server** (target ≤ 1.3×).",
        f"Memory: worker RSS {rss[policies]:.0f} MB with the policies vs {rss[base]:.0f} MB without, after the same "
        f"queries: {per_device:,.0f} bytes per active device (client, its effective policy, its share of the "
        f"{args.active:,} sites held).",
    ]


def cold_run(
    args: argparse.Namespace, rate: int, number: int, config: Path, upstream_port: int, names: list[str], scratch: Path
) -> list[str]:
    rng = random.Random(12 + number)
    sites = rng.sample(range(args.sites), args.cold)
    cold = [wire_query(names[0], identity_options(site, rng.randrange(args.devices))) for site in sites]
    cold_file = write_binary_queries(scratch / "cold.bin", cold)
    warmup = write_binary_queries(scratch / "warmup.bin", [wire_query(names[0], [])])
    port = free_port()
    with running(bns_command(port, upstream_port, 1, "--config", str(config)), port):
        run_dnsperf(port, warmup, runs=1, clients=1, outstanding=1, binary=True)
        cold_result, warm_result = (
            run_dnsperf(port, cold_file, runs=1, clients=8, outstanding=100, max_qps=rate, per_query=True, binary=True)
            for _ in range(2)
        )  # the second pass asks the same, now known, devices: the baseline

    def figures(result: LoadResult) -> str:
        return (
            f"p50 {result.percentile(0.5) * 1e3:.2f} ms, p99 {result.percentile(0.99) * 1e3:.2f} ms, "
            f"max {max(result.latencies) * 1e3:.2f} ms over {len(result.latencies):,} answers "
            f"({result.lost} lost)"
        )

    return [
        "",
        f"Cold start: {args.cold:,} devices never seen before, each of a different site (so a site lookup and a "
        f"site load from Redis each), at {rate} new devices a second, the name already cached: {figures(cold_result)}. "
        f"The same queries again, the devices now known (the baseline, measured by the same dnsperf at the same "
        f"rate): {figures(warm_result)}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
