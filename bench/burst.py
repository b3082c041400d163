"""DNS latency beside an admin API write burst: cached answers' p99 with and without 1,000 policy writes.

    python -m bench.burst --data ../shared/data --runs 5

Starts its own redis-server and one `bns serve` node (2 workers, admin API) on loopback, with 100 sites of
10 devices each in Redis. The DNS load (dnsperf from 127.0.0.1, at a fixed rate, names already cached) comes
from a device of site 0, so both workers hold that site and its effective policies. A burst is 1,000
`PUT …/devices/<device>/policy` writes through the admin API, 16 at a time, round robin over the 100 sites:
every tenth one rewrites the site the DNS clients belong to, so each worker reloads it and remakes their
policy. Each run measures the same dnsperf window twice, interleaved: quiet (the baseline) and with the
burst starting with it. The window lasts as long as a burst alone took (measured first), so its p99 covers
the burst and little else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

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
from bench.load import LoadResult, run_dnsperf, write_query_file

_TOKEN = "bench-admin-token-0000000001"
_SITES, _DEVICES, _WRITES, _PARALLEL = 100, 10, 1000, 16
_CATEGORIES = ["drugs", "hate", "weapons", "hacking", "pornography", "violence-gore"]


def _site(index: int) -> dict[str, object]:
    network = "127.0.0.0/8" if index == 0 else f"10.{index // 256}.{index % 256}.0/24"
    base = "127.0.0." if index == 0 else f"10.{index // 256}.{index % 256}."
    return {
        "name": f"Site {index}",
        "networks": [network],
        "mode": "device",
        "groups": {"kids": {"policy": {"block": ["pornography"]}}},
        "devices": {
            f"d{device}": {
                "addresses": [f"{base}{device + 1}"],
                "group": "kids",
                "policy": {"block": ["drugs"], "allow": [f"ok{device}.example"]},
            }
            for device in range(_DEVICES)
        },
    }


async def _write(api: str, count: int, sites: int = _SITES) -> float:
    """`count` policy writes, `_PARALLEL` at a time; returns the seconds they took. Any refusal aborts."""
    headers = {"Authorization": f"Bearer {_TOKEN}", "Content-Type": "application/json"}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(count):
        queue.put_nowait(number)

    async def writer(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            number = queue.get_nowait()
            site, device = number % sites, (number // sites) % _DEVICES
            policy = {"block": [_CATEGORIES[number % len(_CATEGORIES)]], "allow": [f"ok{number}.example"]}
            async with session.put(
                f"{api}/v1/sites/site{site}/devices/d{device}/policy", data=json.dumps(policy), headers=headers
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"write {number}: {response.status} {await response.text()}")

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(writer(session) for _ in range(_PARALLEL)))
    return time.monotonic() - started


async def _populate(api: str) -> None:
    headers = {"Authorization": f"Bearer {_TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for index in range(_SITES):
            async with session.put(
                f"{api}/v1/sites/site{index}", data=json.dumps(_site(index)), headers=headers
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"site {index}: {response.status} {await response.text()}")


def _dns(port: int, queries: Path, seconds: float, rate: int) -> LoadResult:
    return run_dnsperf(port, queries, seconds=seconds, max_qps=rate, per_query=True, clients=4, outstanding=100)


def _burst(api: str, niceness: int) -> float:
    """A burst from its own process, at `niceness`: the API's clients are not on the DNS node in production,
    so on this 2-core machine they are the ones that should wait for a core."""
    command = [sys.executable, "-m", "bench.burst", "--write", api]
    if niceness:
        command = ["nice", "-n", str(niceness), *command]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


async def _measure(
    port: int, queries: Path, seconds: float, rate: int, api: str | None, niceness: int
) -> tuple[LoadResult, float]:
    load = asyncio.create_task(asyncio.to_thread(_dns, port, queries, seconds, rate))
    took = await asyncio.to_thread(_burst, api, niceness) if api is not None else 0.0
    return await load, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=int, default=5000, help="DNS queries per second")
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--client-nice", type=int, default=0, help="niceness of the process sending the writes")
    parser.add_argument("--write", metavar="API", help=argparse.SUPPRESS)  # internal: one burst, print seconds
    args = parser.parse_args(argv)
    if args.write:
        print(asyncio.run(_write(args.write, _WRITES)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        upstream_port, port, admin = free_port(), free_port(), free_port()
        redis_port = stack.enter_context(running_redis(scratch))
        stack.enter_context(
            running([sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)], upstream_port)
        )
        config = scratch / "bns.toml"
        config.write_text(
            f'[store]\nredis = "redis://127.0.0.1:{redis_port}/0"\n[lists]\ncache_dir = '
            f'"{scratch / "lists"}"\n[admin]\ntokens = ["{_TOKEN}"]\n'
        )
        stack.enter_context(
            running(
                bns_command(port, upstream_port, 2, "--config", str(config), "--admin-listen", f"127.0.0.1:{admin}"),
                port,
            )
        )
        api = f"http://127.0.0.1:{admin}"
        asyncio.run(_populate(api))
        queries = write_query_file(top_site_names(args.data, args.names), scratch / "queries.txt")
        run_dnsperf(port, queries, runs=1, clients=4, outstanding=100)  # every name cached, the site loaded
        alone = _burst(api, args.client_nice)
        window = max(1.0, round(alone + 0.5))
        for _run in range(args.runs):
            quiet, _ = asyncio.run(_measure(port, queries, window, args.rate, None, 0))
            busy, took = asyncio.run(_measure(port, queries, window, args.rate, api, args.client_nice))
            rows.append((quiet, busy, took))
    lines = [
        f"Command: `python -m bench.burst {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}",
        "",
        f"A burst of {_WRITES:,} policy writes alone took {alone:.2f} s ({_WRITES / alone:,.0f} writes/s); "
        f"DNS window {window:.0f} s at {args.rate:,} qps, {args.names:,} cached names, 2 workers; the writes' "
        f"client at niceness {args.client_nice}.",
        "",
        "| run | quiet p50 ms | quiet p99 ms | burst p50 ms | burst p99 ms | p99 rise ms | burst took s "
        "| lost (quiet / burst) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rises = []
    for number, (quiet, busy, took) in enumerate(rows):
        rise = (busy.percentile(0.99) - quiet.percentile(0.99)) * 1000
        rises.append(rise)
        lines.append(
            f"| {number} | {quiet.percentile(0.5) * 1000:.3f} | {quiet.percentile(0.99) * 1000:.3f} | "
            f"{busy.percentile(0.5) * 1000:.3f} | {busy.percentile(0.99) * 1000:.3f} | {rise:+.3f} | "
            f"{took:.2f} | {quiet.lost} / {busy.lost} |"
        )
    quiet_p99 = median([row[0].percentile(0.99) * 1000 for row in rows])
    busy_p99 = median([row[1].percentile(0.99) * 1000 for row in rows])
    lines += [
        "",
        f"Median p99: quiet {quiet_p99:.3f} ms, during the burst {busy_p99:.3f} ms; median rise "
        f"**{median(rises):+.3f} ms** (target ≤ +1 ms).",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
