"""Throughput, latency and server CPU per query of bns, against a minimal uvloop responder.

Workloads: `cached` (top-site names, answered from the cache) and `blocked` (names sampled from the real
category lists, answered by the filter stage from a compiled artifact).

Starts a scripted upstream, the baseline responder and bns with each worker count, all on loopback; warms
bns's cache with one pass over the workload; then runs the load against each server in turn, `--runs` times,
interleaved so that a noisy neighbour hurts every target alike. CPU per query is the servers' own CPU time
(all their processes, from /proc) divided by the answers they gave.

    python -m bench.qps --data ../shared/data --runs 5 --seconds 5
    python -m bench.qps --data ../shared/data --workload blocked --workers 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import DEFAULT_DATA, bns_command, free_port, machine, median, running, top_site_names
from bench.load import (
    LoadResult,
    have_dnsperf,
    process_tree_cpu,
    run_dnsperf,
    run_python_load,
    write_query_file,
)


@dataclass
class Target:
    label: str
    command: list[str]
    port: int
    qps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    generator_us: list[float] = field(default_factory=list)
    lost: int = 0
    rcodes: dict[str, int] = field(default_factory=dict)
    latency: LoadResult | None = None


def _load(
    target: Target, names: list[str], query_file: Path, args: argparse.Namespace, per_query: bool = False
) -> LoadResult:
    if have_dnsperf() and not args.python_load:
        return run_dnsperf(
            target.port,
            query_file,
            seconds=args.seconds,
            clients=args.clients,
            outstanding=args.outstanding,
            max_qps=args.latency_qps if per_query else None,
            per_query=per_query,
        )
    return run_python_load(target.port, names, args.seconds, outstanding=8 if per_query else args.outstanding)


_WARM_PASSES = 16


def measure(
    targets: list[Target], names: list[str], query_file: Path, args: argparse.Namespace, pids: dict[str, int]
) -> None:
    # Warm: every name into every worker's cache, so that every later query is a hit. The kernel spreads
    # client sockets over the workers (SO_REUSEPORT), so one pass reaches each worker with only some names;
    # after _WARM_PASSES passes from the clients' sockets the chance a worker missed a name is ~1/2**16.
    for target in targets:
        if have_dnsperf() and not args.python_load:
            # The first pass at a rate the scripted upstream keeps up with: faster, its misses would queue
            # past the deadline and the workers would cache SERVFAIL for some names.
            run_dnsperf(target.port, query_file, runs=1, clients=args.clients, outstanding=200, max_qps=5000)
            run_dnsperf(target.port, query_file, runs=_WARM_PASSES, clients=args.clients, outstanding=args.outstanding)
        else:
            run_python_load(target.port, names, 2.0)
    for _ in range(args.runs):
        for target in targets:
            before = process_tree_cpu(pids[target.label])
            result = _load(target, names, query_file, args)
            spent = process_tree_cpu(pids[target.label]) - before
            target.qps.append(result.qps)
            target.cpu_us.append(spent / max(result.completed, 1) * 1e6)
            target.generator_us.append(result.generator_cpu / max(result.completed, 1) * 1e6)
            target.lost += result.lost
            for code, count in result.rcodes.items():
                target.rcodes[code] = target.rcodes.get(code, 0) + count
    for target in targets:
        target.latency = _load(target, names, query_file, args, per_query=True)


def report(targets: list[Target], args: argparse.Namespace, command: str) -> str:
    baseline = targets[0]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Workload: {describe_workload(args)}; {args.runs} runs × {args.seconds} s per "
        f"target, interleaved; load: {'dnsperf' if have_dnsperf() and not args.python_load else 'Python'} "
        f"({args.clients} clients, {args.outstanding} outstanding); latency at {args.latency_qps} qps.",
        "",
        "| target | qps (median) | server CPU µs/query (median) | CPU ratio to baseline | qps ratio to "
        "1 worker | load generator CPU µs/query | p50 ms | p99 ms | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    one_worker = next((t for t in targets if t.label == "bns --workers 1"), None)
    for target in targets:
        latency = target.latency
        qps_ratio = median(target.qps) / median(one_worker.qps) if one_worker and target is not baseline else None
        lines.append(
            f"| {target.label} | {median(target.qps):,.0f} | {median(target.cpu_us):.2f} | "
            f"{median(target.cpu_us) / median(baseline.cpu_us):.2f}× | "
            f"{f'{qps_ratio:.2f}×' if qps_ratio else '–'} | {median(target.generator_us):.2f} | "
            f"{latency.percentile(0.5) * 1e3:.3f} | {latency.percentile(0.99) * 1e3:.3f} | {target.lost} |"
        )
    lines.append("")
    lines.append(
        "Response codes: "
        + "; ".join(
            f"{t.label}: " + ", ".join(f"{code} {count:,}" for code, count in sorted(t.rcodes.items())) for t in targets
        )
    )
    lines.append(
        "Per-run values: "
        + "; ".join(
            f"{t.label}: qps {[round(q) for q in t.qps]}, µs/query {[round(c, 2) for c in t.cpu_us]}" for t in targets
        )
    )
    return "\n".join(lines)


def describe_workload(args: argparse.Namespace) -> str:
    if args.workload == "blocked":
        return (
            f"{args.names} names sampled from the category files of the shared data, every one blocked by "
            f"the default policy (lists: the 1.05 M-name artifact)"
        )
    return f"first {args.names} names of top-sites, all cached"


def blocked_workload(args: argparse.Namespace, scratch: Path) -> tuple[list[str], Path]:
    """Names from the real category lists and an artifact of those lists."""
    directory = args.data / "blocklists"
    artifact = scratch / "lists.bns"
    subprocess.run(
        [sys.executable, "-m", "resolver", "lists", "compile", "--source-dir", str(directory), "--out", str(artifact)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    listed: list[str] = []
    for path in sorted(directory.glob("*.txt.gz")):
        with gzip.open(path, "rt") as lines:
            listed.extend(line.strip() for line in lines)
    return random.Random(3).sample(listed, args.names), artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data directory")
    parser.add_argument("--names", type=int, default=10_000, help="distinct names in the workload")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    # 32 client sockets so SO_REUSEPORT's hash spreads them over the workers; a window deep enough that
    # throughput is bound by CPU, not by outstanding ÷ latency.
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--outstanding", type=int, default=1000)
    parser.add_argument("--latency-qps", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workload", choices=("cached", "blocked"), default="cached")
    parser.add_argument("--python-load", action="store_true", help="use the Python generator even if dnsperf is here")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    upstream_port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        extra: list[str] = []
        if args.workload == "blocked":
            names, artifact = blocked_workload(args, Path(scratch))
            extra = ["--lists", str(artifact)]
        else:
            names = top_site_names(args.data, args.names)
        query_file = write_query_file(names, Path(scratch) / "queries.txt")
        targets = [
            Target(
                "minimal uvloop responder", [sys.executable, "-m", "bench.responder", "--port", "{port}"], free_port()
            )
        ]
        for workers in args.workers:
            port = free_port()
            targets.append(Target(f"bns --workers {workers}", bns_command(port, upstream_port, workers, *extra), port))
        upstream = [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port), "--ttl", "86400"]
        pids: dict[str, int] = {}
        with running(upstream, upstream_port):
            stack = [running([part.replace("{port}", str(t.port)) for part in t.command], t.port) for t in targets]
            try:
                for target, context in zip(targets, stack, strict=True):
                    pids[target.label] = context.__enter__()
                measure(targets, names, query_file, args, pids)
            finally:
                for context in reversed(stack):
                    context.__exit__(None, None, None)
    text = report(targets, args, "python -m bench.qps " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                [
                    {"label": t.label, "qps": t.qps, "cpu_us": t.cpu_us, "lost": t.lost, "rcodes": t.rcodes}
                    for t in targets
                ],
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
