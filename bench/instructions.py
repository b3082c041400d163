"""Instructions per query on the compiled query path, counted by callgrind: the same for the same code and inputs
whatever else the machine is doing (a shared 2-core machine's timings move by ±50 % between runs).

    python -m bench.instructions [--workload cached router blocked router-blocked] [--data ../shared/data]

Each workload runs in a child under `valgrind --tool=callgrind`, collecting only inside the compiled UDP
listener's `datagram_received` (so neither start-up nor warming counts), with a fixed hash seed; the figure is
the instructions collected divided by the queries received. Compare two builds by running this in each (a
git worktree with its own editable install). Workloads as in bench.hot_path, smaller (callgrind is ~50×
slower): cached names from one client; from a router adding cookie, ECS and MAC for 500 devices of a site
(per-device policy); listed names from one client of no site; listed names from the router's devices.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import DEFAULT_DATA, top_site_names
from bench.hot_path import CLIENT, Bench
from bench.peers import device_options, wire_query

WORKLOADS = ("cached", "router", "blocked", "router-blocked")
_COLLECTED = "CPyPy_listener___UdpListener___datagram_received"
_ROUNDS = 2  # bench.round once, then once more: both are collected


def run_workload(kind: str, data: Path) -> int:
    """Warm a workload, then feed it to the listener `_ROUNDS` times; the queries fed."""
    rng = random.Random(5)
    names = top_site_names(data, 2000)
    listed = [f"l{index}.listed.example" for index in range(2000)]
    with tempfile.TemporaryDirectory() as scratch:
        devices = 500 if kind.startswith("router") else 0
        bench = Bench(Path(scratch), listed, devices)
        asked = listed if kind.endswith("blocked") else names
        if devices:
            cookies = [rng.randbytes(8) for _ in range(devices)]
            options = [device_options(device, rng, cookies[device]) for device in range(devices)]
            queries = [wire_query(rng.choice(asked), rng.choice(options), rng.randrange(65536)) for _ in range(4000)]
        else:
            queries = [wire_query(name, [], rng.randrange(65536)) for name in asked]
        bench.cache_names(names)
        bench.warm(queries)
        receive = bench.listener.datagram_received
        for _ in range(_ROUNDS):
            for query in queries:
                receive(query, CLIENT)
    return len(queries) * _ROUNDS


def count(kind: str, data: Path) -> float:
    """Instructions per query of one workload, in a child under callgrind."""
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={scratch}/out",
                f"--toggle-collect={_COLLECTED}",
                sys.executable,
                "-m",
                "bench.instructions",
                "--child",
                kind,
                "--data",
                str(data),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=True,
        )
    collected = int(re.search(r"Collected : (\d+)", result.stderr).group(1))  # type: ignore[union-attr]
    queries = int(re.search(r"^queries (\d+)$", result.stdout, re.M).group(1))  # type: ignore[union-attr]
    if not collected:
        raise SystemExit("callgrind collected nothing: is the query path compiled (not BNS_PURE_PYTHON)?")
    return collected / queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(f"queries {run_workload(args.child, args.data)}")
        return 0
    for kind in args.workload:
        print(f"{kind:<16} {count(kind, args.data):8.0f} instructions per query", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
