"""`bns lists compile/show` and `bns serve --lists` as a user runs them."""

from __future__ import annotations

import signal
import subprocess
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.conftest import FIXTURES
from tests.e2e.test_process import bns, serving

pytestmark = pytest.mark.e2e
FORMATS = FIXTURES / "formats"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(bns(*args), capture_output=True, text=True, timeout=120)


def test_compile_every_format_and_show(tmp_path):
    out = tmp_path / "lists.bns"
    result = run(
        "lists",
        "compile",
        "--out",
        str(out),
        "--source",
        f"malware={FORMATS / 'urlhaus-filter.rpz.zone'}",
        "--source",
        f"malware={FORMATS / 'urlhaus-filter.bind.conf'}",
        "--source",
        f"malware=unbound:{FORMATS / 'urlhaus-filter.unbound.conf'}",
        "--source",
        f"drugs={FORMATS / 'blocklistproject-drugs.dnsmasq.conf'}",
        "--source",
        f"violence-gore={FORMATS / 'sinfonietta-snuff.hosts.txt'}",
        "--source",
        f"phishing={FORMATS / 'urlhaus-filter.wildcard.head.txt'}",
        "--tsv",
        str(_tsv(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    assert "malware" in result.stdout and "2,689" in result.stdout
    assert "rejected" in result.stdout and "an IP address, not a name" in result.stdout
    shown = run(
        "lists", "show", str(out), "--match", "sub.0daydreams.net", "--match", "bestgore.com", "--match", "example.org"
    )
    assert shown.returncode == 0
    assert "sub.0daydreams.net: malware, phishing via 0daydreams.net" in shown.stdout
    assert "bestgore.com: violence-gore, weapons via bestgore.com" in shown.stdout
    assert "example.org: not listed" in shown.stdout


def _tsv(tmp_path):
    path = tmp_path / "extra.tsv"
    path.write_text("bestgore.com\tweapons\n")
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "gambling=/dev/null"], "'gambling' is not in the catalogue"),
        (["--source", "drugs"], "expected CATEGORY=PATH"),
        ([], "give at least one --source"),
    ],
)
def test_compile_usage_errors(tmp_path, args, message):
    result = run("lists", "compile", "--out", str(tmp_path / "x.bns"), *args)
    assert result.returncode == 2 and message in result.stderr


def test_compile_of_an_unusable_source_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1.2.3.4\n")
    result = run("lists", "compile", "--out", str(tmp_path / "x.bns"), "--source", f"drugs={bad}")
    assert result.returncode == 1 and "bad.txt: no usable domain" in result.stderr
    assert not (tmp_path / "x.bns").exists()


def test_serve_refuses_a_bad_artifact_at_start(tmp_path):
    bad = tmp_path / "bad.bns"
    bad.write_bytes(b"this is not a list artifact at all")
    result = subprocess.run(
        bns("serve", "--listen", "127.0.0.1:0", "--lists", str(bad)), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "cannot start: lists:" in result.stderr and "no BNSLIST magic" in result.stderr


def _blocked(port: int, name: str) -> bool:
    return (
        dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2).rcode()
        == dns.rcode.NXDOMAIN
    )


def test_two_workers_block_and_both_swap_to_a_new_list(upstream, tmp_path):
    live = tmp_path / "live.bns"
    first = tmp_path / "a.txt"
    first.write_text("gen-a.example\n")
    assert run("lists", "compile", "--out", str(live), "--source", f"drugs={first}").returncode == 0
    with serving("--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2", "--lists", str(live)) as (
        process,
        port,
    ):
        assert all(_blocked(port, "gen-a.example") for _ in range(20))
        second = tmp_path / "b.txt"
        second.write_text("gen-b.example\n")
        assert run("lists", "compile", "--out", str(live), "--source", f"drugs={second}").returncode == 0
        deadline = time.monotonic() + 10
        # Many fresh source ports spread over both workers: every one must see the new list.
        while not all(_blocked(port, "gen-b.example") and not _blocked(port, "gen-a.example") for _ in range(20)):
            assert time.monotonic() < deadline, "a worker kept the old list"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_overwriting_the_served_file_in_place_crashes_nothing(upstream, tmp_path):
    """`cp` (not `mv`) over the served artifact rewrites its inode; workers map a private copy instead."""
    live = tmp_path / "live.bns"
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("gen-a.example\n")
    big.write_text("gen-b.example\n" + "".join(f"filler{i}.example\n" for i in range(20000)))
    for source, out in ((small, live), (big, tmp_path / "big.bns"), (small, tmp_path / "small.bns")):
        assert run("lists", "compile", "--out", str(out), "--source", f"drugs={source}").returncode == 0
    cache = tmp_path / "cache"
    config = tmp_path / "bns.toml"
    config.write_text(f'[lists]\ncache_dir = "{cache}"\ncheck_interval = 0.1\n[store]\nfile = ""\n')
    with serving(
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        "--workers",
        "2",
        "--lists",
        str(live),
    ) as (process, port):
        assert _blocked(port, "gen-a.example")
        for replacement, name in ((tmp_path / "big.bns", "gen-b.example"), (tmp_path / "small.bns", "gen-a.example")):
            with live.open("r+b") as target:  # in place: same inode, new bytes, new length
                target.write(replacement.read_bytes())
                target.truncate()
            deadline = time.monotonic() + 10
            while not all(_blocked(port, name) for _ in range(10)):
                assert time.monotonic() < deadline, f"{name} never served"
                assert process.poll() is None
                time.sleep(0.1)
        process.terminate()
        assert process.wait(10) == 0
        log = process.log
        assert "exited with" not in log, log  # the supervisor would have replaced a crashed worker
