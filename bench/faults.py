"""Faults an operator meets, done to real processes, counted: what the clients saw while they happened.

    python -m bench.faults [--runs 3] [--scenario restart flush failover late paused]

- restart / flush: a node serving two sites; Redis is killed and started again from its append-only file
  (or its scripts are flushed). Then a stream of clients the node never saw, each from a new address of a
  site: seconds until they get their site's policy again (target ≤ 1 s), SERVFAIL among them (target 0).
- failover: a Sentinel deployment (primary, two replicas, three sentinels, down after 1 s); dnsperf sends
  a steady stream of cached queries, a second stream comes from addresses never seen (a store lookup each)
  and an admin writes a device per API call; the primary is killed. Lost queries and SERVFAIL (target 0),
  seconds from promotion to the first write that succeeds (target ≤ 5), acknowledged writes missing after
  (target 0).
- late: a list of 1.2 M names is published through Redis; a new node is started while a client asks it for
  a listed name in a tight loop from before the start: answers carrying the real address (target 0).
- paused: the policy store dies while a node holds a paused site; 1,000 devices of that site the node never
  saw ask for an allowed name: answers that escape the pause (target 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rcode

from bench.harness import REPO, free_port, machine, median, running, started
from bench.load import have_dnsperf, run_dnsperf, write_query_file
from bench.redis_processes import RedisServer, SentinelDeployment
from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists
from resolver.shared.store.publications import RedisPublications
from resolver.shared.store.redis import RedisConnection

TOKEN = "bench-faults-token-000001"
LISTED = "gore.example"  # violence-gore in the bench's list
MAC_OPTION = 65001
CATALOG = load_catalog()


def mac(number: int) -> str:
    return "02:00:00:" + ":".join(f"{byte:02x}" for byte in number.to_bytes(3, "big"))


def mac_option(number: int) -> dns.edns.GenericOption:
    return dns.edns.GenericOption(MAC_OPTION, bytes.fromhex(mac(number).replace(":", "")))


def not_ready(response: dns.message.Message) -> bool:
    """SERVFAIL with EDE 14: a node that follows published lists and has not installed the current one."""
    return response.rcode() == dns.rcode.SERVFAIL and any(
        option.otype == dns.edns.OptionType.EDE and option.code == 14 for option in response.options
    )


def outcome(response: dns.message.Message) -> str:
    """resolved (addresses in the answer), not ready, or the rcode."""
    if any(rrset.rdtype in (1, 28) for rrset in response.answer):
        return "resolved"
    return "not ready" if not_ready(response) else dns.rcode.to_text(response.rcode())


def write_config(path: Path, **sections: dict[str, object]) -> Path:
    path.write_text(
        "".join(
            f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
            for section, keys in sections.items()
        )
    )
    return path


def compile_list(directory: Path, filler: int = 0) -> Path:
    """gore.example (violence-gore), drug.example (drugs), porn.example (pornography), and `filler` more
    synthetic names (a list of realistic size takes a node a realistic time to fetch and verify)."""
    sources = []
    for category, name in (("violence-gore", LISTED), ("drugs", "drug.example"), ("pornography", "porn.example")):
        path = directory / f"{category}.txt"
        path.write_text(f"{name}\n" + "".join(f"filler{number}.{category}.example\n" for number in range(filler)))
        sources.append(Source(path, category))
    out = directory / f"faults-{filler}.bns"
    compile_lists(sources, out, CATALOG)
    return out


def publish(redis_url: str, prefix: str, artifact: Path, scratch: Path) -> str:
    """Publish `artifact` through Redis as an admin's push would; its version."""

    async def run() -> str:
        connection = RedisConnection(redis_url, prefix)
        try:
            publications = RedisPublications(CATALOG, scratch / "unused.bns", connection, scratch)
            return (await publications.publish(artifact)).version
        finally:
            await connection.close()

    return asyncio.run(run())


def api_call(api: str, method: str, path: str, body: object = None) -> int:
    """The HTTP status of one admin API call (0: no answer)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api + path, data=data, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Hammer:
    """Queries from a thread in a tight loop, counted by outcome; `queries(number)` makes each one."""

    def __init__(self, port: int, queries: object, source: object = "127.0.0.1", timeout: float = 2.0) -> None:
        self.port = port
        self.timeout = timeout
        self.queries = queries  # Callable[[int], dns.message.Message]
        self.source = source  # a str, or Callable[[int], str]
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            source = self.source(number) if callable(self.source) else self.source
            try:
                response = dns.query.udp(
                    self.queries(number),
                    "127.0.0.1",
                    port=self.port,  # type: ignore[operator]
                    source=source,
                    timeout=self.timeout,
                )
            except dns.exception.Timeout:
                self.outcomes["lost"] += 1
                continue
            except OSError:  # nothing listens yet: the refusal comes back at once
                self.outcomes["refused"] += 1
                time.sleep(0.01)
                continue
            self.outcomes[outcome(response)] += 1

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Writer:
    """Adds a device to a site per admin API call, from a thread, as fast as the API answers; keeps
    (answered at, device number, HTTP status) per write."""

    def __init__(self, api: str, site: str) -> None:
        self.api, self.site = api, site
        self.results: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            status = api_call(self.api, "PUT", f"/v1/sites/{self.site}/devices/d{number}", {"macs": [mac(number)]})
            self.results.append((time.monotonic(), number, status))
            time.sleep(0.02)

    def devices(self, status: int) -> set[str]:
        return {f"d{number}" for _at, number, answered in self.results if answered == status}

    def first_success_after(self, moment: float) -> float:
        return min((at for at, _number, status in self.results if at > moment and status == 200), default=float("inf"))

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)


def site_devices(api: str, site: str) -> set[str]:
    request = urllib.request.Request(f"{api}/v1/sites/{site}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=15) as response:
        return set(json.loads(response.read())["devices"])


def new_address(number: int) -> str:
    """A loopback address per number (127.1.0.1 onwards): a client the node has not seen."""
    return f"127.1.{number // 250 % 250}.{number % 250 + 1}"


@contextlib.contextmanager
def node(
    config: Path,
    port: int,
    upstream_port: int,
    admin: int | None = None,
    workers: int = 2,
    log: Path | None = None,
    tree: Path = REPO,
) -> Iterator[subprocess.Popen[bytes]]:
    """`bns serve` as a process, not waited for: the scenario decides what "started" means. `tree`: the
    checkout whose `resolver` runs (another commit's, for a baseline)."""
    command = [
        sys.executable,
        "-m",
        "resolver",
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--workers",
        str(workers),
        "--admin-listen",
        f"127.0.0.1:{admin}" if admin else "",
    ]
    with started(command, log=log, cwd=tree) as process:
        yield process


def answering(port: int, within: float = 20.0) -> None:
    started = time.monotonic()
    while True:
        with contextlib.suppress(dns.exception.Timeout, OSError):
            query = dns.message.make_query("ready.invalid", "ANY", use_edns=0)
            if not not_ready(dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)):
                return
        if time.monotonic() - started > within:
            raise RuntimeError(f"the node on port {port} never answered")
        time.sleep(0.05)


# --- scenarios ------------------------------------------------------------------------------------------------

SITES = {
    "warm": {"networks": ["127.0.0.1/32"], "mode": "network", "policy": {"block": ["drugs"], "web_protect": False}},
    "cold": {"networks": ["127.1.0.0/16"], "mode": "network", "policy": {"block": ["drugs"], "web_protect": False}},
}


def scenario_forgetful_redis(
    scratch: Path, upstream_port: int, artifact: Path, fault: str, tree: Path = REPO
) -> dict[str, float]:
    """restart / flush: seconds until new clients get their site's policy again, and SERVFAIL meanwhile."""
    redis = RedisServer(scratch / f"redis-{fault}")
    redis.directory.mkdir()
    redis.start()
    port, admin = free_port(), free_port()
    config = write_config(
        scratch / f"{fault}.toml",
        store={"redis": redis.url},
        admin={"tokens": [TOKEN]},
        lists={"path": str(artifact), "cache_dir": str(scratch / f"cache-{fault}")},
    )
    try:
        with node(config, port, upstream_port, admin, tree=tree):
            answering(port)
            for site, document in SITES.items():
                assert api_call(f"http://127.0.0.1:{admin}", "PUT", f"/v1/sites/{site}", document) == 200
            query = dns.message.make_query("porn.example", "A")
            for _ in range(16):  # every worker has looked a client up (the kernel spreads source ports)
                assert outcome(dns.query.udp(query, "127.0.0.1", port=port, timeout=2)) == "resolved"
            if fault == "restart":
                redis.kill()
                redis.start()
            else:
                redis.command("SCRIPT", "FLUSH")
            back = time.monotonic()
            recovered = None
            outcomes: collections.Counter[str] = collections.Counter()
            for number in range(1, 2001):  # a new client each time
                response = dns.query.udp(query, "127.0.0.1", port=port, source=new_address(number), timeout=2)
                seen = outcome(response)  # the site's policy lets porn.example through; the default does not
                outcomes[seen] += 1
                if seen == "resolved" and recovered is None:
                    recovered = time.monotonic() - back
                if recovered is not None and number >= 500:
                    break
    finally:
        redis.stop()
    return {
        "recovered_s": recovered if recovered is not None else float("inf"),
        "servfail": outcomes["SERVFAIL"],
        "clients": sum(outcomes.values()),
    }


def scenario_failover(scratch: Path, upstream_port: int, artifact: Path, names: Path) -> dict[str, float]:
    deployment = SentinelDeployment(scratch / "sentinel")
    deployment.start()
    port, admin = free_port(), free_port()
    api = f"http://127.0.0.1:{admin}"
    config = write_config(
        scratch / "failover.toml",
        store={"redis": deployment.url},
        admin={"tokens": [TOKEN]},
        lists={"path": str(artifact), "cache_dir": str(scratch / "cache-failover")},
    )
    try:
        with node(config, port, upstream_port, admin):
            answering(port)
            for site, document in SITES.items():
                assert api_call(api, "PUT", f"/v1/sites/{site}", document) == 200
            run_dnsperf(port, names, runs=1, clients=2, outstanding=50)  # every name cached
            new_clients = Hammer(port, lambda number: dns.message.make_query(f"new{number}.example", "A"), new_address)
            result: dict[str, object] = {}
            dnsperf = threading.Thread(
                target=lambda: result.update(
                    load=run_dnsperf(port, names, seconds=14, clients=2, outstanding=50, max_qps=2000)
                ),
                daemon=True,
            )
            with new_clients, Writer(api, "cold") as writer:
                dnsperf.start()
                time.sleep(4)
                old = deployment.primary_port()
                assert old is not None
                deployment.server_on(old).kill()
                killed = time.monotonic()
                while deployment.primary_port() in (old, None):
                    time.sleep(0.02)
                promoted = time.monotonic()
                dnsperf.join(30)
            devices = site_devices(api, "cold")
    finally:
        deployment.stop()
    load = result["load"]
    acknowledged = writer.devices(200)
    return {
        "promoted_s": promoted - killed,
        "writes_resumed_s": writer.first_success_after(promoted) - promoted,
        "dnsperf_sent": load.sent,
        "dnsperf_lost": load.lost,  # type: ignore[attr-defined]
        "dnsperf_servfail": load.rcodes.get("SERVFAIL", 0),  # type: ignore[attr-defined]
        "new_client_queries": sum(new_clients.outcomes.values()),
        "new_client_lost": new_clients.outcomes["lost"],
        "new_client_servfail": new_clients.outcomes["SERVFAIL"],
        "writes": len(writer.results),
        "writes_acknowledged": len(acknowledged),
        "writes_unknown": len(writer.devices(504)),
        "acknowledged_missing": len(acknowledged - devices),
        "refused_but_written": len(writer.devices(503) & devices),
    }


def scenario_late_node(scratch: Path, upstream_port: int, artifact: Path, tree: Path = REPO) -> dict[str, float]:
    redis = RedisServer(scratch / "redis-late")
    redis.directory.mkdir()
    redis.start()
    try:
        publish(redis.url, "bns:", artifact, scratch)
        port = free_port()
        config = write_config(
            scratch / "late.toml", store={"redis": redis.url}, lists={"cache_dir": str(scratch / "cache-late")}
        )
        query = dns.message.make_query(LISTED, "A", use_edns=0)
        with Hammer(port, lambda _number: query, timeout=0.1) as hammer:  # nothing listens at first
            time.sleep(0.2)
            started = time.monotonic()
            with node(config, port, upstream_port, tree=tree):
                while hammer.outcomes["NXDOMAIN"] == 0:
                    time.sleep(0.005)
                    if time.monotonic() - started > 30:
                        raise RuntimeError("the late node never blocked the listed name")
                blocked_after = time.monotonic() - started
                time.sleep(2)
    finally:
        redis.stop()
    counted = ("resolved", "not ready", "NXDOMAIN", "lost")
    return {
        "resolved": hammer.outcomes["resolved"],
        "not_ready": hammer.outcomes["not ready"],
        "blocked": hammer.outcomes["NXDOMAIN"],
        "unanswered_before_bind": hammer.outcomes["lost"],
        "other": sum(count for key, count in hammer.outcomes.items() if key not in counted),
        "blocking_after_s": blocked_after,
    }


def scenario_paused_site(
    scratch: Path, upstream_port: int, artifact: Path, devices: int = 1000, tree: Path = REPO
) -> dict[str, float]:
    redis = RedisServer(scratch / "redis-paused")
    redis.directory.mkdir()
    redis.start()
    port, admin = free_port(), free_port()
    config = write_config(
        scratch / "paused.toml",
        store={"redis": redis.url},
        admin={"tokens": [TOKEN]},
        lists={"path": str(artifact), "cache_dir": str(scratch / "cache-paused")},
        identity={"trusted_networks": ["127.0.0.1/32"]},
    )
    site = {
        "networks": ["127.0.0.0/8"],
        "mode": "device",
        "paused_until": "forever",
        "devices": {"known": {"macs": [mac(1)]}},
    }
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        with node(config, port, upstream_port, admin, tree=tree):
            answering(port)
            assert api_call(f"http://127.0.0.1:{admin}", "PUT", "/v1/sites/home", site) == 200
            for _ in range(8):  # every worker holds the site (the kernel spreads source ports)
                query = dns.message.make_query("allowed.example", "A", use_edns=0, options=[mac_option(1)])
                dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
            redis.kill()
            for number in range(1000, 1000 + devices):
                query = dns.message.make_query("allowed.example", "A", use_edns=0, options=[mac_option(number)])
                outcomes[outcome(dns.query.udp(query, "127.0.0.1", port=port, timeout=2))] += 1
    finally:
        redis.stop()
    return {"devices": devices, "escaped": outcomes["resolved"], "answered_paused": outcomes["NXDOMAIN"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also run each scenario (but failover) against the `resolver` of this checkout",
    )
    parser.add_argument(
        "--scenario",
        nargs="+",
        default=["restart", "flush", "failover", "late", "paused"],
        choices=["restart", "flush", "failover", "late", "paused"],
    )
    args = parser.parse_args(argv)
    if "failover" in args.scenario and not have_dnsperf():
        parser.error("the failover scenario needs dnsperf (Debian: apt-get install dnsperf)")
    results: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        artifact = compile_list(scratch)
        large = compile_list(scratch, filler=400_000) if "late" in args.scenario else artifact
        upstream_port = free_port()
        stack.enter_context(
            running([sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)], upstream_port)
        )
        names = write_query_file([f"cached{number}.example" for number in range(500)], scratch / "names.txt")
        for run in range(args.runs):  # interleaved: each run does every scenario once
            for scenario in args.scenario:
                trees = [("", REPO)]
                if args.baseline is not None and scenario != "failover":  # before Sentinel support
                    trees.append((" (baseline)", args.baseline))
                for label, tree in trees:
                    directory = scratch / f"{scenario}{label.strip(' ()')}-{run}"
                    directory.mkdir()
                    if scenario in ("restart", "flush"):
                        figures = scenario_forgetful_redis(directory, upstream_port, artifact, scenario, tree)
                    elif scenario == "failover":
                        figures = scenario_failover(directory, upstream_port, artifact, names)
                    elif scenario == "late":
                        figures = scenario_late_node(directory, upstream_port, large, tree)
                    else:
                        figures = scenario_paused_site(directory, upstream_port, artifact, tree=tree)
                    results[scenario + label].append(figures)
                    print(f"run {run} {scenario}{label}: {figures}", file=sys.stderr, flush=True)
    lines = [
        f"Command: `python -m bench.faults {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}",
        "",
    ]
    for scenario, runs in results.items():
        lines += [
            f"**{scenario}** ({len(runs)} runs; per run, then the median)",
            "",
            "| figure | " + " | ".join(f"run {number}" for number in range(len(runs))) + " | median |",
            "|---|" + "---:|" * (len(runs) + 1),
        ]
        for key in runs[0]:
            values = [run[key] for run in runs]
            lines.append(
                f"| {key} | " + " | ".join(_format(value) for value in values) + f" | {_format(median(values))} |"
            )
        lines.append("")
    print("\n".join(lines))
    return 0


def _format(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, float) else f"{value:,}"


if __name__ == "__main__":
    sys.exit(main())
