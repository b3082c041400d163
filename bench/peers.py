"""bns beside the servers an operator would pick instead, on the same list, query streams and upstream.

    python -m bench.peers --data ../shared/data --runs 3 --seconds 8 [--plot bench/peers.png]

`--plot` needs matplotlib (`pip install -e '.[bench]'`).

`responder` is the floor of a Python server: a uvloop UDP protocol that turns each query into an empty
answer and does nothing else. Every other server gets the same ~1 M listed names (bns: its compiled
artifact; unbound: `local-zone … always_nxdomain`; dnsdist: a SuffixMatchNode answering NXDOMAIN;
pdns-recursor and knot-resolver: an RPZ zone) and forwards
everything else to the same scripted upstream on loopback. Each server runs pinned to core 0 with one
thread or worker; dnsperf sends from core 1 at a fixed rate, so every server answers the same queries and
its CPU time per answered query (all its processes, from /proc) is comparable. Servers not installed are
skipped with a note. `bns` runs its compiled hot path; `bns plain Python` the same code as Python
(BNS_PURE_PYTHON=1), as on a machine that could not compile it. Figures are medians of `--runs`
interleaved runs and ratios to unbound in the same run, after one pass of every server through each
workload (steady state; that first pass is reported apart).

Workloads (generated; real names from `--data` where present, synthetic otherwise):
- blocked: 100,000 distinct listed names and subdomains of them;
- cached: 10,000 names ×10 (every one answered from the cache after a warm-up);
- mixed: 70 % cached, 30 % blocked;
- cookie: each query from one of 10,000 clients with its own DNS cookie (RFC 7873), cached names;
- router: cookie + ECS + MAC options, as a customer's router adds them, 10,000 devices;
- misses: 1 M distinct names, none cached (each goes upstream; each run asks names of its own);
- local: 10,000 names of the zones a resolver answers itself (private reverse lookups, localhost, home.arpa,
  .local, .invalid) ×10: each server's own answers, none forwarded (the upstream counts what reaches it).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import ipaddress
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

from bench.faults import write_config
from bench.harness import (
    DEFAULT_DATA,
    REPO,
    bns_command,
    free_port,
    machine,
    median,
    pinned,
    running,
    top_site_names,
)
from bench.load import LoadResult, have_dnsperf, process_tree_cpu, write_query_file
from bench.policies import write_binary_queries
from bench.redis_processes import RedisServer
from bench.upstream import COUNT_INTERVAL

SERVER_CORE, LOAD_CORE = "0", "1"
# Every query of the bench comes from one address: bns's cap on one source's queries waiting for upstreams
# (flood isolation) would answer most misses SERVFAIL at once, which the peers, configured as shipped, do not
# do; lifted to the worker's whole capacity so that bns asks upstream as they do.
UNCAPPED = {"max_per_client": 1000}
COOKIE, ECS, MAC = 10, 8, 65001
CATEGORY_FILES = (
    "criminal-skills",
    "drugs",
    "hacking",
    "hate",
    "malware",
    "phishing",
    "pornography",
    "violence-gore",
    "weapons",
)


# --- data and workloads --------------------------------------------------------------------------------------


def listed_names(data: Path, synthetic: int, directory: Path) -> tuple[list[str], Path]:
    """The names every server blocks, and a directory of `<category>.txt` files for `bns lists compile`."""
    sources = directory / "sources"
    sources.mkdir()
    names: list[str] = []
    found = [data / "blocklists" / f"{category}.txt.gz" for category in CATEGORY_FILES]
    if all(path.exists() for path in found) and not synthetic:
        seen = set()
        for category, path in zip(CATEGORY_FILES, found, strict=True):
            with gzip.open(path, "rt") as lines:
                own = [line.strip().lower() for line in lines if line.strip() and not line.startswith("#")]
            (sources / f"{category}.txt").write_text("\n".join(own) + "\n")
            names += [name for name in own if name not in seen]
            seen.update(own)
    else:
        count = synthetic or 1_000_000
        print(f"note: using {count:,} synthetic listed names", file=sys.stderr)
        names = [f"l{index}.listed{index % 97}.example" for index in range(count)]
        (sources / "pornography.txt").write_text("\n".join(names) + "\n")
    return names, sources


def wire_query(name: str, options: list[tuple[int, bytes]], query_id: int = 0) -> bytes:
    labels = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\x00"
    rdata = b"".join(struct.pack("!HH", code, len(value)) + value for code, value in options)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(rdata)) + rdata
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 1) + labels + b"\x00\x01\x00\x01" + opt


def device_options(device: int, rng: random.Random, cookie: bytes) -> list[tuple[int, bytes]]:
    address = struct.pack("!I", (10 << 24) + device + 1)
    mac = b"\x02\x00" + struct.pack("!I", device)
    return [(COOKIE, cookie), (ECS, struct.pack("!HBB", 1, 32, 0) + address), (MAC, mac)]


@dataclass
class Workload:
    name: str
    path: Path
    binary: bool
    rate: int
    describe: str
    fresh: Callable[[int], Path] | None = None  # a file of its own per run (names no run has asked before)

    def path_for(self, run: int) -> Path:
        return self.fresh(run) if self.fresh is not None else self.path


def workloads(directory: Path, data: Path, listed: list[str], rng: random.Random, only: list[str]) -> list[Workload]:
    cached = top_site_names(data, 10_000)
    blocked = []
    for name in rng.sample(listed, min(50_000, len(listed))):
        blocked += [name, f"w{rng.randrange(10**6)}.{name}"]
    made = []

    def text(name: str, names: list[str], rate: int, describe: str) -> None:
        if name in only:
            made.append(Workload(name, write_query_file(names, directory / f"{name}.txt"), False, rate, describe))

    def binary(name: str, queries: list[bytes], rate: int, describe: str) -> None:
        if name in only:
            made.append(Workload(name, write_binary_queries(directory / f"{name}.bin", queries), True, rate, describe))

    text("blocked", blocked, 30_000, "100,000 distinct listed names and subdomains")
    repeated = cached * 10
    rng.shuffle(repeated)
    text("cached", repeated, 30_000, "10,000 cached names ×10")
    mixed = rng.sample(repeated, 70_000) + rng.sample(blocked, 30_000)
    rng.shuffle(mixed)
    text("mixed", mixed, 30_000, "70 % cached, 30 % blocked")
    cookies = [rng.randbytes(8) for _ in range(10_000)]
    binary(
        "cookie",
        [wire_query(rng.choice(cached), [(COOKIE, rng.choice(cookies))], rng.randrange(65536)) for _ in range(100_000)],
        30_000,
        "per-client DNS cookies, 10,000 clients, cached names",
    )
    devices = [device_options(device, rng, cookies[device]) for device in range(10_000)]
    binary(
        "router",
        [wire_query(rng.choice(cached), rng.choice(devices), rng.randrange(65536)) for _ in range(100_000)],
        30_000,
        "cookie + ECS + MAC from a router, 10,000 devices",
    )
    if "local" in only:
        local = [f"{name} {qtype}" for name, qtype in local_names(rng)] * 10
        rng.shuffle(local)
        path = directory / "local.txt"
        path.write_text("".join(f"{line}\n" for line in local))
        made.append(Workload("local", path, False, 30_000, "10,000 names answered locally ×10"))
    if "misses" in only:

        def fresh(run: int) -> Path:
            path = directory / f"misses-{run}.txt"
            if not path.exists():
                write_query_file([f"u{index}.r{run}.miss{index % 1000}.example" for index in range(1_000_000)], path)
            return path

        made.append(Workload("misses", fresh(0), False, 10_000, "1 M distinct names, each asked upstream", fresh))
    return made


def local_names(rng: random.Random) -> list[tuple[str, str]]:
    """10,000 distinct questions no resolver should forward (RFC 6303, 6761, 6762, 8375)."""
    private = [
        *(f"192.168.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(3_000)),
        *(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(3_000)),
        *(f"172.{rng.randrange(16, 32)}.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(1_500)),
        *(f"fe80::{rng.randrange(1 << 16):x}:{rng.randrange(1 << 16):x}" for _ in range(500)),
    ]
    questions = {(ipaddress.ip_address(address).reverse_pointer, "PTR") for address in private}
    for index in count():
        if len(questions) >= 10_000:
            break
        suffix = ("home.arpa", "local", "invalid", "localhost")[index % 4]
        questions.add((f"host{index}.{suffix}", "AAAA" if index % 3 else "A"))
    return sorted(questions)[:10_000]


# --- the servers ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    label: str
    command: list[str]
    port: int
    prepare: Callable[[], None] = lambda: None
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    first_pass: dict[str, float] = field(default_factory=dict)  # µs/query the first time through a workload
    results: dict[str, list[LoadResult]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    upstream: dict[str, int] = field(default_factory=dict)  # workload -> queries that reached the upstream


def unbound(directory: Path, port: int, upstream: int, listed: list[str]) -> list[str] | None:
    binary = shutil.which("unbound") or "/usr/sbin/unbound"
    if not Path(binary).exists():
        return None
    zones = directory / "unbound-zones.conf"
    with zones.open("w") as out:
        for name in listed:
            out.write(f'local-zone: "{name}." always_nxdomain\n')
    config = directory / "unbound.conf"
    config.write_text(f"""server:
  interface: 127.0.0.1@{port}
  port: {port}
  do-daemonize: no
  use-syslog: no
  logfile: ""
  verbosity: 0
  username: ""
  chroot: ""
  directory: "{directory}"
  pidfile: ""
  num-threads: 1
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  do-not-query-localhost: no
  msg-cache-size: 128m
  rrset-cache-size: 256m
  so-rcvbuf: 4m
  include: "{zones}"
remote-control:
  control-enable: no
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@{upstream}
""")
    return [binary, "-d", "-c", str(config)]


def dnsdist(directory: Path, port: int, upstream: int, listed: list[str]) -> list[str] | None:
    binary = shutil.which("dnsdist")
    if binary is None:
        return None
    names = directory / "dnsdist-names.txt"
    names.write_text("\n".join(listed) + "\n")
    config = directory / "dnsdist.conf"
    config.write_text(f"""setLocal("127.0.0.1:{port}")
setSecurityPollSuffix("")
newServer({{address="127.0.0.1:{upstream}", checkType="A", checkName="health.example.", checkInterval=60}})
pc = newPacketCache(200000, {{maxTTL=86400}})
getPool(""):setCache(pc)
smn = newSuffixMatchNode()
for line in io.lines("{names}") do smn:add(line) end
addAction(SuffixMatchNodeRule(smn, true), RCodeAction(DNSRCode.NXDOMAIN))
""")
    return [binary, "--supervised", "--disable-syslog", "-C", str(config)]


def rpz_zone(directory: Path, listed: list[str]) -> Path:
    zone = directory / "block.rpz"
    with zone.open("w") as out:
        out.write("$TTL 60\n@ SOA localhost. root.localhost. 1 3600 600 86400 60\n@ NS localhost.\n")
        for name in listed:
            out.write(f"{name} CNAME .\n*.{name} CNAME .\n")
    return zone


def pdns_recursor(directory: Path, port: int, upstream: int, listed: list[str]) -> list[str] | None:
    binary = shutil.which("pdns_recursor") or "/usr/sbin/pdns_recursor"
    if not Path(binary).exists():
        return None
    zone = directory / "block.rpz" if (directory / "block.rpz").exists() else rpz_zone(directory, listed)
    lua = directory / "recursor.lua"
    lua.write_text(f'rpzFile("{zone}", {{defpol=Policy.NXDOMAIN}})\n')
    socket_dir = directory / "recursor"
    socket_dir.mkdir(exist_ok=True)
    return [
        binary,
        "--local-address=127.0.0.1",
        f"--local-port={port}",
        "--daemon=no",
        "--quiet=yes",
        f"--forward-zones-recurse=.=127.0.0.1:{upstream}",
        "--threads=1",
        "--pdns-distributes-queries=no",
        f"--lua-config-file={lua}",
        "--dnssec=off",
        f"--socket-dir={socket_dir}",
        "--allow-from=127.0.0.0/8",
        "--max-cache-entries=1000000",
        "--config-dir=/nonexistent",
        "--disable-packetcache=no",
    ]


def knot_resolver(directory: Path, port: int, upstream: int, listed: list[str]) -> list[str] | None:
    binary = shutil.which("kresd") or "/usr/sbin/kresd"
    if not Path(binary).exists():
        return None
    zone = directory / "block.rpz" if (directory / "block.rpz").exists() else rpz_zone(directory, listed)
    config = directory / "kresd.conf"
    config.write_text(f"""net.listen('127.0.0.1', {port}, {{ kind = 'dns' }})
modules = {{ 'policy' }}
trust_anchors.remove('.')  -- the scripted upstream signs nothing: no validation, like the others here
cache.size = 200 * MB
policy.add(policy.rpz(policy.DENY, '{zone}', false))
policy.add(policy.all(policy.FORWARD('127.0.0.1@{upstream}')))
""")
    rundir = directory / "kresd"
    rundir.mkdir(exist_ok=True)
    return [binary, "-n", "-q", "-c", str(config), str(rundir)]


def bns(port: int, upstream: int, artifact: Path, config: Path) -> list[str]:
    return bns_command(port, upstream, 1, "--lists", str(artifact), "--config", str(config))


def compile_artifact(sources: Path, out: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "resolver", "lists", "compile", "--out", str(out), "--source-dir", str(sources)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )


def per_device_site(redis: RedisServer) -> None:
    """One site holding the benches' sources (127.0.0.0/8) and the router's devices (10.0.0.0/8, by ECS), in
    device mode: a group that blocks the eight categories with Web Protect on, and 10,000 devices in it."""
    import asyncio

    from resolver.shared.policy.service import PolicyService
    from tests.conftest import redis_policy_store

    devices = {
        f"d{device}": {
            "macs": [":".join(f"{b:02x}" for b in b"\x02\x00" + struct.pack("!I", device))],
            "group": "family",
        }
        for device in range(10_000)
    }
    site = {
        "networks": ["127.0.0.0/8", "10.0.0.0/8"],
        "mode": "device",
        "default_group": "family",
        "groups": {"family": {"policy": {"profile": "guest"}}},
        "devices": devices,
    }

    async def write() -> None:
        store = redis_policy_store(redis.url, "bns:")
        try:
            await PolicyService(store).put_site("home", site)
        finally:
            await store.close()

    asyncio.run(write())


# --- measuring -----------------------------------------------------------------------------------------------


def dnsperf(port: int, workload: Workload, seconds: float, run: int = 0, once: bool = False) -> LoadResult:
    """`workload` at its rate for `seconds`, or (`once`) through its file once."""
    from bench.load import parse_dnsperf

    command = pinned(
        [
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(port),
            "-d",
            str(workload.path_for(run)),
            "-c",
            "8",
            "-q",
            "500",
            "-t",
            "2",
            *(("-n", "1") if once else ("-l", str(seconds))),
            "-Q",
            str(workload.rate),
            "-v",
        ],
        LOAD_CORE,
    )
    if workload.binary:
        command.append("-B")
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_dnsperf(output)


def profile(server: Server, pid: int, loads: list[Workload], seconds: float, run: int) -> str:
    """Where bns's worker spends its time on each workload: py-spy samples while dnsperf runs, as the share of
    samples in each function's own code (self) and under it (total)."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        return "py-spy is not installed (pip install py-spy): no profile"
    worker = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    sections = []
    for workload in loads:
        with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
            recorder = subprocess.Popen(
                pinned(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(worker),
                        "--format",
                        "raw",
                        "--output",
                        raw.name,
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--duration",
                        str(int(seconds)),
                    ],
                    LOAD_CORE,
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            dnsperf(server.port, workload, seconds, run)
            recorder.wait(timeout=seconds + 30)
            sections.append(f"{workload.name}: " + top_functions(Path(raw.name).read_text()))
    return "\n".join(f"- {section}" for section in sections)


def top_functions(collapsed: str, count: int = 12) -> str:
    """The functions with the most samples of their own in py-spy's collapsed stacks ("a;b;c N" lines)."""
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        frame = stack.rsplit(";", 1)[-1]
        function = frame.split(" (")[0]
        own[function] = own.get(function, 0) + int(samples)
        total += int(samples)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{function} {samples / max(total, 1):.0%}" for function, samples in ranked)


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process and its descendants, in MB."""
    rss = pss = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
            stack += [int(child) for child in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
    return rss, pss


@contextlib.contextmanager
def running_server(server: Server, startup: float) -> Iterator[int]:
    server.prepare()
    with running(pinned(server.command, SERVER_CORE), server.port, startup=startup) as pid:
        yield pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--synthetic", type=int, default=0, help="this many synthetic listed names instead")
    parser.add_argument(
        "--workload", nargs="+", default=["blocked", "cached", "mixed", "cookie", "router", "misses", "local"]
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        default=[
            "responder",
            "unbound",
            "dnsdist",
            "pdns-recursor",
            "knot-resolver",
            "bns",
            "bns per-device",
            "bns plain Python",
        ],
    )
    parser.add_argument("--plot", type=Path, help="write the table as a PNG chart here")
    parser.add_argument("--profile", action="store_true", help="then profile bns on each workload (py-spy)")
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (only asked here: the plot comes after every run)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -e '.[bench]' (or leave --plot out)")
    if not have_dnsperf():
        parser.error("this bench needs dnsperf (Debian: apt-get install dnsperf)")
    rng = random.Random(17)
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        listed, sources = listed_names(args.data, args.synthetic, scratch)
        artifact = scratch / "lists.bns"
        compile_artifact(sources, artifact)
        loads = workloads(scratch, args.data, listed, rng, args.workload)
        upstream = free_port()
        counted = scratch / "upstream-count"
        stack.enter_context(
            running(
                pinned(
                    [sys.executable, "-m", "bench.upstream", "--port", str(upstream), "--count-file", str(counted)],
                    LOAD_CORE,
                ),
                upstream,
            )
        )
        redis = RedisServer(scratch / "redis", persistent=False)
        redis.directory.mkdir()
        redis.start()
        stack.callback(redis.stop)
        makers: dict[str, Callable[[Path, int], list[str] | None]] = {
            "responder": lambda d, p: [sys.executable, "-m", "bench.responder", "--port", str(p)],
            "unbound": lambda d, p: unbound(d, p, upstream, listed),
            "dnsdist": lambda d, p: dnsdist(d, p, upstream, listed),
            "pdns-recursor": lambda d, p: pdns_recursor(d, p, upstream, listed),
            "knot-resolver": lambda d, p: knot_resolver(d, p, upstream, listed),
            "bns": lambda d, p: bns(
                p,
                upstream,
                artifact,
                write_config(
                    d / "global.toml", store={"file": ""}, lists={"cache_dir": str(d / "cache")}, upstream=UNCAPPED
                ),
            ),
            "bns plain Python": lambda d, p: [
                "env",
                "BNS_PURE_PYTHON=1",  # the fallback where the hot path could not be compiled
                *bns(
                    p,
                    upstream,
                    artifact,
                    write_config(
                        d / "plain.toml",
                        store={"file": ""},
                        lists={"cache_dir": str(d / "cache-p")},
                        upstream=UNCAPPED,
                    ),
                ),
            ],
            "bns per-device": lambda d, p: bns(
                p,
                upstream,
                artifact,
                write_config(
                    d / "device.toml",
                    store={"redis": redis.url},
                    lists={"cache_dir": str(d / "cache-d")},
                    identity={"trusted_networks": ["127.0.0.0/8"]},
                    upstream=UNCAPPED,
                ),
            ),
        }
        servers = []
        for label in args.servers:
            port = free_port()
            command = makers[label](scratch, port)
            if command is None:
                notes.append(f"{label}: not installed, skipped")
                continue
            servers.append(
                Server(
                    label,
                    command,
                    port,
                    (lambda: per_device_site(redis)) if label == "bns per-device" else (lambda: None),
                )
            )
        pids = {server.label: stack.enter_context(running_server(server, startup=600)) for server in servers}
        cached = next((w for w in loads if w.name == "cached"), None)
        # Every server first goes once through each workload's queries (their names and devices new to it), so
        # that the runs measure servers in steady state, as an operator's are; what that first sight costs is
        # reported apart. The misses are names no run asked before, by design.
        for workload in loads:
            if workload.fresh is not None:
                continue
            for server in servers:
                pid = pids[server.label]
                before = process_tree_cpu(pid)
                result = dnsperf(server.port, workload, 0, once=True)
                server.first_pass[workload.name] = (process_tree_cpu(pid) - before) / max(result.completed, 1) * 1e6
        for run in range(args.runs):
            # Runs interleave the servers (each workload is measured on every server before the next), and
            # each run starts warm: the misses of the run before have pushed the cached names out.
            for server in servers:
                if cached is not None:
                    dnsperf(server.port, Workload("warm", cached.path, False, 50_000, ""), 3)
            for workload in loads:
                for server in servers:
                    pid = pids[server.label]
                    before, asked = process_tree_cpu(pid), upstream_count(counted)
                    result = dnsperf(server.port, workload, args.seconds, run)
                    spent = process_tree_cpu(pid) - before
                    server.upstream[workload.name] = (
                        server.upstream.get(workload.name, 0) + upstream_count(counted) - asked
                    )
                    server.cpu_us.setdefault(workload.name, []).append(spent / max(result.completed, 1) * 1e6)
                    server.results.setdefault(workload.name, []).append(result)
            print(
                f"run {run + 1}: "
                + "; ".join(
                    f"{server.label} " + ", ".join(f"{name} {values[-1]:.2f}" for name, values in server.cpu_us.items())
                    for server in servers
                ),
                file=sys.stderr,
            )
        for server in servers:
            server.memory["rss"], server.memory["pss"] = memory_mb(pids[server.label])
        profiles = {
            server.label: profile(server, pids[server.label], loads, args.seconds, args.runs)
            for server in servers
            if args.profile and server.label.startswith("bns")
        }
    print(report(servers, loads, args, notes, argv))
    for label, text in profiles.items():
        print(f"\nProfile of {label} (py-spy, share of the worker's samples):\n\n{text}")
    if args.plot is not None:
        plot(servers, loads, args.plot)
    return 0


def upstream_count(path: Path) -> int:
    """Queries the scripted upstream has received, once what it has received by now is written down."""
    time.sleep(2 * COUNT_INTERVAL)
    return int(path.read_text()) if path.exists() else 0


def table_head(title: str, servers: list[Server], column: str) -> list[str]:
    """A report table's title and head: a workload column, then one `column` (its alignment) per server."""
    labels = " | ".join(server.label for server in servers)
    return ["", title, "", f"| workload | {labels} |", "|---|" + column * len(servers)]


def report(
    servers: list[Server], loads: list[Workload], args: argparse.Namespace, notes: list[str], argv: list[str] | None
) -> str:
    baseline = next((server for server in servers if server.label == "unbound"), servers[0])
    lines = [
        f"Command: `python -m bench.peers {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Each server on core {SERVER_CORE}, one thread or worker; dnsperf on core {LOAD_CORE} at a fixed rate; "
        f"{args.runs} runs × {args.seconds:.0f} s per workload and server; medians; ratio to {baseline.label}.",
        *table_head("Server CPU µs per answered query (ratio to " + baseline.label + "):", servers, "---:|"),
    ]
    for workload in loads:
        base = median(baseline.cpu_us[workload.name])
        cells = [
            f"{median(server.cpu_us[workload.name]):.2f} ({median(server.cpu_us[workload.name]) / base:.2f}×)"
            for server in servers
        ]
        lines.append(f"| {workload.name}: {workload.describe} | " + " | ".join(cells) + " |")
    lines += table_head(
        "Answers per second, p50 / p99 latency (ms), lost queries (summed over the runs):", servers, "---|"
    )
    for workload in loads:
        cells = []
        for server in servers:
            results = server.results[workload.name]
            latencies = [latency for result in results for latency in result.latencies]
            ordered = sorted(latencies) or [float("nan")]
            cells.append(
                f"{median([result.qps for result in results]):,.0f}; "
                f"{ordered[len(ordered) // 2] * 1e3:.2f} / {ordered[int(len(ordered) * 0.99)] * 1e3:.2f}; "
                f"{sum(result.lost for result in results)}"
            )
        lines.append(f"| {workload.name} | " + " | ".join(cells) + " |")
    lines += table_head(
        "Queries that reached the upstream during the runs (summed), of those answered:", servers, "---:|"
    )
    for workload in loads:
        cells = [
            f"{server.upstream.get(workload.name, 0):,} of {sum(r.completed for r in server.results[workload.name]):,}"
            for server in servers
        ]
        lines.append(f"| {workload.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Memory after the runs (RSS / PSS, MB, all processes): "
        + "; ".join(f"{server.label} {server.memory['rss']:.0f} / {server.memory['pss']:.0f}" for server in servers),
    ]
    lines += [
        "",
        "Per-run µs/query: "
        + "; ".join(
            f"{server.label}: "
            + ", ".join(f"{name} {[round(v, 2) for v in values]}" for name, values in server.cpu_us.items())
            for server in servers
        ),
        "",
        "First pass through each workload, before the runs (every name and device new to the server), µs/query: "
        + "; ".join(
            f"{server.label}: " + ", ".join(f"{name} {value:.2f}" for name, value in server.first_pass.items())
            for server in servers
        ),
    ]
    lines += ["", *[f"Note: {note}" for note in notes]]
    return "\n".join(lines)


def plot(servers: list[Server], loads: list[Workload], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next((server for server in servers if server.label == "unbound"), servers[0])
    figure, axes = plt.subplots(figsize=(12.5, 5))
    width = 0.8 / len(servers)
    for index, server in enumerate(servers):
        ratios = [median(server.cpu_us[w.name]) / median(baseline.cpu_us[w.name]) for w in loads]
        axes.bar([position + index * width for position in range(len(loads))], ratios, width, label=server.label)
    axes.axhline(1.5, color="red", linestyle="--", linewidth=1, label="target for bns: 1.5×")
    axes.set_xticks(
        [position + width * (len(servers) - 1) / 2 for position in range(len(loads))], [w.name for w in loads]
    )
    axes.set_ylabel(f"server CPU per query, ratio to {baseline.label}")
    axes.set_title("CPU per query beside unbound (same list, streams and upstream; lower is better)")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
