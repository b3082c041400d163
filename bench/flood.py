"""Hostile traffic against bns, measured from the clients' side.

    python -m bench.flood [--runs 3] [--seconds 5] [--baseline ../old-checkout]

- flood: one source sends 3,000 queries per second (`--flood-qps`) for unique names under one domain, which
  the upstream answers after 1 s; another source, in another /24, asks cached names at 100 qps. Reported:
  that client's p50/p99 latency and its lost queries (no answer within 2 s), what the flood got back, and
  the server's CPU seconds.
- spoofing: 1,000 distinct names asked through bns (100 at a time) of a scripted upstream that records each
  query: distinct source ports and IDs among them, and the share of upper-case letters in their names (0x20).
- reflection: one source sends 5,000 qps for one large answer (40 A records, 680 bytes for a 45-byte query),
  with loopback rate limited like any public source (`rate_limit.exempt = []`, the default rate); a second
  source in another /24 asks the same at 50 qps. Reported: the attacker's queries answered in full,
  truncated (TC=1, the slip) and not at all; the second source's share answered.

Each scenario runs `--runs` times against a fresh bns with one worker (and, with `--baseline`, the bns of
another checkout, the runs interleaved); figures are medians. The upstream is a scripted server in its own
process (in the bench's for spoofing, where it records). Only loopback is used; the load is bounded by rate
and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import uvloop

from bench.faults import write_config
from bench.harness import REPO, bns_command, free_port, machine, median, running, started
from bench.load import have_dnsperf, process_tree_cpu, run_dnsperf, write_query_file
from bench.upstream import Script, ScriptedUpstream, serve_until_interrupted

FLOOD_ZONE = "flood.example"
BIG_NAME = "big.example.net"
ATTACKER, BYSTANDER = "127.0.0.1", "127.0.1.1"  # two sources in two /24 prefixes
PROBE_TIMEOUT = 2.0


class _FloodScript(Script):
    """Names under the flooded domain take a second; everything else is answered at once (the big name with
    40 A records)."""

    def mode_for(self, name: str) -> str:
        if name.endswith("." + FLOOD_ZONE):
            return "delay"
        return "big" if name == BIG_NAME else "answer"


def serve_upstream(port: int) -> None:
    serve_until_interrupted(ScriptedUpstream("127.0.0.1", port, _FloodScript(ttl=86400, delay=1.0)))


# --- clients -------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    full: int = 0
    truncated: int = 0
    rcodes: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.full + self.truncated

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def paced_client(port: int, source: str, names: list[str], qps: int, seconds: float) -> Tally:
    """Send `qps` queries per second from `source` for `seconds`, in 10 ms batches; every reply counted and
    timed (a query unanswered after PROBE_TIMEOUT is lost)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    tally = Tally()
    pending: dict[int, float] = {}
    wire = [dns.message.make_query(name, "A", use_edns=0).to_wire()[2:] for name in names]

    def readable() -> None:
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            started = pending.pop(data[0] << 8 | data[1], None)
            if started is None:
                continue
            tally.latencies.append(time.perf_counter() - started)
            tally.rcodes[data[3] & 0x0F] = tally.rcodes.get(data[3] & 0x0F, 0) + 1
            if data[2] & 0x02:
                tally.truncated += 1
            else:
                tally.full += 1

    loop.add_reader(sock.fileno(), readable)
    start = loop.time()
    next_id = 0
    try:
        while loop.time() - start < seconds:
            due = int((loop.time() - start) * qps) - tally.sent
            for _ in range(due):
                next_id = (next_id + 1) & 0xFFFF
                pending[next_id] = time.perf_counter()
                with contextlib.suppress(BlockingIOError):
                    sock.send(next_id.to_bytes(2, "big") + wire[tally.sent % len(wire)])
                tally.sent += 1
            await asyncio.sleep(0.01)
        await asyncio.sleep(PROBE_TIMEOUT)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
    return tally


# --- scenarios -----------------------------------------------------------------------------------------------


@dataclass
class Target:
    label: str
    checkout: Path
    new: bool  # knows the settings of this issue (rate_limit, max_per_zone…)
    runs: list[dict[str, float]] = field(default_factory=list)


@contextlib.contextmanager
def bns(
    target: Target, upstream_port: int, directory: Path, **sections: dict[str, object]
) -> Iterator[tuple[int, int]]:
    """A bns of `target` with one worker; `sections` of configuration where it knows them."""
    port = free_port()
    extra: list[str] = []
    if sections and target.new:
        extra = ["--config", str(write_config(directory / f"bns-{port}.toml", **sections))]
    with running(bns_command(port, upstream_port, 1, *extra), port, cwd=target.checkout) as pid:
        yield port, pid


def flood_run(
    target: Target, upstream_port: int, directory: Path, args: argparse.Namespace, run: int
) -> dict[str, float]:
    cached = [f"www{index}.cached.example.org" for index in range(200)]
    count = int(args.flood_qps * args.seconds) + 1000
    flood_names = write_query_file([f"r{run}x{index}.{FLOOD_ZONE}" for index in range(count)], directory / "flood.txt")
    with bns(target, upstream_port, directory) as (port, pid):
        uvloop.run(paced_client(port, BYSTANDER, cached, 1000, 0.2))  # every cached name asked once
        cpu = process_tree_cpu(pid)
        with ThreadPoolExecutor(1) as pool:
            flooding = pool.submit(
                run_dnsperf,
                port,
                flood_names,
                seconds=args.seconds,
                clients=1,
                outstanding=10_000,
                max_qps=args.flood_qps,
            )
            time.sleep(0.5)  # the flood is on before the bystander asks
            probe = uvloop.run(paced_client(port, BYSTANDER, cached, args.probe_qps, args.seconds - 1.0))
            flooded = flooding.result()
        cpu = process_tree_cpu(pid) - cpu
    return {
        "p50 ms": probe.percentile(0.5) * 1000,
        "p99 ms": probe.percentile(0.99) * 1000,
        "lost %": 100 * (probe.sent - probe.answered) / probe.sent,
        "SERVFAIL": probe.rcodes.get(2, 0),
        "flood answered %": 100 * flooded.completed / max(flooded.sent, 1),
        "flood SERVFAIL %": 100 * flooded.rcodes.get("SERVFAIL", 0) / max(flooded.sent, 1),
        "server CPU s": cpu,
    }


def reflection_run(
    target: Target, upstream_port: int, directory: Path, args: argparse.Namespace, run: int
) -> dict[str, float]:
    with bns(target, upstream_port, directory, rate_limit={"exempt": []}) as (port, pid):
        uvloop.run(paced_client(port, BYSTANDER, [BIG_NAME], 10, 0.2))  # cached

        async def both() -> tuple[Tally, Tally]:
            return await asyncio.gather(
                paced_client(port, ATTACKER, [BIG_NAME], args.attack_qps, args.seconds),
                paced_client(port, BYSTANDER, [BIG_NAME], 50, args.seconds),
            )

        cpu = process_tree_cpu(pid)
        attack, other = uvloop.run(both())
        cpu = process_tree_cpu(pid) - cpu
    return {
        "attack full %": 100 * attack.full / attack.sent,
        "attack truncated %": 100 * attack.truncated / attack.sent,
        "attack unanswered %": 100 * (attack.sent - attack.answered) / attack.sent,
        "other source answered %": 100 * other.full / other.sent,
        "server CPU s": cpu,
    }


def spoofing_run(
    target: Target, upstream_port: int, directory: Path, args: argparse.Namespace, run: int
) -> dict[str, float]:
    with ScriptedUpstream() as upstream, bns(target, upstream.port, directory) as (port, _pid):
        names = [f"s{run}n{index}.spoof.example.org" for index in range(1000)]

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((BYSTANDER, 0))
        sock.settimeout(PROBE_TIMEOUT)
        for start in range(0, len(names), 100):  # 100 at a time, each batch answered before the next
            for index, name in enumerate(names[start : start + 100]):
                sock.sendto(dns.message.make_query(name, "A", id=index).to_wire(), ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                for _ in range(100):
                    sock.recv(65535)
        sock.close()
        seen = [item for item in upstream.seen if item.name.startswith(f"s{run}n")][:1000]
    letters = [char for item in seen for char in item.wire_name if char.isalpha()]
    return {
        "upstream queries": len(seen),
        "distinct ports": len({item.source_port for item in seen}),
        "distinct IDs": len({item.query_id for item in seen}),
        "upper-case letters %": 100 * sum(char.isupper() for char in letters) / max(len(letters), 1),
    }


SCENARIOS = {"flood": flood_run, "reflection": reflection_run, "spoofing": spoofing_run}


def table(name: str, targets: list[Target], runs: dict[str, list[dict[str, float]]]) -> list[str]:
    columns = list(next(iter(runs.values()))[0])
    lines = [f"| {name} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for target in targets:
        results = runs[target.label]
        cells = [f"{median([result[column] for result in results]):,.2f}" for column in columns]
        lines.append(f"| {target.label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Per run: "
        + "; ".join(
            f"{target.label}: "
            + ", ".join(
                f"{column} {[round(result[column], 2) for result in runs[target.label]]}" for column in columns[:3]
            )
            for target in targets
        )
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--flood-qps", type=int, default=3000)
    parser.add_argument("--probe-qps", type=int, default=100)
    parser.add_argument("--attack-qps", type=int, default=5000)
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--baseline", type=Path, help="also run the bns of this checkout (code before a change)")
    args = parser.parse_args()
    if not have_dnsperf():
        sys.exit("dnsperf is needed for the flood (Debian: apt-get install dnsperf)")
    targets = [Target("bns", REPO, True)]
    if args.baseline is not None:
        targets.append(Target(f"bns at {args.baseline.name}", args.baseline.resolve(), False))
    upstream_port = free_port()
    out = [
        f"Command: `python -m bench.flood {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"{args.runs} runs × {args.seconds} s per target and scenario, interleaved; bns with one worker.",
        "",
    ]
    upstream_command = [sys.executable, "-m", "bench.flood", "--serve-upstream", str(upstream_port)]
    with tempfile.TemporaryDirectory() as scratch, started(upstream_command):
        time.sleep(1.0)
        for scenario in args.scenario:
            runs: dict[str, list[dict[str, float]]] = {target.label: [] for target in targets}
            for run in range(args.runs):
                for target in targets:
                    result = SCENARIOS[scenario](target, upstream_port, Path(scratch), args, run)
                    runs[target.label].append(result)
                    print(f"{scenario} run {run + 1} {target.label}: {result}", file=sys.stderr, flush=True)
            out += [*table(scenario, targets, runs), ""]
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]))
    else:
        main()
