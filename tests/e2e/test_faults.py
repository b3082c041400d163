"""What an operator can get wrong, done to whole `bns serve` processes: a second instance on a port, a node
started late, a corrupt list file at a restart, SIGHUP. Whatever happens, a listed name never resolves."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from bench.faults import Hammer, publish, write_config
from bench.harness import free_port
from bench.upstream import Script, ScriptedUpstream
from tests.conftest import answer_addresses, eventually
from tests.e2e.test_admin import http
from tests.e2e.test_process import bns, node, serving

pytestmark = pytest.mark.e2e
LISTED = "gore.example"  # in the list every test here serves (violence-gore)


@pytest.fixture(scope="module")
def gore_list(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("faults")
    source = directory / "gore.txt"
    source.write_text(f"{LISTED}\n")
    out = directory / "gore.bns"
    result = subprocess.run(
        bns("lists", "compile", "--out", str(out), "--source", f"violence-gore={source}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


def listed_query(_number: int) -> dns.message.Message:
    return dns.message.make_query(LISTED, "A", use_edns=0)


def ask(port: int, name: str, timeout: float = 2.0) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=timeout)


# --- one instance per port ------------------------------------------------------------------------------------


def test_a_second_bns_on_a_served_port_refuses_to_start(tmp_path, upstream, gore_list):
    port = free_port()
    common = ("--upstream", upstream.address, "--workers", "2", "--admin-listen", "")
    with serving("--listen", f"127.0.0.1:{port}", "--lists", str(gore_list), *common) as (first, _port):
        second = subprocess.run(
            bns("serve", "--listen", f"127.0.0.1:{port}", *common), capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}: another bns serve (pid {first.pid}) serves it" in second.stderr
        # every query reaches the instance with the list
        assert all(ask(port, LISTED).rcode() == dns.rcode.NXDOMAIN for _ in range(24))


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_a_foreign_server_on_the_port_is_named(upstream, protocol):
    """Even one that shares (SO_REUSEPORT, as bns's own workers do) is found, and named."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as foreign:
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        foreign.bind(("127.0.0.1", 0))
        if protocol == "tcp":
            foreign.listen()
        port = foreign.getsockname()[1]
        result = subprocess.run(
            bns("serve", "--listen", f"127.0.0.1:{port}", "--upstream", upstream.address, "--admin-listen", ""),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"another process serves {protocol} there (pid {os.getpid()}" in result.stderr
    assert f"ss -{protocol[0]}lnp 'sport = :{port}'" in result.stderr


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed (Debian: dnsmasq-base)")
def test_dnsmasq_on_the_port_is_named(upstream):
    port = free_port()
    dnsmasq = subprocess.Popen(
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            f"--port={port}",
            "--pid-file=",
            "--user=" + os.environ.get("USER", "root"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["ss", "-ulnH", f"sport = :{port}"], capture_output=True, text=True).stdout == "":
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.05)
        result = subprocess.run(
            bns("serve", "--listen", f"127.0.0.1:{port}", "--upstream", upstream.address, "--admin-listen", ""),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        dnsmasq.terminate()
        dnsmasq.wait(10)
    assert result.returncode == 1
    assert ", dnsmasq)" in result.stderr and "address already in use" in result.stderr


def test_the_port_is_free_again_once_a_bns_stops(upstream):
    port = free_port()
    for _ in range(2):
        with serving("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address, "--admin-listen", "") as (
            process,
            _port,
        ):
            assert answer_addresses(ask(port, "again.example"))
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0


# --- a node never answers before its list is in ---------------------------------------------------------------


def test_a_late_node_answers_nothing_from_before_its_list_is_in(
    tmp_path, upstream, gore_list, shared_redis, redis_prefix
):
    publish(shared_redis.url, redis_prefix, gore_list, tmp_path)
    port = free_port()
    config = write_config(
        tmp_path / "late.toml",
        store={"redis": shared_redis.url, "prefix": redis_prefix},
        lists={"cache_dir": str(tmp_path / "cache"), "check_interval": 1.0},
    )
    with Hammer(port, listed_query, timeout=0.1) as hammer:
        time.sleep(0.1)
        with serving(
            "--config", str(config), "--listen", f"127.0.0.1:{port}", "--upstream", upstream.address, "--workers", "2"
        ):
            started = time.monotonic()
            while hammer.outcomes["NXDOMAIN"] < 200:
                assert time.monotonic() - started < 10
                time.sleep(0.05)
    # Before the fix, the workers answered from no list until they found the installed file (up to a
    # check_interval later). Whether any "not ready" answer is seen depends on which process starts first.
    assert hammer.outcomes["resolved"] == 0, hammer.outcomes


def test_a_node_of_a_fleet_with_nothing_published_starts_at_once(tmp_path, upstream, shared_redis, redis_prefix):
    config = write_config(
        tmp_path / "fresh.toml",
        store={"redis": shared_redis.url, "prefix": redis_prefix},
        lists={"cache_dir": str(tmp_path / "cache")},
    )
    with serving("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address) as (_p, port):
        assert answer_addresses(ask(port, LISTED))  # nothing is published: nothing to wait for


def test_a_node_that_cannot_reach_redis_waits_then_serves_the_list_it_holds(
    tmp_path, upstream, gore_list, own_redis, redis_prefix
):
    publish(own_redis.url, redis_prefix, gore_list, tmp_path)
    config = write_config(
        tmp_path / "node.toml",
        store={"redis": own_redis.url, "prefix": redis_prefix},
        lists={"cache_dir": str(tmp_path / "cache"), "ready_timeout": 1.0},
    )
    common = ("--config", str(config), "--upstream", upstream.address, "--admin-listen", "")
    with serving("--listen", "127.0.0.1:0", *common) as (_process, port):
        assert ask(port, LISTED).rcode() == dns.rcode.NXDOMAIN  # installed the published list
    own_redis.kill()
    port = free_port()
    with Hammer(port, listed_query) as hammer, serving("--listen", f"127.0.0.1:{port}", *common, timeout=20):
        assert ask(port, LISTED).rcode() == dns.rcode.NXDOMAIN  # after ready_timeout: the list it held
    assert hammer.outcomes["resolved"] == 0, hammer.outcomes


def test_a_node_holding_no_list_waits_for_redis_however_long(tmp_path, upstream, gore_list, own_redis, redis_prefix):
    publish(own_redis.url, redis_prefix, gore_list, tmp_path)
    own_redis.kill()
    port, admin = free_port(), free_port()
    token = "health-token-for-tests-02"
    config = write_config(
        tmp_path / "node.toml",
        store={"redis": own_redis.url, "prefix": redis_prefix},
        lists={"cache_dir": str(tmp_path / "cache"), "ready_timeout": 0.5},
        admin={"tokens": [token]},
    )
    process = subprocess.Popen(
        bns(
            "serve",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream.address,
            "--admin-listen",
            f"127.0.0.1:{admin}",
        ),
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{admin}"
    try:
        with Hammer(port, listed_query) as hammer:
            time.sleep(2.5)
            assert hammer.outcomes["not ready"] > 0 and hammer.outcomes["resolved"] == 0, hammer.outcomes
            status, health = http(api, "GET", "/health", token=token)
            assert status == 503 and health["status"] == "starting", health  # what a load balancer reads
            assert "bns_ready 0" in http(api, "GET", "/metrics", token=token)[1]
            own_redis.start()
            started = time.monotonic()
            while ask(port, LISTED).rcode() != dns.rcode.NXDOMAIN:
                assert time.monotonic() - started < 10, "the node never got its list"
                time.sleep(0.05)
            eventually(lambda: http(api, "GET", "/health", token=token)[0] == 200, within=5)
        assert hammer.outcomes["resolved"] == 0, hammer.outcomes
    finally:
        process.terminate()
        process.wait(10)


# --- a restart with a bad list file ---------------------------------------------------------------------------


def test_a_restart_with_a_corrupt_list_file_serves_the_last_verified_list(tmp_path, upstream, gore_list):
    served = tmp_path / "served.bns"
    shutil.copyfile(gore_list, served)
    token = "health-token-for-tests-01"
    config = write_config(
        tmp_path / "node.toml",
        lists={"path": str(served), "cache_dir": str(tmp_path / "cache"), "check_interval": 0.1},
        admin={"tokens": [token]},
        store={"file": ""},
    )
    common = ("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address)
    with serving(*common) as (_process, port):
        assert ask(port, LISTED).rcode() == dns.rcode.NXDOMAIN
    data = served.read_bytes()
    served.write_bytes(data[: len(data) // 2])  # a copy cut short, then the node restarts
    with node(*common, expect=("SERVING THE LAST VERIFIED LIST", "refused the new artifact")) as (_process, port, api):
        assert ask(port, LISTED).rcode() == dns.rcode.NXDOMAIN
        status, health = http(api, "GET", "/health", token=token)
        assert status == 200 and health["status"] == "degraded" and "truncated" in health["lists_fallback"]
        assert "bns_lists_fallback 1" in http(api, "GET", "/metrics", token=token)[1]
        served.write_bytes(data)  # mended: the node serves the file again, and says so
        started = time.monotonic()
        while http(api, "GET", "/health", token=token)[1]["status"] != "ok":
            assert time.monotonic() - started < 5
            time.sleep(0.1)
        assert ask(port, LISTED).rcode() == dns.rcode.NXDOMAIN


def test_a_corrupt_list_file_and_no_verified_list_refuses_to_start(tmp_path, upstream, gore_list):
    served = tmp_path / "served.bns"
    served.write_bytes(gore_list.read_bytes()[:100])
    result = subprocess.run(
        bns(
            "serve",
            "--lists",
            str(served),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream.address,
            "--admin-listen",
            "",
        ),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # a cache with no verified list
    assert result.returncode == 1
    assert "holds no earlier verified list" in result.stderr


def test_run_directories_left_by_killed_supervisors_are_removed(tmp_path, upstream):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "node.toml", lists={"cache_dir": str(cache)}, store={"file": ""})
    common = ("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--admin-listen", "")
    (cache / "run-999999999").mkdir(parents=True)  # from an older bns whose process is long gone
    with serving(*common) as (process, _port):
        killed = cache / f"run-{process.pid}"
        assert killed.is_dir() and not (cache / "run-999999999").exists()
        process.kill()  # its workers follow it (PDEATHSIG); its directory stays behind
        process.wait()
        started = time.monotonic()
        while _children_alive(killed):
            assert time.monotonic() - started < 10
            time.sleep(0.1)
    with serving(*common) as (process, _port):
        assert not killed.exists()
        assert (cache / f"run-{process.pid}").is_dir()


def _children_alive(run_dir: Path) -> bool:
    import fcntl

    with open(run_dir / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


# --- SIGHUP ---------------------------------------------------------------------------------------------------


def test_sighup_applies_what_can_change_live_and_never_stops_the_server(tmp_path, upstream, gore_list):
    token, new_token = "sighup-token-for-tests-01", "sighup-token-for-tests-02"
    pages_secret, new_pages_secret = "sighup-pages-secret-0001", "sighup-pages-secret-0002"
    path = tmp_path / "node.toml"
    sections: dict[str, dict[str, object]] = {
        "upstream": {"servers": [upstream.address]},
        "lists": {"path": str(gore_list)},
        "admin": {"tokens": [token], "read_tokens": ["sighup-read-token-0001"]},
        "pages": {"secret": pages_secret},
        "store": {"file": ""},
        "log": {"level": "info"},
        "server": {"workers": 2},
    }
    write_config(path, **sections)
    with (
        ScriptedUpstream(script=Script(ttl=300)) as second,
        node("--config", str(path), "--listen", "127.0.0.1:0", expect=("SIGHUP: configuration not reloaded",)) as (
            process,
            port,
            api,
        ),
    ):
        assert ask(port, LISTED).rcode() == dns.rcode.NXDOMAIN
        assert answer_addresses(ask(port, "first.example"))
        # upstreams, the default policy, the tokens: live; the worker count needs a restart
        sections["upstream"] = {"servers": [second.address]}
        sections["policy"] = {"block": ["drugs"]}
        sections["admin"] = {"tokens": [new_token], "read_tokens": ["sighup-read-token-0002"]}
        sections["pages"] = {"secret": new_pages_secret}
        sections["server"] = {"workers": 3}
        write_config(path, **sections)
        process.send_signal(signal.SIGHUP)
        started = time.monotonic()
        while not (answer_addresses(ask(port, LISTED)) and http(api, "GET", "/health", token=new_token)[0] == 200):
            assert process.poll() is None, "SIGHUP stopped the server"
            assert time.monotonic() - started < 5, "the new configuration was not applied"
            time.sleep(0.05)
        assert answer_addresses(ask(port, "second.example"))
        assert "second.example" in second.names_seen() and "second.example" not in upstream.names_seen()
        assert http(api, "GET", "/health", token=token)[0] == 401  # the old token is gone
        # a configuration that does not load changes nothing
        path.write_text("[server]\nworkers = 'many'\n")
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None
        assert answer_addresses(ask(port, LISTED)) and http(api, "GET", "/health", token=new_token)[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        log = process.log
    assert "SIGHUP: applied" in log and "upstream.servers" in log and "policy.block" in log
    assert "SIGHUP: server.workers changed but needs a restart; still 2" in log
    # secrets are named, never shown (an attacker made site tokens with a pages' key read from this log)
    assert "admin.tokens = (hidden)" in log and "admin.read_tokens = (hidden)" in log
    assert "SIGHUP: pages.secret changed but needs a restart; still (hidden)" in log
    for secret in (token, new_token, pages_secret, new_pages_secret, "sighup-read-token-0001", "sighup-read-token"):
        assert secret not in log
    assert "SIGHUP: configuration not reloaded, still running as before: server.workers: must be an integer" in log
