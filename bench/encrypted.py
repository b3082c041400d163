"""DoT and DoH: bns beside dnsdist and unbound, on the same cached names and the same upstream.

    python -m bench.encrypted --runs 3 --seconds 8 [--data ../shared/data] [--idle 2000 10000]

Each server (bns with one worker, unbound with one thread, dnsdist) serves plain DNS, DoT and DoH on loopback
with the same certificate (a test CA's, tests/certificates.py), forwards misses to the same scripted upstream,
and runs pinned to core 0; every client runs on core 1. Servers not installed are skipped with a note. Before
the runs every server goes once through the cached names over UDP, so that each answers them from its cache.
Figures are medians of `--runs` interleaved runs (each measure on every server before the next); server CPU is
that of all its processes and threads, from /proc.

1. Reused connections, at `--rate` queries per second (below every server's capacity, so each answers the
   same queries), for `--seconds`: plain UDP and TCP for reference and DoT from dnsperf (8 clients; DoT's
   connections replaced by new ones after 100 queries); DoH GET and POST (HTTP/2) from h2load (8 connections
   kept open, 10 streams each at most: dnsperf 2.10 misses DoH answers that arrive together,
   DNS-OARC/dnsperf#240); then DoT
   (dnsperf) and DoH POST (h2load) with a new connection every 10 queries. Server CPU µs per answered query,
   the ratio to the best peer per transport (the issue's target for bns on reused connections: ≤ 1.5×), and
   lost queries.
2. New connections, on the DoT port:
   - `openssl s_time`, 4 clients at once for `--seconds`: full handshakes (TLS 1.3, connect, handshake, close)
     and resumed ones (TLS 1.2 session tickets: s_time cannot resume TLS 1.3); handshakes per second achieved,
     the server's share of its core (near 100 %: the server's own limit; below: the clients' limit), and server
     CPU µs per handshake;
   - a new connection and one query at `--connection-rate` per second, for `--seconds`: full (dnsperf,
     `-O num-queries-per-conn=1`), over DoT and over DoH; and resumed over DoT (TLS 1.3, Python's ssl with each
     connection's session ticket saved for the next, as a phone does). Server CPU µs per connection.
3. Memory of idle DoT connections: each server started afresh, then `--idle` connections opened (a full
   handshake and one query each, then nothing; as many as a worker holds for phones between their queries),
   to one bns worker; RSS growth of all the server's processes per connection, and the open descriptors it
   gained (which tells that it kept them all). The issue's target for bns: 10,000 idle connections per worker in
   ≤ 200 MB. bns's tls.max_connections, max_per_client and idle_timeout, unbound's incoming-num-tcp and
   tcp-idle-timeout and dnsdist's TCP receive timeout are raised for the run; RLIMIT_NOFILE too (to its hard
   limit, which must exceed the largest `--idle`).

`--reused-only` takes table 1 alone; `--baseline PATH` runs the bns of another checkout (an earlier commit's
worktree, installed with its hot path compiled) beside the others, as one more server.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import math
import os
import random
import re
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.faults import write_config
from bench.harness import DEFAULT_DATA, REPO, bns_command, free_port, machine, median, pinned, running, top_site_names
from bench.load import LoadResult, have_dnsperf, parse_dnsperf, process_tree_cpu, write_query_file
from bench.peers import UNCAPPED, memory_mb, wire_query
from tests.certificates import NAME, Authority, Pair

SERVER_CORE, LOAD_CORE = "0", "1"
TRANSPORTS = ("udp", "tcp", "dot", "doh-get", "doh-post")
REUSED_QUERIES = 100  # queries per connection on "reused" connections (the issue's measure), then a new one
EVERY_TEN = ("dot/10", "doh-post/10")  # a new connection every 10 queries
RATED = TRANSPORTS + EVERY_TEN  # the measures at `--rate`, where every server must answer the same queries
DOH_PATH = "/dns-query"
S_TIME_CLIENTS = 4
IDLE_TIMEOUT = 3600  # seconds: longer than any run, so that no server closes an idle connection during one


@dataclass(frozen=True)
class Ports:
    udp: int
    dot: int
    doh: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


@dataclass
class Server:
    label: str
    maker: Callable[[Path, Ports, int], list[str] | None]  # (directory, ports, idle connections to hold)
    ports: Ports
    checkout: Path = REPO  # where its command runs (bns: whose `resolver` it is)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # measure -> µs per query (or connection)
    results: dict[str, list[LoadResult]] = field(default_factory=dict)
    rates: dict[str, list[float]] = field(default_factory=dict)  # measure -> per second achieved
    busy: dict[str, list[float]] = field(default_factory=dict)  # measure -> share of the server's core used
    resumed: dict[str, list[float]] = field(default_factory=dict)  # measure -> share of handshakes resumed
    idle: dict[int, Idle] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Idle:
    connections: int  # idle connections open when measured
    rss_mb: float  # growth over the baseline, all the server's processes
    descriptors: int  # growth over the baseline

    @property
    def kb_per_connection(self) -> float:
        return self.rss_mb * 1024 / max(self.connections, 1)


# --- the servers ---------------------------------------------------------------------------------------------


def bns(directory: Path, ports: Ports, idle: int, *, upstream: int, pair: Pair) -> list[str]:
    room = idle + 1000  # the benches' own connections beside the idle ones
    config = write_config(
        directory / f"bns-{idle}.toml",
        store={"file": ""},
        upstream={**UNCAPPED},
        tls={
            "dot_listen": [f"127.0.0.1:{ports.dot}"],
            "doh_listen": [f"127.0.0.1:{ports.doh}"],
            "certificate": str(pair.certificate),
            "key": str(pair.key),
            "name": NAME,
            "doh_path": DOH_PATH,
            "max_connections": room,
            "max_per_client": room,  # every client of the bench is 127.0.0.1
            "idle_timeout": IDLE_TIMEOUT,
        },
    )
    return bns_command(ports.udp, upstream, 1, "--config", str(config))


def unbound(directory: Path, ports: Ports, idle: int, *, upstream: int, pair: Pair) -> list[str] | None:
    binary = shutil.which("unbound") or "/usr/sbin/unbound"
    if not Path(binary).exists():
        return None
    # Unbound shortens the idle timeout of a new TCP connection as its listener's incoming-num-tcp slots fill: to
    # 1/100 beyond 50 %, 1/500 beyond 65 %, none beyond 80 %. Slots enough to stay under 78 %, and a timeout
    # whose 1/500 still outlasts a run. Each TCP listener (three here) takes that many descriptors: fewer
    # outgoing ports leave more of RLIMIT_NOFILE to them (the idle run asks no upstream).
    slots = math.ceil((idle + 200) / 0.78)
    outgoing = "  outgoing-range: 256\n" if idle else ""
    config = directory / f"unbound-{idle}.conf"
    config.write_text(f"""server:
  interface: 127.0.0.1@{ports.udp}
  interface: 127.0.0.1@{ports.dot}
  interface: 127.0.0.1@{ports.doh}
  port: {ports.udp}
  tls-port: {ports.dot}
  https-port: {ports.doh}
  tls-service-key: "{pair.key}"
  tls-service-pem: "{pair.certificate}"
  http-endpoint: "{DOH_PATH}"
  incoming-num-tcp: {slots}
  tcp-idle-timeout: {IDLE_TIMEOUT * 500 * 1000}
{outgoing}  do-daemonize: no
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
  msg-cache-size: 64m
  rrset-cache-size: 128m
remote-control:
  control-enable: no
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@{upstream}
""")
    return [binary, "-d", "-c", str(config)]


def dnsdist(directory: Path, ports: Ports, idle: int, *, upstream: int, pair: Pair) -> list[str] | None:
    binary = shutil.which("dnsdist")
    if binary is None:
        return None
    config = directory / f"dnsdist-{idle}.conf"
    # One TCP worker thread, as bns has one worker and unbound one thread (all on one core anyway). dnsdist
    # closes a TCP or DoT connection that sends nothing for setTCPRecvTimeout (2 s), DoH after idleTimeout.
    config.write_text(f"""setLocal("127.0.0.1:{ports.udp}")
addTLSLocal("127.0.0.1:{ports.dot}", "{pair.certificate}", "{pair.key}", {{provider="openssl"}})
addDOHLocal("127.0.0.1:{ports.doh}", "{pair.certificate}", "{pair.key}", "{DOH_PATH}", {{idleTimeout={IDLE_TIMEOUT}}})
setMaxTCPClientThreads(1)
setMaxTCPQueuedConnections({idle + 1000})
setTCPRecvTimeout({IDLE_TIMEOUT})
setSecurityPollSuffix("")
newServer({{address="127.0.0.1:{upstream}", checkType="A", checkName="health.example.", checkInterval=60}})
pc = newPacketCache(200000, {{maxTTL=86400}})
getPool(""):setCache(pc)
""")
    return [binary, "--supervised", "--disable-syslog", "-C", str(config)]


@contextlib.contextmanager
def serving(server: Server, directory: Path, idle: int) -> Iterator[int]:
    command = server.maker(directory, server.ports, idle)
    assert command is not None, f"{server.label} is not installed"
    with running(pinned(command, SERVER_CORE), server.ports.udp, startup=60, cwd=server.checkout) as pid:
        yield pid


# --- clients -------------------------------------------------------------------------------------------------


def dnsperf(
    ports: Ports,
    transport: str,
    query_file: Path,
    seconds: float,
    rate: int,
    *,
    clients: int = 8,
    per_connection: int = 0,
    once: bool = False,
) -> LoadResult:
    """dnsperf over `transport` at `rate` for `seconds` (or, `once`, through the file once), from the load core;
    `per_connection`: open a new connection after that many queries."""
    port = {"udp": ports.udp, "tcp": ports.udp, "dot": ports.dot}.get(transport, ports.doh)
    command = [
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-m",
        transport.split("-", 1)[0],
        "-d",
        str(query_file),
        "-c",
        str(clients),
        "-q",
        "200",
        "-t",
        "2",
        "-Q",
        str(rate),
        *(("-n", "1") if once else ("-l", str(seconds))),
    ]
    if transport.startswith("doh"):
        command += ["-O", f"doh-uri=https://{NAME}:{ports.doh}{DOH_PATH}", "-O", f"doh-method={doh_method(transport)}"]
    if per_connection:
        command += ["-O", f"num-queries-per-conn={per_connection}"]
    output = subprocess.run(pinned(command, LOAD_CORE), capture_output=True, text=True, check=True).stdout
    result = parse_dnsperf(output)
    answered = http_answers(output)
    if answered > result.completed:
        # dnsperf 2.10 can receive a DoH answer (HTTP 200 and its body) and still time its query out (seen with
        # dnsdist and POST: DNS-OARC/dnsperf#240); the server answered it, so it counts as answered, and the
        # report says so, as such a run sent fewer queries than the rate.
        result.rcodes["uncounted by dnsperf"] = answered - result.completed
        result.completed = answered
    return result


H2LOAD_CLIENTS = 8  # DoH connections kept open, as dnsperf's clients for DoT


def h2load(
    ports: Ports, method: str, names: list[str], scratch: Path, seconds: float, rate: int, every: int = 0
) -> LoadResult:
    """DoH over HTTP/2 from h2load (nghttp2), which reads every answer it is sent (dnsperf 2.10 misses answers
    that arrive together, and stalls: DNS-OARC/dnsperf#240). `every` 0: H2LOAD_CLIENTS connections kept open
    for `seconds`, `rate` requests a second in all; else a new connection for each `every` requests, as many
    connections a second as make `rate`, until rate × seconds requests are done. GET asks `names` in turn; POST
    asks the first (every name is cached: the answer's cost is the same)."""
    base = f"https://127.0.0.1:{ports.doh}{DOH_PATH}"
    if method == "GET":
        uris = scratch / f"doh-get-uris-{ports.doh}.txt"  # the port is in each URI
        if not uris.exists():
            encoded = (base64.urlsafe_b64encode(wire_query(name, [])).rstrip(b"=").decode() for name in names)
            uris.write_text("".join(f"{base}?dns={query}\n" for query in encoded))
        target = ["-i", str(uris)]
    else:
        body = scratch / "doh-post-body"
        body.write_bytes(wire_query(names[0], []))
        target = ["-d", str(body), "-H", "content-type: application/dns-message", base]
    if every:
        connections = max(1, int(rate * seconds / every))
        per_tenth = max(1, rate // every // 10)  # connections opened each 0.1 s
        load = ["-c", str(connections), "-n", str(connections * every), "-m", "1", "-r", str(per_tenth)]
        load += ["--rate-period", "100ms"]
    else:
        load = ["-c", str(H2LOAD_CLIENTS), "-m", "10", "--rps", str(rate / H2LOAD_CLIENTS), "-D", f"{seconds:g}s"]
    command = ["h2load", "-H", "accept: application/dns-message", *load, *target]
    # Not check=True: h2load exits 1 when a request failed, which the counts below say.
    done = subprocess.run(pinned(command, LOAD_CORE), capture_output=True, text=True, check=False)
    return parse_h2load(done.stdout + done.stderr)


def parse_h2load(output: str) -> LoadResult:
    """Requests started, answered 2xx, and the run's seconds, from h2load's report."""
    requests = re.search(r"requests: \d+ total, (\d+) started", output)
    answered = re.search(r"status codes: (\d+) 2xx", output)
    finished = re.search(r"finished in ([\d.]+)(m?s)", output)
    if requests is None or answered is None or finished is None:
        raise ValueError(f"h2load output not understood:\n{output[-2000:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return LoadResult(sent=int(requests.group(1)), completed=int(answered.group(1)), seconds=seconds)


def http_answers(output: str) -> int:
    """The HTTP 200 responses dnsperf received over DoH (0 for other transports)."""
    match = re.search(r"HTTP/2 return codes:.*?\b200: (\d+)", output)
    return int(match.group(1)) if match else 0


def doh_method(transport: str) -> str:
    return "POST" if transport == "doh-post" else "GET"


def s_time(port: int, seconds: float, resumed: bool) -> tuple[int, int, float]:
    """`openssl s_time` from S_TIME_CLIENTS processes at once: (handshakes, of them resumed, wall seconds)."""
    # s_time resumes TLS 1.2 sessions only: it never reads the TLS 1.3 tickets that arrive after the handshake.
    mode = ["-reuse", "-tls1_2"] if resumed else ["-new"]
    command = pinned(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", *mode, "-time", str(int(seconds))], LOAD_CORE
    )
    started = time.monotonic()
    clients = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(S_TIME_CLIENTS)
    ]
    outputs = [client.communicate(timeout=seconds + 60)[0] for client in clients]
    wall = time.monotonic() - started
    counts = [parse_s_time(output) for output in outputs]
    return sum(count[0] for count in counts), sum(count[1] for count in counts), wall


def parse_s_time(output: str) -> tuple[int, int]:
    """(handshakes, of them resumed) of one `openssl s_time` run: the last timing section's count, and its
    progress marks ('r' a resumed handshake, '*' a full one)."""
    section = output.rsplit("starting", 1)[-1] if "starting" in output else output
    counts = re.findall(r"^(\d+) connections in [\d.]+s;", section, re.M)
    if not counts:
        raise ValueError(f"openssl s_time printed no count:\n{output[-2000:]}")
    marks = "".join(re.findall(r"^[*r]+$", section, re.M))
    return int(counts[-1]), marks.count("r")


def client_context(authority: Authority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(authority.path))


def dot_exchange(port: int, context: ssl.SSLContext, query: bytes, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    """A new DoT connection (resuming `session` if given) that has sent `query` and read its answer."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection = context.wrap_socket(raw, server_hostname=NAME, session=session)
    connection.sendall(struct.pack("!H", len(query)) + query)
    length = struct.unpack("!H", read_exactly(connection, 2))[0]
    read_exactly(connection, length)
    return connection


def read_exactly(connection: ssl.SSLSocket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed before the answer")
        data += chunk
    return data


def resumed_connections(
    port: int, context: ssl.SSLContext, names: list[str], seconds: float, rate: int
) -> tuple[int, int, int]:
    """New DoT connections at `rate` for `seconds`, each resuming the session of the one before it on its thread
    (TLS 1.3 tickets), one query each: (connections answered, of them resumed, failed)."""
    threads = 4
    answered = [0] * threads
    reused = [0] * threads
    failed = [0] * threads

    def client(index: int) -> None:
        session: ssl.SSLSession | None = None
        interval = threads / rate
        due = time.monotonic() + index * interval / threads
        end = time.monotonic() + seconds
        rng = random.Random(index)
        while due < end:
            time.sleep(max(0.0, due - time.monotonic()))
            due += interval
            try:
                connection = dot_exchange(
                    port, context, wire_query(rng.choice(names), [], rng.randrange(65536)), session
                )
            except OSError:
                failed[index] += 1
                continue
            answered[index] += 1
            reused[index] += bool(connection.session_reused)
            session = connection.session  # the ticket of this connection, for the next
            connection.close()

    # Pinned to the load core as every other client: os.sched_setaffinity applies to the calling thread.
    workers = [threading.Thread(target=on_load_core, args=(client, index)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(answered), sum(reused), sum(failed)


def on_load_core(function: Callable[[int], None], index: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, {int(LOAD_CORE)})
    function(index)


def open_idle(port: int, context: ssl.SSLContext, count: int, names: list[str]) -> tuple[list[ssl.SSLSocket], int]:
    """`count` DoT connections, each after a full handshake and one query: (those open, those that failed)."""
    rng = random.Random(count)
    queries = [wire_query(rng.choice(names), [], rng.randrange(65536)) for _ in range(count)]

    def one(query: bytes) -> ssl.SSLSocket | None:
        try:
            return dot_exchange(port, context, query, None)
        except OSError:
            return None

    with ThreadPoolExecutor(16, initializer=lambda: on_load_core(lambda _: None, 0)) as pool:
        made = list(pool.map(one, queries))
    opened = [connection for connection in made if connection is not None]
    return opened, count - len(opened)


def descriptors(pid: int) -> int:
    """Open file descriptors of a process and its descendants."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{current}/fd"))
            stack += [int(child) for child in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
    return total


def raise_open_files(needed: int) -> str | None:
    """RLIMIT_NOFILE up to its hard limit (the servers inherit it); a note if that is less than `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        return f"RLIMIT_NOFILE's hard limit is {target}: {needed - 1000:,} idle connections need {needed} descriptors"
    return None


# --- measuring -----------------------------------------------------------------------------------------------


def measure(server: Server, pid: int, key: str, action: Callable[[], float]) -> float:
    """Run `action` (which returns how many queries or connections it made) and record the server's CPU µs per
    one of them, and the share of its core it used; returns that count."""
    before, started = process_tree_cpu(pid), time.monotonic()
    count = action()
    spent, wall = process_tree_cpu(pid) - before, time.monotonic() - started
    server.cpu_us.setdefault(key, []).append(spent / max(count, 1) * 1e6)
    server.busy.setdefault(key, []).append(spent / wall if wall else 0.0)
    return count


def reused_load(
    server: Server, pid: int, key: str, query_file: Path, names: list[str], scratch: Path, args: argparse.Namespace
) -> None:
    """`key`: a transport on reused connections, or `transport/N`: a new connection every N queries. DoT's
    connections are renewed every REUSED_QUERIES queries (dnsperf); DoH's, from h2load, stay open."""
    transport, _, every = key.partition("/")
    result: list[LoadResult] = []

    def load() -> float:
        if transport.startswith("doh"):
            method = doh_method(transport)
            outcome = h2load(server.ports, method, names, scratch, args.seconds, args.rate, int(every or 0))
        else:
            per_connection = 0 if transport in ("udp", "tcp") else int(every or REUSED_QUERIES)
            outcome = dnsperf(
                server.ports, transport, query_file, args.seconds, args.rate, per_connection=per_connection
            )
        result.append(outcome)
        return outcome.completed

    measure(server, pid, key, load)
    server.results.setdefault(key, []).append(result[0])


def handshakes(server: Server, pid: int, resumed: bool, args: argparse.Namespace) -> None:
    key = "s_time resumed" if resumed else "s_time full"
    counts: list[tuple[int, int, float]] = []

    def shake() -> float:
        counts.append(s_time(server.ports.dot, args.seconds, resumed))
        return counts[-1][0]

    measure(server, pid, key, shake)
    total, reused, wall = counts[0]
    server.rates.setdefault(key, []).append(total / wall)
    server.resumed.setdefault(key, []).append(reused / max(total, 1))


def new_connections(server: Server, pid: int, transport: str, query_file: Path, args: argparse.Namespace) -> None:
    """A full handshake and one query per connection, from dnsperf."""
    key = f"new {transport}"
    result: list[LoadResult] = []

    def load() -> float:
        rate = args.connection_rate
        result.append(dnsperf(server.ports, transport, query_file, args.seconds, rate, per_connection=1))
        return result[-1].completed

    measure(server, pid, key, load)
    server.results.setdefault(key, []).append(result[0])


def resumed_exchanges(
    server: Server, pid: int, names: list[str], context: ssl.SSLContext, args: argparse.Namespace
) -> None:
    outcome: list[tuple[int, int, int]] = []

    def resuming() -> float:
        outcome.append(resumed_connections(server.ports.dot, context, names, args.seconds, args.connection_rate))
        return outcome[-1][0]

    measure(server, pid, "new dot resumed", resuming)
    answered, reused, failed = outcome[0]
    server.resumed.setdefault("new dot resumed", []).append(reused / max(answered, 1))
    server.results.setdefault("new dot resumed", []).append(
        LoadResult(sent=answered + failed, completed=answered, seconds=args.seconds)
    )


def one_run(
    servers: list[Server],
    pids: dict[str, int],
    query_file: Path,
    scratch: Path,
    names: list[str],
    context: ssl.SSLContext,
    args: argparse.Namespace,
) -> None:
    """Every measure once, each on every server before the next (a disturbance of the machine then falls on
    all the servers of a measure alike, not on one server's every measure)."""
    measures: list[Callable[[Server, int], None]] = [
        *(
            functools.partial(reused_load, key=key, query_file=query_file, names=names, scratch=scratch, args=args)
            for key in RATED
        ),
        *(functools.partial(handshakes, resumed=resumed, args=args) for resumed in (False, True)),
        *(
            functools.partial(new_connections, transport=t, query_file=query_file, args=args)
            for t in ("dot", "doh-post")
        ),
        functools.partial(resumed_exchanges, names=names, context=context, args=args),
    ]
    if args.reused_only:
        measures = measures[: len(RATED)]
    for step in measures:
        for server in servers:
            step(server, pids[server.label])


def idle_run(server: Server, directory: Path, names: list[str], context: ssl.SSLContext, counts: list[int]) -> None:
    """Start the server afresh, then hold `counts` idle DoT connections (in turn, adding to those open) and
    record the growth of its RSS and descriptors over a baseline taken after a few connections came and went.
    A server that cannot start with room for the largest count (unbound: not descriptors enough) is tried
    with the next."""
    counts = sorted(counts)
    while counts:
        server.ports = Ports.free()  # the ports of the runs may still have connections closing
        try:
            with serving(server, directory, counts[-1]) as pid:
                hold_idle(server, pid, names, context, counts)
            return
        except RuntimeError:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            server.notes.append(
                f"did not start with room for {counts[-1]:,} idle connections, skipped (unbound: its listeners' "
                f"incoming-num-tcp, three times, beyond RLIMIT_NOFILE's {limit})"
            )
            counts.pop()


def hold_idle(server: Server, pid: int, names: list[str], context: ssl.SSLContext, counts: list[int]) -> None:
    opened: list[ssl.SSLSocket] = []
    try:
        warm, _ = open_idle(server.ports.dot, context, 20, names)  # TLS set up, lazily made pools made
        for connection in warm:
            connection.close()
        time.sleep(1)
        base_rss, _ = memory_mb(pid)
        base_descriptors = descriptors(pid)
        for count in counts:
            more, failed = open_idle(server.ports.dot, context, count - len(opened), names)
            opened += more
            if failed:
                server.notes.append(f"{failed} of the idle connections toward {count:,} failed")
            time.sleep(2)  # closes the server might make on its own come now, not after the reading
            rss, _ = memory_mb(pid)
            server.idle[count] = Idle(len(opened), rss - base_rss, descriptors(pid) - base_descriptors)
    finally:
        for connection in opened:
            with contextlib.suppress(OSError):
                connection.close()


# --- report --------------------------------------------------------------------------------------------------


def held(server: Server, key: str, expected: float) -> bool:
    """Whether every run of `key` on `server` sent the queries its rate asks for (95 % of `expected`) and dnsperf
    counted every answer: only then did it answer the same queries as the others, and compare."""
    results = server.results.get(key, [])
    return bool(results) and all(
        result.sent >= 0.95 * expected and "uncounted by dnsperf" not in result.rcodes for result in results
    )


def best_peer(servers: list[Server], key: str, expected: float = 0.0) -> Server | None:
    """The peer (not bns) that spent the least CPU on `key`; with `expected`, among those that held the rate."""
    peers = [
        server
        for server in servers
        if not server.label.startswith("bns")
        and server.cpu_us.get(key)
        and (not expected or held(server, key, expected))
    ]
    return min(peers, key=lambda server: median(server.cpu_us[key]), default=None)


def report(servers: list[Server], args: argparse.Namespace, notes: list[str], argv: list[str] | None) -> str:
    labels = [server.label for server in servers]
    lines = [
        f"Command: `python -m bench.encrypted {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}, {ssl.OPENSSL_VERSION}  ",
        f"Each server on core {SERVER_CORE}; clients on core {LOAD_CORE}; {args.runs} runs × {args.seconds:.0f} s per "
        "measure and server; medians; ratio to the best peer (dnsdist, unbound) of the measure.",
    ]

    def table(title: str, keys: list[tuple[str, str]], cell: Callable[[Server, str], str]) -> None:
        lines.extend(["", title, "", "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(servers)])
        for key, describe in keys:
            lines.append(f"| {describe} | " + " | ".join(cell(server, key) for server in servers) + " |")

    expected = args.rate * args.seconds

    def cpu(server: Server, key: str) -> str:
        values = server.cpu_us.get(key)
        if not values:
            return "–"
        reused = key in RATED
        peer = best_peer(servers, key, expected if reused else 0.0)
        ratio = f" ({median(values) / median(peer.cpu_us[key]):.2f}×)" if peer is not None else ""
        mark = "" if not reused or held(server, key, expected) else " ²"
        return f"{median(values):.1f}{ratio}{mark}"

    def lost(server: Server, key: str) -> str:
        results = server.results.get(key, [])
        if not results:
            return "–"
        uncounted = sum(result.rcodes.get("uncounted by dnsperf", 0) for result in results)
        besides = f" ({uncounted} answers dnsperf missed¹)" if uncounted else ""
        return f"{sum(result.lost for result in results)} of {sum(result.sent for result in results)}{besides}"

    reused = [
        ("udp", "UDP"),
        ("tcp", "TCP, connections kept open (what DoT adds TLS to)"),
        ("dot", "DoT"),
        ("doh-get", "DoH GET"),
        ("doh-post", "DoH POST"),
        ("dot/10", "DoT, a new connection every 10 queries"),
        ("doh-post/10", "DoH POST, a new connection every 10 queries"),
    ]
    table(
        f"1. Reused connections ({REUSED_QUERIES} queries each, then a new one; and every 10), cached names, "
        f"{args.rate:,} queries/s: server CPU µs per answered query (ratio to the best peer; target for bns on "
        "reused connections ≤ 1.5×):",
        reused,
        cpu,
    )
    table("Lost queries (unanswered of sent, summed over the runs):", reused, lost)

    def rate(server: Server, key: str) -> str:
        if not server.rates.get(key):
            return "–"
        share = f", {median(server.resumed[key]):.0%} resumed" if key.endswith("resumed") else ""
        capacity = 1e6 / median(server.cpu_us[key])  # what a whole core would do at this cost
        return (
            f"{median(server.rates[key]):,.0f}/s, core {median(server.busy[key]):.0%}{share}; {capacity:,.0f}/s a core"
        )

    shakes = [("s_time full", "full handshake, TLS 1.3"), ("s_time resumed", "resumed handshake, TLS 1.2 ticket")]
    table(
        f"2. New connections: handshakes per second from {S_TIME_CLIENTS} openssl s_time clients, and the server's "
        "share of its core (near 100 %: the server's limit), and what a whole core would do at its CPU per handshake:",
        shakes,
        rate,
    )
    connections = [
        *shakes,
        ("new dot", "DoT new connection + 1 query, full handshake (dnsperf)"),
        ("new doh-post", "DoH new connection + 1 POST, full handshake (dnsperf)"),
        ("new dot resumed", "DoT new connection + 1 query, resumed TLS 1.3 (Python ssl)"),
    ]
    table(
        f"Server CPU µs per new connection (ratio to the best peer); the three last asked for at "
        f"{args.connection_rate:,}/s (dnsperf's reconnections may reach fewer: the counts below):",
        connections,
        cpu,
    )
    lines.append(
        "\nResumed TLS 1.3 connections that did resume: "
        + "; ".join(
            f"{s.label} {median(s.resumed['new dot resumed']):.0%}" for s in servers if s.resumed.get("new dot resumed")
        )
    )
    table("Lost (new connections without an answer, of those tried):", connections[2:], lost)
    if any(server.idle for server in servers):
        counts = sorted({count for server in servers for count in server.idle})

        def memory(server: Server, key: str) -> str:
            idle = server.idle.get(int(key))
            if idle is None:
                return "–"
            return f"{idle.rss_mb:.0f} MB, {idle.kb_per_connection:.1f} KB each; +{idle.descriptors:,} fds"

        table(
            "3. Idle DoT connections (a handshake and one query each): RSS growth of the server's processes, per "
            "connection, and descriptors gained (target for bns: 10,000 in ≤ 200 MB per worker):",
            [(str(count), f"{count:,} connections") for count in counts],
            memory,
        )
    notes = notes + [f"{server.label}: {note}" for server in servers for note in server.notes]
    if any(not held(server, key, expected) for server in servers for key in RATED if server.results.get(key)):
        notes.append(
            "² this server did not answer at the rate (it sent less than 95 % of the queries the rate asks for, or "
            "dnsperf missed answers): not the same load as the others, left out of the best peer; a lower --rate "
            "compares it"
        )
    if any("uncounted by dnsperf" in result.rcodes for s in servers for rs in s.results.values() for result in rs):
        notes.append(
            "¹ dnsperf 2.10 received these DoH answers (HTTP 200) yet timed their queries out (DNS-OARC/dnsperf#240); "
            "they count as answered, but a run that waited on them sent fewer queries than the rate"
        )
    lines += ["", *[f"Note: {note}" for note in notes]]
    lines += [
        "",
        "Per-run µs: "
        + "; ".join(
            f"{server.label}: "
            + ", ".join(f"{key} {[round(v, 1) for v in values]}" for key, values in server.cpu_us.items())
            for server in servers
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=3_000, help="queries per second on reused connections")
    parser.add_argument("--connection-rate", type=int, default=200, help="new connections per second")
    parser.add_argument("--idle", type=int, nargs="*", default=[2_000, 10_000], help="idle connections to hold")
    parser.add_argument("--servers", nargs="+", default=["unbound", "dnsdist", "bns"])
    parser.add_argument("--reused-only", action="store_true", help="only the measures at --rate (table 1)")
    parser.add_argument("--baseline", type=Path, help="also run the bns of this checkout (code before a change)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("dnsperf", "openssl", "h2load") if shutil.which(tool) is None]
    if missing or not have_dnsperf():
        parser.error(f"this bench needs {', '.join(missing)} (Debian: apt-get install dnsperf openssl nghttp2-client)")
    notes: list[str] = []
    if args.idle:
        note = raise_open_files(max(args.idle) + 1000)
        if note:
            parser.error(note)
    rng = random.Random(20)
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        authority = Authority(scratch / "ca")
        pair = authority.issue()
        context = client_context(authority)
        names = top_site_names(args.data, 10_000)
        repeated = names * 10
        rng.shuffle(repeated)
        query_file = write_query_file(repeated, scratch / "cached.txt")
        warm_file = write_query_file(names, scratch / "names.txt")
        upstream = free_port()
        stack.enter_context(
            running(pinned([sys.executable, "-m", "bench.upstream", "--port", str(upstream)], LOAD_CORE), upstream)
        )
        makers = {"bns": bns, "unbound": unbound, "dnsdist": dnsdist}
        servers = []
        for label in args.servers:
            server = Server(label, functools.partial(makers[label], upstream=upstream, pair=pair), Ports.free())
            if server.maker(scratch, server.ports, 0) is None:
                notes.append(f"{label}: not installed, skipped")
                continue
            servers.append(server)
        if args.baseline is not None:
            maker = functools.partial(bns, upstream=upstream, pair=pair)
            servers.append(Server(f"bns at {args.baseline.name}", maker, Ports.free(), args.baseline.resolve()))
        with contextlib.ExitStack() as live:
            pids = {server.label: live.enter_context(serving(server, scratch, 0)) for server in servers}
            for server in servers:  # every name in every cache, as the steady state of a resolver
                dnsperf(server.ports, "udp", warm_file, 0, 5_000, once=True)
            for run in range(args.runs):
                one_run(servers, pids, query_file, scratch, names, context, args)
                print(
                    f"run {run + 1}: "
                    + "; ".join(
                        f"{server.label} "
                        + ", ".join(f"{key} {values[-1]:.1f}" for key, values in server.cpu_us.items())
                        for server in servers
                    ),
                    file=sys.stderr,
                )
        if args.idle:
            for server in servers:
                idle_run(server, scratch, names, context, args.idle)
    print(report(servers, args, notes, argv))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
