"""Publishing a real list to a fleet: time from `POST /v1/lists` to both nodes answering from it.

    python -m bench.publish --data ../shared/data --runs 3

Starts its own redis-server and two `bns serve` nodes (2 workers each, default `lists.check_interval`) that
share it, compiles the nine category files of `<data>/blocklists` (1.05 M names) plus one marker name per
run (so every run publishes a new version), pushes each artifact through node A's admin API, and polls
both nodes over DNS (every 20 ms, a fresh socket each time) until both block the marker on every worker.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from bench.harness import (
    DEFAULT_DATA,
    bns_command,
    free_port,
    machine,
    median,
    running,
    running_redis,
)

_TOKEN = "bench-admin-token-0000000001"


def _blocked(port: int, name: str) -> bool:
    response = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1)
    return response.rcode() == dns.rcode.NXDOMAIN


def _compile(data: Path, out: Path, marker: str, scratch: Path) -> None:
    tsv = scratch / "marker.tsv"
    tsv.write_text(f"{marker}\tdrugs\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "resolver",
            "lists",
            "compile",
            "--out",
            str(out),
            "--source-dir",
            str(data / "blocklists"),
            "--tsv",
            str(tsv),
        ],
        check=True,
        capture_output=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.data / "blocklists").is_dir():
        raise SystemExit(f"{args.data / 'blocklists'} is missing: this bench publishes the real lists")
    rows = []
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        upstream_port = free_port()
        redis_port = stack.enter_context(running_redis(scratch))
        stack.enter_context(
            running([sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)], upstream_port)
        )
        nodes = []
        for name in ("a", "b"):
            port, admin = free_port(), free_port()
            config = scratch / f"{name}.toml"
            config.write_text(
                f'[store]\nredis = "redis://127.0.0.1:{redis_port}/0"\n[lists]\ncache_dir = '
                f'"{scratch / name}"\n[admin]\ntokens = ["{_TOKEN}"]\n'
            )
            stack.enter_context(
                running(
                    bns_command(
                        port, upstream_port, 2, "--config", str(config), "--admin-listen", f"127.0.0.1:{admin}"
                    ),
                    port,
                )
            )
            nodes.append((port, admin))
        for run in range(args.runs):
            marker = f"run{run}.publish-marker.example"
            artifact = scratch / f"run{run}.bns"
            _compile(args.data, artifact, marker, scratch)
            request = urllib.request.Request(
                f"http://127.0.0.1:{nodes[0][1]}/v1/lists",
                data=artifact.read_bytes(),
                method="POST",
                headers={"Authorization": f"Bearer {_TOKEN}"},
            )
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=120) as response:
                response.read()
            accepted = time.monotonic() - started
            serving = {}
            while len(serving) < len(nodes):
                for port, _admin in nodes:
                    if port not in serving and all(_blocked(port, marker) for _ in range(8)):
                        serving[port] = time.monotonic() - started
                time.sleep(0.02)
            rows.append((artifact.stat().st_size, accepted, *serving.values()))
    lines = [
        f"Command: `python -m bench.publish {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}",
        "",
        "| run | artifact | push accepted (upload, verify, store, announce) | node A serving | node B serving |",
        "|---|---:|---:|---:|---:|",
    ]
    for number, (size, accepted, first, second) in enumerate(rows):
        lines.append(f"| {number} | {size / 2**20:.1f} MB | {accepted:.2f} s | {first:.2f} s | {second:.2f} s |")
    lines += [
        "",
        f"Median time from push to both nodes serving: **{median([max(r[2], r[3]) for r in rows]):.2f} s**; "
        f"push accepted in {median([r[1] for r in rows]):.2f} s.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
