"""List feeds refreshed while real-shaped DNS traffic runs: what refreshing costs the answers, and the admin
process.

    python -m bench.feeds --runs 3 --seconds 20 --data ../shared/data

Serves `--feeds` synthetic feeds (default 20) totalling `--names` names (default 1.5 M) from an HTTP server on
loopback in this process (ETag and Last-Modified; 304 when they match; every fourth feed gzip-encoded), starts
one `bns serve` node (2 workers, no Redis) with a scripted upstream, adds the feeds through its admin API
(refresh interval 5 s) and waits until it blocks their names. Then, in each run, three phases in turn, each
`--seconds` of dnsperf at `--rate` (the Umbrella top sites with a tenth of the queries for feed names):

- **quiet**: `feeds.check_interval` set to a day through SIGHUP, so no feed is looked at (each phase starts
  once the admin process is idle: the last phase's build has ended);
- **unchanged**: `feeds.check_interval` 3 s, every feed due every 5 s and unchanged (the share of 304s);
- **changing**: as unchanged, but two feeds list one more name at each download, so every look compiles the
  1.5 M names and publishes them, and the workers swap lists under the load.

Reported per phase (medians over the runs): answers per second, queries lost, p50 / p99 latency, the admin
process's CPU (seconds per second) and peak RSS (reset at each phase's start), downloads answered 200 and 304,
the list versions published, and (changing) the seconds from the phase's start to the first version
published with a change (waited for past the phase when the build takes longer).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode

from bench.harness import DEFAULT_DATA, bns_command, free_port, machine, median, running, top_site_names
from bench.load import have_dnsperf, run_dnsperf, write_query_file

TOKEN = "bench-admin-token-feeds-00001"
PHASES = ("quiet", "unchanged", "changing")
CHANGING = 2  # feeds that list one more name at each download in the "changing" phase
_CATEGORIES = ("malware", "phishing", "drugs", "hacking", "weapons")


@dataclass
class Feed:
    path: str
    body: bytes
    gzip: bool
    extra: int = 0  # names added so far (the "changing" phase)

    def current(self) -> bytes:
        added = "".join(f"added{number}.{self.path.strip('/')}.feedbench.example\n" for number in range(self.extra))
        body = self.body + added.encode()
        return gzip.compress(body, compresslevel=1, mtime=0) if self.gzip else body  # the same bytes each time


@dataclass
class FeedHttp:
    """The feeds on loopback, with counts of what it answered."""

    feeds: dict[str, Feed]
    changing: bool = False
    answered: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = self
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        feed = self.feeds.get(handler.path)
        if feed is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        with self.lock:
            if self.changing and list(self.feeds).index(handler.path) < CHANGING:
                feed.extra += 1
            body = feed.current()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        status = 304 if handler.headers.get("If-None-Match") == etag else 200
        with self.lock:
            self.answered[status] = self.answered.get(status, 0) + 1
        handler.send_response(status)
        handler.send_header("ETag", etag)
        if status == 304:
            handler.end_headers()
            return
        if feed.gzip:
            handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def make_feeds(count: int, names: int, seed: int) -> dict[str, Feed]:
    rng = random.Random(seed)
    per_feed = names // count
    feeds = {}
    for number in range(count):
        labels = (f"{rng.getrandbits(40):010x}" for _ in range(per_feed))
        body = "".join(f"{label}.f{number}.feedbench.example\n" for label in labels).encode()
        feeds[f"/feed{number}.txt"] = Feed(f"/feed{number}.txt", body, gzip=number % 4 == 3)
    return feeds


def call(api: str, method: str, path: str, body: object = None, timeout: float = 300) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api + path, data=data, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text.startswith((b"{", b"[")) else text.decode()


def write_config(path: Path, scratch: Path, check_interval: float) -> None:
    path.write_text(
        f'[lists]\ncache_dir = "{scratch / "node"}"\ncheck_interval = 0.2\n'
        f'[store]\nfile = "{scratch / "policies.json"}"\n'
        f'[admin]\ntokens = ["{TOKEN}"]\n'
        f'[feeds]\nallow = ["127.0.0.0/8"]\ncheck_interval = {check_interval}\njitter = 0.0\n'
    )


def blocked(port: int, name: str) -> bool:
    with contextlib.suppress(OSError, dns.exception.Timeout):
        response = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1)
        return response.rcode() == dns.rcode.NXDOMAIN
    return False


def admin_pid(supervisor: int) -> int:
    """The supervisor's last child: the admin process is spawned after the workers."""
    return int(Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()[-1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settle(pid: int, idle: float = 0.05, patience: float = 300.0) -> None:
    """Wait until the process spends less than `idle` of a core for a second."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - before < idle:
            return
    raise SystemExit(f"the admin process (pid {pid}) stayed busy for {patience:.0f} s")


@dataclass
class PhaseResult:
    qps: float
    lost: int
    p50_ms: float
    p99_ms: float
    admin_cpu: float
    admin_peak_mb: float
    answered_200: int
    answered_304: int
    published: int
    change_published: float  # seconds from the first changed download to its list published


def run_phase(
    phase: str, node: int, config: Path, scratch: Path, server: FeedHttp, port: int, api: str, queries: Path, args: Any
) -> PhaseResult:
    admin = admin_pid(node)
    write_config(config, scratch, 86400.0 if phase == "quiet" else 3.0)
    server.changing = False
    os.kill(node, signal.SIGHUP)
    time.sleep(2.0)  # the reload reaches the admin process, whose next look is at once
    settle(admin)  # a build the last phase started ends before this one is measured
    server.changing = phase == "changing"
    Path(f"/proc/{admin}/clear_refs").write_text("5")  # the peak RSS from here
    since = time.time()
    with server.lock:
        server.answered = {}
    cpu_before, started = cpu_seconds(admin), time.monotonic()
    load = run_dnsperf(port, queries, seconds=args.seconds, max_qps=args.rate, clients=8, per_query=True)
    cpu = (cpu_seconds(admin) - cpu_before) / (time.monotonic() - started)
    with server.lock:
        answered = dict(server.answered)
    published = [v for v in call(api, "GET", "/v1/lists")["versions"] if v["published_at"] >= since]
    took = float("nan")
    if phase == "changing":  # from the phase's first download of a change to its publication
        server.changing = False
        while not published and time.time() - since < 600:
            time.sleep(0.5)
            published = [v for v in call(api, "GET", "/v1/lists")["versions"] if v["published_at"] >= since]
        took = min(v["published_at"] for v in published) - since if published else float("nan")
    return PhaseResult(
        load.qps,
        load.lost,
        load.percentile(0.5) * 1000,
        load.percentile(0.99) * 1000,
        cpu,
        peak_rss_mb(admin),
        answered.get(200, 0),
        answered.get(304, 0),
        len(published),  # of the versions kept (the last ten): a lower bound past ten
        took,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=3000, help="queries per second dnsperf sends")
    parser.add_argument("--feeds", type=int, default=20)
    parser.add_argument("--names", type=int, default=1_500_000)
    args = parser.parse_args(argv)
    if not have_dnsperf():
        raise SystemExit("dnsperf is not installed (apt-get install dnsperf)")
    feeds = make_feeds(args.feeds, args.names, seed=7)
    server = FeedHttp(feeds)
    results: dict[str, list[PhaseResult]] = {phase: [] for phase in PHASES}
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        upstream = free_port()
        stack.enter_context(running([sys.executable, "-m", "bench.upstream", "--port", str(upstream)], upstream))
        port, admin_port = free_port(), free_port()
        config = scratch / "bns.toml"
        write_config(config, scratch, 3.0)
        api = f"http://127.0.0.1:{admin_port}"
        node = stack.enter_context(
            running(
                bns_command(port, upstream, 2, "--config", str(config), "--admin-listen", f"127.0.0.1:{admin_port}"),
                port,
                log=scratch / "node.log",
            )
        )
        added_at = time.monotonic()
        for number, path in enumerate(feeds):
            category = _CATEGORIES[number % len(_CATEGORIES)]
            call(api, "POST", f"/v1/sources/{category}/feed", {"url": server.url(path), "interval": 5})
        listed = [line.decode() for feed in list(feeds.values())[-3:] for line in feed.body.splitlines()[:2000:200]]
        while not all(blocked(port, name) for name in listed):
            if time.monotonic() - added_at > 600:
                raise SystemExit(f"the feeds were not served within 600 s; see {scratch / 'node.log'}")
            time.sleep(0.5)
        print(f"20 feeds added and served in {time.monotonic() - added_at:.1f} s", file=sys.stderr)
        rng = random.Random(11)
        sites = top_site_names(args.data, 50_000)
        feed_names = [line.decode() for feed in feeds.values() for line in feed.body.splitlines()[::997]]
        workload = [rng.choice(feed_names) if rng.random() < 0.1 else rng.choice(sites) for _ in range(200_000)]
        queries = write_query_file(workload, scratch / "queries.txt")
        run_dnsperf(port, queries, seconds=args.seconds, max_qps=args.rate, clients=8)  # the cache warmed
        for run in range(args.runs):
            for phase in PHASES:
                results[phase].append(run_phase(phase, node, config, scratch, server, port, api, queries, args))
                print(f"run {run} {phase}: {results[phase][-1]}", file=sys.stderr)
        log_errors = [line for line in (scratch / "node.log").read_text().splitlines() if " ERROR " in line]
    server.httpd.shutdown()
    print(report(argv if argv is not None else sys.argv[1:], args, results, log_errors))
    return 0


def report(argv: list[str], args: Any, results: dict[str, list[PhaseResult]], log_errors: list[str]) -> str:
    lines = [
        f"Command: `python -m bench.feeds {' '.join(argv)}`  ",
        f"Machine: {machine()}  ",
        f"{args.feeds} feeds, {args.names:,} names, refresh interval 5 s; dnsperf at {args.rate} qps for "
        f"{args.seconds:g} s per phase, {args.runs} runs interleaved; medians (lost and downloads: summed).",
        "",
        "| phase | answers/s | lost | p50 ms | p99 ms | admin CPU (s/s) | admin peak RSS | 200s | 304s | 304 share "
        "| versions published | change → published |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, rows in results.items():
        ok, not_modified = sum(r.answered_200 for r in rows), sum(r.answered_304 for r in rows)
        share = f"{not_modified / (ok + not_modified):.1%}" if ok + not_modified else "-"
        lines.append(
            f"| {phase} | {median([r.qps for r in rows]):,.0f} | {sum(r.lost for r in rows)} "
            f"| {median([r.p50_ms for r in rows]):.2f} | {median([r.p99_ms for r in rows]):.2f} "
            f"| {median([r.admin_cpu for r in rows]):.2f} | {median([r.admin_peak_mb for r in rows]):.0f} MB "
            f"| {ok} | {not_modified} | {share} | {sum(r.published for r in rows)} "
            + (f"| {median([r.change_published for r in rows]):.1f} s |" if phase == "changing" else "| - |")
        )
    lines += ["", f"ERROR lines in the node's log: {len(log_errors)}", *log_errors[:5]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
