"""Every upstream down for a while in the middle of the traffic: how many of the names answered before it are
still answered, and how fast (serve-stale, RFC 8767).

    python -m bench.outage --data ../shared/data --names 2000 --seconds 30 --rate 1000

Starts a scripted upstream on loopback (answers with a TTL of `--ttl` seconds) in this process and one `bns
serve` node (2 workers) forwarding to it, asks `--names` real names (the top sites) eight times each, each time
from a new socket, so that every worker caches them (each has a cache of its own), waits until they have all
expired, then stops the upstream answering (every query dropped) and runs dnsperf at `--rate` over those names
for `--seconds`, with the latency of every query. Reported: the share of queries answered with data (NOERROR or
NXDOMAIN, as before the outage) and with SERVFAIL, the stale answers the node counted, p50 / p99 / max latency,
and the same with `cache.serve_stale = false` for the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_DATA, bns_command, free_port, machine, running, top_site_names
from bench.load import have_dnsperf, run_dnsperf, write_query_file
from bench.upstream import Script, ScriptedUpstream

TOKEN = "bench-admin-token-outage-0001"


def stale_count(api: str) -> int:
    request = urllib.request.Request(f"{api}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("bns_stale_answers_total "):
                return int(float(line.split()[1]))
    return 0


def run_outage(serve_stale: bool, names: list[str], scratch: Path, args: Any) -> dict[str, float]:
    script = Script(ttl=args.ttl)
    with ScriptedUpstream(script=script) as upstream, contextlib.ExitStack() as stack:
        port, admin = free_port(), free_port()
        config = scratch / f"stale-{serve_stale}.toml"
        config.write_text(
            f'[lists]\ncache_dir = "{scratch / "node"}"\n[admin]\ntokens = ["{TOKEN}"]\n'
            f"[cache]\nserve_stale = {'true' if serve_stale else 'false'}\n"
            "[activity]\nhand_over_seconds = 0.5\n"
        )
        command = bns_command(port, upstream.port, 2, "--config", str(config), "--admin-listen", f"127.0.0.1:{admin}")
        stack.enter_context(running(command, port, log=scratch / f"node-{serve_stale}.log"))
        queries = write_query_file(names, scratch / "names.txt")
        # each worker has a cache of its own, and a socket's queries go to one worker (dnsperf sends a name from
        # the same of its sockets each pass): eight passes of one socket each leave a name uncached in a worker
        # with odds of 1 in 256 (a popular name is in every one)
        warm = run_dnsperf(port, queries, runs=1, max_qps=4000, clients=1)
        for _ in range(7):
            run_dnsperf(port, queries, runs=1, max_qps=4000, clients=1)
        time.sleep(args.ttl + 1.5)  # every answer expired
        script.mode = "drop"  # the upstream stops answering
        before = stale_count(f"http://127.0.0.1:{admin}")
        load = run_dnsperf(port, queries, seconds=args.seconds, max_qps=args.rate, clients=8, per_query=True)
        time.sleep(1.0)  # the workers hand their counters over
        stale = stale_count(f"http://127.0.0.1:{admin}") - before
    completed = max(load.completed, 1)
    answered = load.rcodes.get("NOERROR", 0) + load.rcodes.get("NXDOMAIN", 0)
    return {
        "warmed": warm.completed,
        "sent": load.sent,
        "answered": answered / completed,
        "servfail": load.rcodes.get("SERVFAIL", 0) / completed,
        "lost": load.lost,
        "stale": stale,
        "p50": load.percentile(0.5),
        "p99": load.percentile(0.99),
        "max": load.percentile(1.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--names", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--ttl", type=int, default=5, help="TTL of the upstream's answers, in seconds")
    args = parser.parse_args(argv)
    if not have_dnsperf():
        raise SystemExit("dnsperf is not installed (apt-get install dnsperf)")
    names = top_site_names(args.data, args.names)
    rows = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        for serve_stale in (True, False):
            rows.append((serve_stale, run_outage(serve_stale, names, Path(scratch_dir), args)))
    lines = [
        f"Command: `python -m bench.outage {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}",
        "",
        "| serve_stale | answered (NOERROR/NXDOMAIN) | SERVFAIL | lost | stale answers counted | p50 ms | p99 ms "
        "| max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for serve_stale, row in rows:
        lines.append(
            f"| {'on' if serve_stale else 'off'} | {row['answered']:.2%} | {row['servfail']:.2%} | {row['lost']:.0f} "
            f"| {row['stale']:.0f} | {row['p50'] * 1000:.1f} | {row['p99'] * 1000:.0f} | {row['max'] * 1000:.0f} |"
        )
    lines.append(f"\n{args.names} names warmed, then asked at {args.rate} qps for {args.seconds:g} s, upstream down.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
