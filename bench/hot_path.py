"""The query path's own Python work per query, with no socket: real-shaped packets fed to the UDP listener
(its transport replaced by one that drops what it is given), so only our code is timed.

    python -m bench.hot_path [--workload cached cookie router blocked mixed] [--rounds 5] [--profile]

Workloads as in bench.peers: cached names in identical packets; the same names from 10,000 clients with their
own DNS cookies; from a router adding cookie, ECS and MAC for 10,000 devices (per-device policy from a policy
file: each device in a group that blocks the eight categories); 100,000 distinct listed names and subdomains;
70 % cached / 30 % blocked. Every client and cache entry is warmed first, so the timing is the warm path.
`--profile` prints the functions that cost most (cProfile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_DATA, top_site_names
from bench.peers import COOKIE, device_options, wire_query
from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists
from resolver.shared.config import load_config
from resolver.shared.identity import NetworkSet
from resolver.shared.lists import Lists
from resolver.shared.loading import policy_maker
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.file_policies import FileStore
from resolver.worker.access import AccessControl
from resolver.worker.cache import AnswerCache
from resolver.worker.directory import Directory
from resolver.worker.listener import InFlight, UdpListener
from resolver.worker.pipeline import Resolver
from resolver.worker.rate_limit import ResponseRateLimiter
from resolver.worker.upstream import Forwarder
from resolver.worker.wire import scan_reply

CLIENT = ("127.0.0.1", 40000)
CATALOG = load_catalog()


class _Dropped:
    sent = 0

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent += 1


def _reply(question: bytes) -> bytes:
    name_end = len(question) - 4
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 86400, 4) + bytes((192, 0, 2, 1))
    return struct.pack("!HHHHHH", 0, 0x8180, 1, 1, 0, 0) + question[: name_end + 4] + record


class Bench:
    """A listener and resolver as a worker has them, over a list of `listed` names and, with `devices`, a
    policy file holding a site of that many devices."""

    def __init__(self, directory: Path, listed: list[str], devices: int) -> None:
        source = directory / "listed.txt"
        source.write_text("\n".join(listed) + "\n")
        artifact = directory / "lists.bns"
        compile_lists([Source(source, "pornography")], artifact, CATALOG)
        store_file = directory / "policies.json"
        config = load_config(
            None,
            {
                "store": {"file": str(store_file) if devices else "", "cold_wait": 5.0},
                "identity": {"trusted_networks": ["127.0.0.0/8"]},
            },
        )
        store = FileStore(store_file, CATALOG) if devices else None
        if store is not None:
            site = {
                "networks": ["127.0.0.0/8", "10.0.0.0/8"],
                "mode": "device",
                "default_group": "family",
                "groups": {"family": {"policy": {"profile": "guest"}}},
                "devices": {
                    f"d{device}": {
                        "macs": [":".join(f"{b:02x}" for b in b"\x02\x00" + struct.pack("!I", device))],
                        "group": "family",
                    }
                    for device in range(devices)
                },
            }
            asyncio.run(PolicyService(store).put_site("home", site))
        self.cache = AnswerCache(config.cache)
        lists = Lists(artifact, CATALOG, config.lists.hot_names, 1.0, directory / "cache")
        self.directory = Directory(
            store,
            policy_maker(config, CATALOG),
            CATALOG,
            NetworkSet(config.identity.trusted_networks),
            config.store,
        )
        self.resolver = Resolver(self.cache, Forwarder(config.upstream), lists, self.directory)
        self.listener = UdpListener(
            self.resolver,
            InFlight(),
            AccessControl(config.server, config.rate_limit, config.identity),
            ResponseRateLimiter(config.rate_limit),
        )
        self.transport = _Dropped()
        self.listener.connection_made(self.transport)  # type: ignore[arg-type]

    def cache_names(self, names: list[str]) -> None:
        # Parsed by the resolver's own parser, as a miss is: the answer's key is then the interned query's.
        for name in names:
            request = self.resolver.parser.parse(wire_query(name, []), CLIENT, tcp=False)
            question = request.query.question
            self.cache.store(request.query.key, scan_reply(_reply(question), question), time.monotonic())

    def warm(self, queries: list[bytes]) -> None:
        """Every client known (their first query awaits the store) and every answer made once."""

        async def run() -> None:
            for data in queries:
                answer = self.resolver.answer(data, CLIENT, False)
                if not isinstance(answer, bytes):
                    await answer

        asyncio.run(run())

    def round(self, queries: list[bytes]) -> float:
        receive = self.listener.datagram_received
        started = time.perf_counter()
        for data in queries:
            receive(data, CLIENT)
        return (time.perf_counter() - started) / len(queries) * 1e6


def workloads(data: Path, rng: random.Random, listed: list[str]) -> dict[str, tuple[list[bytes], int]]:
    """name → (queries, devices in the policy file)."""
    cached = top_site_names(data, 10_000)
    blocked = []
    for name in rng.sample(listed, 50_000):
        blocked += [name, f"w{rng.randrange(10**6)}.{name}"]
    cookies = [rng.randbytes(8) for _ in range(10_000)]
    devices = [device_options(device, rng, cookies[device]) for device in range(10_000)]
    ident = lambda: rng.randrange(65536)  # noqa: E731
    return {
        "cached": ([wire_query(name, [], 1) for name in cached], 0),
        "cookie": (
            [wire_query(rng.choice(cached), [(COOKIE, rng.choice(cookies))], ident()) for _ in range(100_000)],
            0,
        ),
        "router": ([wire_query(rng.choice(cached), rng.choice(devices), ident()) for _ in range(100_000)], 10_000),
        "router global": ([wire_query(rng.choice(cached), rng.choice(devices), ident()) for _ in range(100_000)], 0),
        "blocked": ([wire_query(name, [], ident()) for name in blocked], 0),
        "mixed": (
            [wire_query(rng.choice(cached), [], ident()) for _ in range(70_000)]
            + [wire_query(name, [], ident()) for name in rng.sample(blocked, 30_000)],
            0,
        ),
    }, cached


def measure(names: list[str], rounds: int, profile: bool, data: Path) -> dict[str, list[float]]:
    rng = random.Random(5)
    listed = [f"l{index}.listed{index % 97}.example" for index in range(200_000)]
    made, cached = workloads(data, rng, listed)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            queries, devices = made[name]
            directory = Path(scratch) / name.replace(" ", "-")
            directory.mkdir()
            bench = Bench(directory, listed, devices)
            bench.cache_names(cached)
            bench.warm(queries)
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                bench.round(queries)
                profiler.disable()
                print(f"--- {name}", file=sys.stderr)
                pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(14)
            results[name] = [bench.round(queries) for _ in range(rounds)]
    return results


def memory(count: int, data: Path) -> float:
    """Bytes of this process's RSS per cached answer: `count` distinct names stored and then asked once each
    (so the parser's memo and each answer's rendering are in it too), as a worker holds them."""
    names = [f"n{index}.{name}" for index, name in enumerate(top_site_names(data, 1000) * (count // 1000 + 1))]
    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench(Path(scratch), ["listed.example"], 0)
        bench.resolver.cache._settings = load_config(None, {"cache": {"size": count}}).cache
        queries = [wire_query(name, [], 1) for name in names[:count]]
        before = _rss()
        bench.cache_names(names[:count])
        bench.round(queries)
        return (_rss() - before) / count


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--workload", nargs="+", default=["cached", "cookie", "router", "router global", "blocked", "mixed"]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--memory", type=int, metavar="ANSWERS", help="instead: RSS per cached answer")
    args = parser.parse_args(argv)
    if args.memory:
        print(f"{memory(args.memory, args.data):.0f} bytes of RSS per cached answer ({args.memory:,} answers)")
        return 0
    results = measure(args.workload, args.rounds, args.profile, args.data)
    for name, values in results.items():
        print(
            f"{name:14} {statistics.median(values):6.2f} µs per query (rounds: "
            f"{', '.join(f'{value:.2f}' for value in values)})"
        )
    return 0


def summary(results: dict[str, list[float]]) -> dict[str, Any]:
    return {name: statistics.median(values) for name, values in results.items()}


if __name__ == "__main__":
    sys.exit(main())
