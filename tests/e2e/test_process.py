"""`bns` as a user runs it: whole processes, real clients, signals and exit codes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from bench.faults import not_ready
from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists
from resolver.shared.config import hidden, load_config
from resolver.shared.errors import BnsError
from tests.conftest import answer_addresses

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SERVING = re.compile(r"serving DNS on udp\+tcp (\S+):(\d+)")


def bns(*args: str) -> list[str]:
    return [sys.executable, "-m", "resolver", *args]


@contextmanager
def serving(*args: str, timeout: float = 15.0, expect: tuple[str, ...] = ()) -> Iterator[tuple[NodeProcess, int]]:
    """Start `bns serve`, read the port it reports (it listens on port 0 unless told otherwise). The admin
    API, unless the arguments say otherwise, takes a free port too (`node` reads it)."""
    with node(*args, timeout=timeout, expect=expect) as (process, port, _admin):
        yield process, port


# What a node's log must never hold: a site token (a subscriber's credential), whatever else it says.
SITE_TOKEN = re.compile(r"site\.[A-Za-z0-9_-]{16,}=*\.[A-Za-z0-9_-]{16,}")
# An ERROR line or a traceback is a defect unless the test says it expects it (`node(expect=...)`).
FAULT = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |^Traceback ", re.MULTILINE)


class NodeProcess(subprocess.Popen[str]):
    """`bns serve` with its log (stderr) read as it comes, so that a node that logs much never stalls on a
    full pipe, and kept whole (`log`) for the checks made when it stops."""

    def __init__(self, args: tuple[str, ...]) -> None:
        # A session of its own: `stop` can then find and end every process of the node, an orphan too.
        super().__init__(bns("serve", *args), stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
        self.lines: list[str] = []
        self._arrived: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.stderr is not None
        for line in self.stderr:
            self.lines.append(line)
            self._arrived.put(line)
        self._arrived.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line of the log; None when the node closed it."""
        try:
            return self._arrived.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            return ""

    @property
    def log(self) -> str:
        """Everything logged so far; once the node has stopped, everything."""
        if self.poll() is not None:
            self._reader.join(10)
        return "".join(self.lines)


def configured_secrets(args: tuple[str, ...], strict: bool = True) -> set[str]:
    """The secrets of a node's configuration (its file, now, and the environment): every setting shown
    `hidden`, and Redis passwords. Not `strict`: none from a file that does not load (a test broke it)."""
    path = Path(args[args.index("--config") + 1]) if "--config" in args else None
    try:
        config = load_config(path)
    except BnsError:
        if strict:
            raise
        return set()
    found: set[str] = set()
    for section in fields(config):
        for spec in fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), spec.name)
            if spec.metadata["show"] is hidden:
                found.update(value if isinstance(value, tuple) else {value})
    password = urllib.parse.urlsplit(config.store.redis).password
    return {secret for secret in (*found, password) if secret}


def check_node_log(log: str, secrets: set[str], expect: tuple[str, ...]) -> None:
    """No configured secret and no site token in the log; no ERROR line or traceback but those expected."""
    for secret in secrets:
        assert secret not in log, f"the node logged a secret of its configuration ({secret[:3]}…):\n{log}"
    leaked = SITE_TOKEN.search(log)
    assert leaked is None, f"the node logged a site token: {leaked.group()[:12]}…"
    for fault in FAULT.finditer(log):
        line = log[fault.start() : log.find("\n", fault.start())]
        if not any(re.search(pattern, line) for pattern in expect):
            raise AssertionError(f"the node logged what no test expects: {line}\n--- its log:\n{log}")


@contextmanager
def node(
    *args: str, timeout: float = 15.0, token: str | None = None, expect: tuple[str, ...] = ()
) -> Iterator[tuple[NodeProcess, int, str | None]]:
    """`bns serve` as `serving` starts it, with the URL of its admin API (None if it has none). Given a token
    its API takes, it also waits until /health says every worker is ready. When the test is done, the node's
    log must hold no secret of its configuration and no ERROR or traceback but those `expect` matches
    (regular expressions)."""
    if "--admin-listen" not in args:
        args = (*args, "--admin-listen", "127.0.0.1:0")
    secrets = configured_secrets(args)
    process = NodeProcess(args)
    try:
        deadline = time.monotonic() + timeout
        port = None
        while port is None:
            line = process.next_line(deadline - time.monotonic())
            if line is None:
                pytest.fail(f"bns serve exited with {process.wait()} before serving:\n{process.log}")
            match = SERVING.search(line)
            if match:
                host, port = match.group(1).strip("[]"), int(match.group(2))
            assert time.monotonic() < deadline, "bns serve did not report its address"
        admin = None
        while admin is None and args[args.index("--admin-listen") + 1]:  # a worker may log in between
            line = process.next_line(deadline - time.monotonic())
            assert line is not None and time.monotonic() < deadline, f"no admin API reported:\n{process.log}"
            found = re.search(r"admin API on (http://\S+)/", line)
            admin = found.group(1) if found else None
        wait_until_ready(host, port, deadline)
        if admin is not None and token is not None:
            wait_until_healthy(admin, deadline)
        yield process, port, admin
    except BaseException:
        stop(process)
        raise
    stop(process)
    check_node_log(
        process.log, secrets | configured_secrets(args, strict=False) | ({token} if token else set()), expect
    )


def stop(process: subprocess.Popen[str]) -> None:
    """Let the node stop its workers; kill it only if it will not; then kill whatever of its process group is
    left (a child that outlived its supervisor, one that ignored SIGTERM), so that no test leaves a process
    behind to take the CPU from the next."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the node's session, led by the supervisor
    except ProcessLookupError:
        return  # nothing left
    deadline = time.monotonic() + 5
    while group_members(process.pid):
        assert time.monotonic() < deadline, f"processes of group {process.pid} outlived SIGKILL"
        time.sleep(0.02)


def group_members(group: int) -> list[int]:
    """The processes of a process group still running (a zombie has stopped: its reaper is not ours)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _parent, pgrp = Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except OSError:
                continue
            if int(pgrp) == group and state != "Z":
                found.append(int(entry.name))
    return found


def wait_until_ready(host: str, port: int, deadline: float) -> None:
    """Until every worker answers: eight ANY queries in a row (answered locally, whatever the upstream) from
    fresh source ports, which the kernel spreads over the workers, are not answered Not Ready."""
    in_a_row = 0
    while in_a_row < 8:
        query = dns.message.make_query("ready.invalid", "ANY", use_edns=0)
        in_a_row = 0 if not_ready(dns.query.udp(query, host, port=port, timeout=3)) else in_a_row + 1
        if not in_a_row:
            assert time.monotonic() < deadline, "bns serve did not become ready"
            time.sleep(0.02)


def wait_until_healthy(admin: str, deadline: float) -> None:
    """Until /health says every worker is ready (asked as a load balancer asks: without a token). Answers
    alone can mislead: when workers get ready seconds apart (each waits for Redis on its own clock), a run of
    ready answers can all come from the one that is."""
    while True:
        try:
            with urllib.request.urlopen(admin + "/health", timeout=3) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
        assert time.monotonic() < deadline, "bns serve's /health did not say ready"
        time.sleep(0.05)


def ask(port: int, name: str, tcp: bool = False, timeout: float = 3.0) -> dns.message.Message:
    send = dns.query.tcp if tcp else dns.query.udp
    return send(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=timeout)


@pytest.mark.pure
@pytest.mark.parametrize("workers", [1, 2])
def test_serves_over_udp_and_tcp_with_each_worker_count(upstream, workers):
    with serving("--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", str(workers)) as (
        process,
        port,
    ):
        assert answer_addresses(ask(port, "e2e.example"))
        assert answer_addresses(ask(port, "e2e-tcp.example", tcp=True))
        # every worker answers: many source ports spread over the SO_REUSEPORT group
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda index: ask(port, f"spread{index}.example"), range(40)))
        assert all(answer.rcode() == dns.rcode.NOERROR for answer in answers)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_ipv6_listener(upstream):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured")
    with serving("--listen", "[::1]:0", "--upstream", upstream.address, "--workers", "1") as (process, port):
        query = dns.message.make_query("v6.example", "A")
        assert answer_addresses(dns.query.udp(query, "::1", port=port, timeout=3))
        assert answer_addresses(dns.query.tcp(query, "::1", port=port, timeout=3))
        process.terminate()
        assert process.wait(10) == 0


@pytest.mark.pure  # a silent upstream: its alarms once logged a traceback per ring, compiled only
def test_sigterm_drains_queries_in_flight(upstream):
    upstream.script.mode = "delay"
    upstream.script.delay = 0.6
    with serving("--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "1") as (process, port):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            udp = pool.submit(ask, port, "draining.example")
            tcp = pool.submit(ask, port, "draining-tcp.example", True)
            deadline = time.monotonic() + 5
            while len(upstream.names_seen()) < 2:  # both queries are now waiting on the upstream
                assert time.monotonic() < deadline
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            assert answer_addresses(udp.result())
            assert answer_addresses(tcp.result())
        assert process.wait(10) == 0


def test_sigint_stops_cleanly_too(upstream):
    with serving("--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2") as (process, _port):
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0


def test_a_killed_worker_is_replaced(upstream):
    with serving(
        "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "1", expect=(r"exited with -9$",)
    ) as (process, port):
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert answer_addresses(ask(port, "respawned.example", timeout=0.5))
                break
            except dns.exception.Timeout:
                assert time.monotonic() < deadline, "no worker came back"
        process.terminate()
        assert process.wait(10) == 0


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    config = tmp_path / "bns.toml"
    config.write_text("[server]\nworkers = 'many'\n")
    result = subprocess.run(bns("serve", "--config", str(config)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "server.workers: must be an integer" in result.stderr


def test_bad_flag_fails_at_start(tmp_path):
    result = subprocess.run(bns("serve", "--listen", "localhost:53"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "server.listen: 'localhost' is not an IP address" in result.stderr


def test_address_in_use_is_explained(upstream):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run(
            bns("serve", "--listen", f"127.0.0.1:{port}", "--upstream", upstream.address),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except OSError:
        return 1024


@pytest.mark.skipif(_unprivileged_port_start() <= 53, reason="port 53 is not privileged on this kernel")
@pytest.mark.skipif(
    os.geteuid() == 0 and not Path("/usr/bin/setpriv").exists(),
    reason="as root, needs setpriv to drop CAP_NET_BIND_SERVICE",
)
def test_port_53_without_privileges_says_so():
    command = bns("serve", "--listen", "127.0.0.1:53", "--upstream", "127.0.0.1:9")
    if os.geteuid() == 0:  # drop the one capability that lets root bind port 53
        command = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE" in result.stderr


def test_embedded_defaults_start_without_any_file():
    """The README's first command: `bns serve` with nothing else listens on 127.0.0.1:5300 (no query is
    sent: the default upstreams are public resolvers, and tests never leave loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", 5300))
        except OSError:
            pytest.skip("port 5300 is busy on this host")
    with serving() as (process, port):
        assert port == 5300
        process.terminate()
        assert process.wait(10) == 0


def test_config_command_lists_every_key():
    result = subprocess.run(bns("config"), capture_output=True, text=True, timeout=30, check=True)
    for key in ("server.listen", "server.workers", "upstream.servers", "cache.size"):
        assert key in result.stdout


def test_config_check(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[cache]\nsize = 5\n")
    assert subprocess.run(bns("config", "--check", str(good)), capture_output=True, timeout=30).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nsise = 5\n")
    result = subprocess.run(bns("config", "--check", str(bad)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cache.sise: unknown key" in result.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find the workers")
def test_workers_stop_when_the_supervisor_is_killed_outright(upstream):
    with serving("--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2") as (process, _port):
        children = _children(process.pid)
        assert len(children) == 3  # two workers and the admin process
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(_running(child) for child in children):
            assert time.monotonic() < deadline, "orphaned workers kept running"
            time.sleep(0.1)


def test_a_node_without_tokens_says_so_answers_probes_and_leaves_no_process_behind(upstream):
    """Issue 19: `serve` did not say that its API had no token; /health wanted one, so no load balancer or
    container could probe it; and a node whose admin process did not stop on SIGTERM outlived the tests."""
    with node("--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "1") as (process, _port, api):
        assert api is not None
        with urllib.request.urlopen(api + "/health", timeout=5) as response:
            assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
        deadline = time.monotonic() + 5
        while "WARNING" not in process.log:
            assert time.monotonic() < deadline, process.log
            time.sleep(0.02)
        assert re.search(
            r"WARNING .*admin API: no token is configured.*set admin\.tokens.*BNS_ADMIN_TOKENS", process.log
        )
        admin = int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[-1])
        os.kill(admin, signal.SIGSTOP)  # as deaf to SIGTERM as an admin process starved of the CPU
        process.kill()  # and its supervisor gone: nobody is left to stop it but the test
        process.wait()
    assert not _running(admin)


def test_config_check_and_serve_agree_on_every_config(tmp_path):
    """Issue 19: `config --check` said "valid" where `serve` refused. Both run the same checks now: for each
    config the same verdict and the same message. The relative paths are the config file's (issue 19 too): both
    commands run from another directory."""
    source = tmp_path / "drugs.txt"
    source.write_text("drug.example\n")
    compile_lists([Source(source, "drugs")], tmp_path / "lists.bns", load_catalog())
    (tmp_path / "a-file").write_text("")
    common = '[server]\nlisten = ["127.0.0.1:0"]\n[admin]\nlisten = ""\n[store]\nfile = ""\n'
    bad = {
        "no list": ('[lists]\npath = "missing.bns"\ncache_dir = "cache"\n', "lists: "),
        "no catalogue": ('[lists]\ncatalog = "missing.toml"\ncache_dir = "cache"\n', "lists.catalog: "),
        "a page address elsewhere": (
            '[lists]\ncache_dir = "cache"\n[policy]\nblock_page = ["192.0.2.77"]\n[pages]\nport = 8080\n',
            "policy.block_page: 192.0.2.77 is not an address of this machine",
        ),
        "a file for a cache": ('[lists]\ncache_dir = "a-file"\n', "lists.cache_dir: "),
    }
    for name, (text, message) in bad.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(common + text)
        checked, served = (
            subprocess.run(bns(*command, str(config)), capture_output=True, text=True, timeout=30, cwd=REPO)
            for command in (("config", "--check"), ("serve", "--config"))
        )
        assert (checked.returncode, served.returncode) == (1, 1), (name, checked.stderr, served.stderr)
        last = served.stderr.strip().splitlines()[-1]  # serve may warn about its limits first
        assert checked.stderr.strip() == last and f"cannot start: {message}" in last, (name, checked.stderr, last)
    good = tmp_path / "good.toml"
    good.write_text(common + '[lists]\npath = "lists.bns"\ncache_dir = "cache"\n')
    checked = subprocess.run(bns("config", "--check", str(good)), capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 0 and f"valid; lists: {tmp_path / 'lists.bns'}, version" in checked.stdout
    with node("--config", str(good), "--admin-listen", "") as (process, port, _api):
        assert ask(port, "drug.example").rcode() == dns.rcode.NXDOMAIN
        assert f"lists: {tmp_path / 'lists.bns'}, version" in process.log
        assert "upstreams: 9.9.9.9:53, 149.112.112.112:53" in process.log
    assert (tmp_path / "cache" / "verified").is_dir()
