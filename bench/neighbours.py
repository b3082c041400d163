"""One subscriber's writes beside another site's DNS: that site's latency with and without them (issue 18).

    python -m bench.neighbours --data ../shared/data --runs 5 [--baseline /tmp/landed]

Starts its own redis-server and scripted upstream, and one `bns serve` node per target (2 workers, admin
API) on loopback, each with two sites:

- "quiet": its clients send the DNS load measured: dnsperf from 127.0.0.1 at a fixed rate, top-site names
  already cached (real names, not one name over and over);
- "noisy" (127.0.0.2): its own devices ask a few names a second (dnsperf from 127.0.0.2), so both workers
  hold its site, and its site token (the subscriber's credential, resolver/admin/site_tokens.py) writes
  devices as large as the node accepts, as fast as it can: first it fills the site (device after device,
  each with an allow list of `names` names, until `devices` or the node refuses one), then, in the
  windows with writes, it rewrites those devices in turn with new names, one write after another, from a
  process of its own under SCHED_IDLE (the subscriber's client is not on the DNS node; on this machine it
  must not take the workers' CPU). Every write is a new document that both workers load.

Each run measures the quiet site's DNS in two windows, interleaved: without writes and with them. Figures
are medians over runs; the ratios are with / without, per run, then their median.

Targets: this checkout, written at its bounds (`[limits]`'s defaults: `names_per_list` names per device,
devices until the node refuses one, which the document bound decides), and, with `--baseline PATH`,
another checkout (the code before the bounds: `git worktree add /tmp/landed 1be362a`), written as issue 18
found it: 40 devices of 10,000 names (0.76 MB each). A checkout runs its hot path as plain Python unless it
was compiled there; the ratios compare each target with itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    DEFAULT_DATA,
    REPO,
    bns_command,
    free_port,
    machine,
    median,
    running,
    running_redis,
    top_site_names,
)
from bench.load import LoadResult, have_dnsperf, run_dnsperf, write_query_file
from resolver.shared.config import LimitsSettings

_TOKEN = "bench-admin-token-0000000001"
_NOISY_ADDRESS = "127.0.0.2"
# 75 bytes of JSON a name, as the names of issue 18's devices (10,000 of them: 0.76 MB a device)
_NAME = "{round}-{index}.allowed-service-endpoint.region-one.cdn-provider.example.com"


@dataclass(frozen=True)
class Target:
    label: str
    tree: Path
    names: int  # allow names a device of the noisy site is written with
    devices: int  # devices the noisy site is filled with, unless refused before


Node = tuple[int, str, str, dict[str, Any]]


@dataclass
class Window:
    dns: LoadResult
    writes: int


async def _put(session: aiohttp.ClientSession, api: str, token: str, device: int, names: list[str]) -> tuple[int, str]:
    body = json.dumps({"name": f"Device {device}", "policy": {"block": ["drugs"], "allow": names}})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with session.put(f"{api}/v1/sites/noisy/devices/d{device}", data=body, headers=headers) as response:
        return response.status, await response.text()


def _names(round_: int, count: int) -> list[str]:
    return [_NAME.format(round=round_, index=index) for index in range(count)]


async def _fill(api: str, token: str, names: int, devices: int) -> dict[str, object]:
    """Device after device of `names` names until `devices` or a refusal, then one more of as many names as
    the node still takes (halving): the names of each device written, the document's size, the refusal."""
    sizes: list[int] = []
    refusal = None
    async with aiohttp.ClientSession() as session:
        count = names
        while len(sizes) < devices and count:
            status, _answer = await _put(session, api, token, len(sizes), _names(0, count))
            if status == 200:
                sizes.append(count)
            else:
                refusal = refusal or status
                count //= 2
        async with session.get(f"{api}/v1/sites/noisy", headers={"Authorization": f"Bearer {token}"}) as response:
            size = len(await response.read())
    return {"sizes": sizes, "refused": refusal, "bytes": size}


async def _rewrite(api: str, token: str, sizes: list[int], seconds: float) -> int:
    """The filled devices rewritten in turn, each with as many new names, one write after another (two at
    once would make each other retry: the store's writes of one site are serialised by WATCH), for
    `seconds`; the writes done."""
    deadline = time.monotonic() + seconds
    # made before: the client's own time is not the test
    bodies = [[_names(round_, count) for count in sizes] for round_ in range(1, 5)]
    writes = 0
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            device = writes % len(sizes)
            status, answer = await _put(session, api, token, device, bodies[(writes // len(sizes)) % 4][device])
            if status != 200:
                raise RuntimeError(f"rewrite {writes}: HTTP {status} {answer}")
            writes += 1
    return writes


def _writer(*arguments: str) -> dict[str, Any]:
    """The writes, from a process of their own that takes no CPU the node wants (SCHED_IDLE): a subscriber's
    client is not on the DNS node, only its requests are."""
    command = [sys.executable, "-m", "bench.neighbours", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(arguments[:1])} failed:\n{done.stderr}")
    return dict(json.loads(done.stdout))


def _noisy_devices(port: int, queries: Path, seconds: float) -> None:
    """The noisy site's own devices asking names: both workers hold its site and its clients."""
    with contextlib.suppress(subprocess.CalledProcessError):
        command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-a", _NOISY_ADDRESS, "-d", str(queries)]
        subprocess.run([*command, "-c", "8", "-Q", "40", "-l", str(seconds)], capture_output=True, check=True)


def _window(port: int, queries: Path, seconds: float, rate: int, writes: tuple[str, str, str] | None) -> Window:
    devices = threading.Thread(target=_noisy_devices, args=(port, queries, seconds))
    devices.start()
    load: list[LoadResult] = []
    dns = threading.Thread(
        target=lambda: load.append(
            run_dnsperf(port, queries, seconds=seconds, max_qps=rate, per_query=True, clients=4, outstanding=100)
        )
    )
    dns.start()
    written = 0
    if writes is not None:
        api, token, sizes = writes
        written = int(_writer("--rewrite", api, token, str(seconds), sizes)["writes"])
    dns.join()
    devices.join()
    return Window(load[0], written)


@contextlib.contextmanager
def _node(target: Target, scratch: Path, upstream_port: int, queries: Path) -> Iterator[Node]:
    """A node of `target` with both sites, the noisy one filled; yields (DNS port, API, the noisy site's
    token, what the fill did)."""
    with contextlib.ExitStack() as stack:
        redis_port = stack.enter_context(running_redis(scratch))
        port, admin = free_port(), free_port()
        config = scratch / "bns.toml"
        config.write_text(
            f'[store]\nredis = "redis://127.0.0.1:{redis_port}/0"\n[lists]\ncache_dir = '
            f'"{scratch / "lists"}"\n[admin]\ntokens = ["{_TOKEN}"]\n'
        )
        command = bns_command(port, upstream_port, 2, "--config", str(config), "--admin-listen", f"127.0.0.1:{admin}")
        stack.enter_context(running(command, port, log=scratch / "node.log", cwd=target.tree))
        api = f"http://127.0.0.1:{admin}"
        token = asyncio.run(_sites(api))
        run_dnsperf(port, queries, runs=1, clients=4, outstanding=100)  # every name cached
        _noisy_devices(port, queries, 1)
        filled = _writer("--fill", api, token, str(target.names), str(target.devices))
        yield port, api, token, filled


async def _sites(api: str) -> str:
    """Both sites made by the operator; the noisy site's token."""
    headers = {"Authorization": f"Bearer {_TOKEN}", "Content-Type": "application/json"}
    sites = {
        "quiet": {"networks": ["127.0.0.1/32"], "mode": "network", "policy": {"block": ["drugs", "weapons"]}},
        "noisy": {"networks": [f"{_NOISY_ADDRESS}/32"], "mode": "device"},
    }
    async with aiohttp.ClientSession() as session:
        for site, document in sites.items():
            async with session.put(f"{api}/v1/sites/{site}", data=json.dumps(document), headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"site {site}: HTTP {response.status} {await response.text()}")
        async with session.post(
            f"{api}/v1/sites/noisy/tokens", data=json.dumps({"days": 1}), headers=headers
        ) as response:
            return str((await response.json())["token"])


def _counts(sizes: list[int]) -> str:
    """`[10000, 10000, 500]` → "2 × 10,000, 500"."""
    runs = [(size, len(list(same))) for size, same in itertools.groupby(sizes)]
    return ", ".join(f"{count} × {size:,}" if count > 1 else f"{size:,}" for size, count in runs)


def _table(target: Target, filled: dict[str, Any], rows: list[tuple[Window, Window]], seconds: float) -> list[str]:
    def ms(result: LoadResult, fraction: float) -> float:
        return result.percentile(fraction) * 1000

    lines = [
        f"**{target.label}**: the noisy site filled with {len(filled['sizes'])} devices of "
        f"{_counts(filled['sizes'])} names ({filled['bytes'] / 1e6:.2f} MB document; "
        + (f"a larger device refused: HTTP {filled['refused']})" if filled["refused"] else "nothing refused)"),
        "",
        "| run | without: p50 ms | p99 ms | max ms | with writes: p50 ms | p99 ms | max ms | writes/s | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, (quiet, busy) in enumerate(rows):
        lines.append(
            f"| {number} | {ms(quiet.dns, 0.5):.3f} | {ms(quiet.dns, 0.99):.3f} | {ms(quiet.dns, 1.0):.1f} | "
            f"{ms(busy.dns, 0.5):.3f} | {ms(busy.dns, 0.99):.3f} | {ms(busy.dns, 1.0):.1f} | "
            f"{busy.writes / seconds:.1f} | {quiet.dns.lost} / {busy.dns.lost} |"
        )
    p50 = median([ms(busy.dns, 0.5) / ms(quiet.dns, 0.5) for quiet, busy in rows])
    p99 = median([ms(busy.dns, 0.99) / ms(quiet.dns, 0.99) for quiet, busy in rows])
    lines += [
        "",
        f"Medians: without writes p50 {median([ms(q.dns, 0.5) for q, _ in rows]):.3f} ms, p99 "
        f"{median([ms(q.dns, 0.99) for q, _ in rows]):.3f} ms; with them p50 "
        f"{median([ms(b.dns, 0.5) for _, b in rows]):.3f} ms, p99 {median([ms(b.dns, 0.99) for _, b in rows]):.3f} "
        f"ms; **ratio p50 {p50:.2f}×, p99 {p99:.2f}×**.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    parser.add_argument("--rate", type=int, default=3000, help="the quiet site's DNS queries per second")
    parser.add_argument("--names", type=int, default=1000, help="cached names the quiet site asks")
    parser.add_argument("--baseline", type=Path, help="also run this checkout (the code before the bounds)")
    parser.add_argument("--baseline-names", type=int, default=10_000)
    parser.add_argument("--baseline-devices", type=int, default=40)
    # internal: the subscriber's writes, from a process of their own
    parser.add_argument("--fill", nargs=4, metavar=("API", "TOKEN", "NAMES", "DEVICES"), help=argparse.SUPPRESS)
    parser.add_argument("--rewrite", nargs=4, metavar=("API", "TOKEN", "SECONDS", "SIZES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fill or args.rewrite:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if args.fill:
        api, token, names, devices = args.fill
        print(json.dumps(asyncio.run(_fill(api, token, int(names), int(devices)))))
        return 0
    if args.rewrite:
        api, token, seconds, sizes = args.rewrite
        sizes_list = [int(size) for size in sizes.split(",")]
        print(json.dumps({"writes": asyncio.run(_rewrite(api, token, sizes_list, float(seconds)))}))
        return 0
    if not have_dnsperf():
        sys.exit("dnsperf is needed (Debian: apt-get install dnsperf)")
    limits = LimitsSettings()
    targets = [Target("bns at its bounds", REPO, limits.names_per_list, limits.devices)]
    if args.baseline is not None:
        label = f"bns at {args.baseline.name}, unbounded"
        targets.append(Target(label, args.baseline.resolve(), args.baseline_names, args.baseline_devices))
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        upstream_port = free_port()
        stack.enter_context(
            running([sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)], upstream_port)
        )
        queries = write_query_file(top_site_names(args.data, args.names), scratch / "queries.txt")
        nodes = []
        for number, target in enumerate(targets):
            (scratch / str(number)).mkdir()
            nodes.append(stack.enter_context(_node(target, scratch / str(number), upstream_port, queries)))
        rows: list[list[tuple[Window, Window]]] = [[] for _ in targets]
        for run in range(args.runs):
            for number, (port, api, token, filled) in enumerate(nodes):
                writes = (api, token, ",".join(str(size) for size in filled["sizes"]))
                quiet = _window(port, queries, args.seconds, args.rate, None)
                busy = _window(port, queries, args.seconds, args.rate, writes)
                rows[number].append((quiet, busy))
                print(f"run {run} {targets[number].label}: {busy.writes} writes", file=sys.stderr, flush=True)
    lines = [
        f"Command: `python -m bench.neighbours {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}",
        "",
        f"The quiet site's DNS at {args.rate:,} qps ({args.names:,} cached names, 2 workers), {args.seconds:.0f} s "
        f"windows without and with the noisy site's writes, interleaved, {args.runs} runs.",
        "",
    ]
    for number, target in enumerate(targets):
        lines += _table(target, nodes[number][3], rows[number], args.seconds)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
