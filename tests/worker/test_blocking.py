"""Blocking through a real worker: real category lists, EDE texts, answer modes, and artifact swaps."""

from __future__ import annotations

import gzip
import logging
import os
import random
import struct
import subprocess
import threading
import time
from pathlib import Path

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists, sources_from_dir
from resolver.shared.dns import EdeCode
from resolver.shared.errors import StartupError
from resolver.shared.lists import private_copy, verified_link
from resolver.shared.loading import load_policy_and_lists
from resolver.shared.run_directory import RunDirectory
from resolver.shared.sockets import bind_sockets
from resolver.worker.process import Worker
from tests.conftest import FIXTURES, SHARED_DATA, ServerThread, answer_addresses, make_config

pytestmark = pytest.mark.integration
CATALOG = load_catalog()


def ede(message: dns.message.Message) -> list[tuple[int, str]]:
    return [(o.code, o.text) for o in message.options if o.otype == dns.edns.OptionType.EDE]


def first_names(path: Path, count: int) -> list[str]:
    with gzip.open(path, "rt") as lines:
        return [line.strip() for _, line in zip(range(count), lines, strict=False)]


@pytest.fixture(scope="module")
def fixture_lists(tmp_path_factory) -> Path:
    """hate, weapons, violence-gore from the real category files; malware from the URLhaus hosts file."""
    out = tmp_path_factory.mktemp("lists") / "lists.bns"
    sources = [Source(FIXTURES / f"{category}.txt.gz", category) for category in ("hate", "weapons", "violence-gore")]
    sources.append(Source(FIXTURES / "formats" / "urlhaus-filter.hosts.txt", "malware"))
    sources.append(Source(FIXTURES / "formats" / "blocklistproject-drugs.adguard.txt", "drugs"))
    compile_lists(sources, out, CATALOG)
    return out


def serve(upstream, lists: Path, **policy) -> ServerThread:
    return ServerThread(
        make_config([upstream.address], lists={"path": str(lists), "check_interval": 0.05}, policy=policy)
    )


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_real_names_are_blocked_with_the_category_in_the_ede(upstream, fixture_lists, tcp):
    hate = first_names(FIXTURES / "hate.txt.gz", 3)
    weapons = first_names(FIXTURES / "weapons.txt.gz", 3)
    with serve(upstream, fixture_lists) as server:
        for name, category in [(n, "hate") for n in hate] + [(n, "weapons") for n in weapons]:
            response = server.ask(name, tcp=tcp, use_edns=0)
            assert response.rcode() == dns.rcode.NXDOMAIN, name
            codes = ede(response)
            assert codes and codes[0][0] == EdeCode.BLOCKED and category in codes[0][1], (name, codes)
            assert response.authority[0].rdtype == dns.rdatatype.SOA and response.authority[0].ttl == 10
        assert upstream.seen == []  # blocked before the cache and the upstream


def test_subdomains_are_blocked_and_lookalikes_are_not(upstream, fixture_lists):
    listed = first_names(FIXTURES / "hate.txt.gz", 1)[0]
    with serve(upstream, fixture_lists) as server:
        assert server.ask(f"deep.sub.{listed}").rcode() == dns.rcode.NXDOMAIN
        assert server.ask(f"x{listed}").rcode() == dns.rcode.NOERROR
        assert server.ask(listed.upper()).rcode() == dns.rcode.NXDOMAIN  # 0x20 case does not help


def test_a_label_holding_a_dot_under_a_listed_name_is_decided_as_that_name(upstream, fixture_lists):
    """An attacker's reproduction: a label `a.b` under a listed malware domain matched no list and was
    forwarded, so malware running its own name server could talk through the filter. Other bytes no list
    holds, in any label below, are decided by the listed parent too."""
    listed = first_names(FIXTURES / "hate.txt.gz", 1)[0]
    with serve(upstream, fixture_lists) as server:
        for name in ("a\\.b.0daydreams.net", "c2\\.x.y.0daydreams.net", "\\255\\000.0daydreams.net"):
            response = server.ask(name, use_edns=0)
            assert ede(response) == [(EdeCode.FILTERED, "Web Protect: malware")], name
        hidden = server.ask(f"data\\.exfil.{listed}", use_edns=0)
        assert hidden.rcode() == dns.rcode.NXDOMAIN and ede(hidden)[0][0] == EdeCode.BLOCKED
        assert upstream.seen == []


def test_web_protect_warns_with_ede_17_and_the_warning_page(upstream, fixture_lists):
    malware = "0daydreams.net"
    with serve(upstream, fixture_lists) as server:
        plain = server.ask(malware, use_edns=0)
        assert plain.rcode() == dns.rcode.NXDOMAIN
        assert ede(plain) == [(EdeCode.FILTERED, "Web Protect: malware")]
    with serve(upstream, fixture_lists, warning_page=["192.0.2.80"]) as server:
        page = server.ask(malware, use_edns=0)
        assert answer_addresses(page) == ["192.0.2.80"] and ede(page)[0][0] == EdeCode.FILTERED


def test_block_page_mode_and_an_allowed_name_through_the_upstream(upstream, fixture_lists):
    with serve(upstream, fixture_lists, answer="page", block_page=["192.0.2.9", "2001:db8::9"]) as server:
        name = first_names(FIXTURES / "weapons.txt.gz", 1)[0]
        assert answer_addresses(server.ask(name)) == ["192.0.2.9"]
        assert answer_addresses(server.ask(name, "AAAA")) == ["2001:db8::9"]
        assert server.ask(name, "ANY").rcode() == dns.rcode.NOERROR and not server.ask(name, "MX").answer
        allowed = server.ask("allowed.example")
        assert answer_addresses(allowed) and upstream.names_seen() == ["allowed.example"]


def test_policy_without_a_category_lets_it_through(upstream, fixture_lists):
    with serve(upstream, fixture_lists, block=["weapons"], warn=[]) as server:
        hate = first_names(FIXTURES / "hate.txt.gz", 1)[0]
        assert server.ask(hate).rcode() == dns.rcode.NOERROR


@pytest.mark.skipif(not (SHARED_DATA / "blocklists").is_dir(), reason="../shared/data is not here (CI has it)")
@pytest.mark.once  # 1.4 M names compiled by the (never compiled) compiler: once is enough
def test_every_real_category_file_blocks_its_names(upstream, tmp_path):
    out = tmp_path / "all.bns"
    compile_lists(sources_from_dir(SHARED_DATA / "blocklists", CATALOG), out, CATALOG)
    with serve(upstream, out) as server:
        for path in sorted((SHARED_DATA / "blocklists").glob("*.txt.gz")):
            category = path.name.removesuffix(".txt.gz")
            action = "Web Protect" if CATALOG.by_id[category].action == "warn" else "blocked"
            for name in random.Random(category).sample(first_names(path, 2000), 5):
                for tcp in (False, True):
                    response = server.ask(name, tcp=tcp, use_edns=0)
                    assert response.rcode() == dns.rcode.NXDOMAIN, (category, name)
                    assert ede(response)[0][1].startswith(action) and category in ede(response)[0][1]


def test_starting_with_a_bad_artifact_fails_clearly(upstream, tmp_path):
    bad = tmp_path / "bad.bns"
    bad.write_bytes(b"BNSLIST\x00" + b"\x02\x00\x00\x00" + b"\xff\xff\x00\x00")
    config = make_config([upstream.address], lists={"path": str(bad)})
    sockets = bind_sockets(config, 1)[0]
    try:
        with pytest.raises(StartupError, match=r"lists: .*bad\.bns: header length"):
            Worker(config, sockets)
    finally:
        sockets.close()


@pytest.mark.logs("SERVING THE LAST VERIFIED LIST")
def test_a_worker_that_finds_the_list_mid_rewrite_serves_the_last_verified_one(upstream, tmp_path):
    live = tmp_path / "live.bns"
    _generation_artifact(live, "first.example")
    cache = tmp_path / "cache"
    config = make_config([upstream.address], lists={"path": str(live), "cache_dir": str(cache), "check_interval": 0.05})
    load_policy_and_lists(config)  # what the supervisor checks before it forks
    for number in range(4):  # other lists verified since: the cache keeps only the newest copies
        other = tmp_path / f"other{number}.bns"
        _generation_artifact(other, f"other{number}.example")
        private_copy(other, cache)
    data = live.read_bytes()
    with live.open("r+b") as target:  # someone's `cp` is half done when a worker (re)starts
        target.truncate(len(data) // 2)
    with ServerThread(config) as server:
        assert server.ask("first.example").rcode() == dns.rcode.NXDOMAIN
        _generation_artifact(live, "second.example")  # the file settles: the worker moves to it
        deadline = time.monotonic() + 5
        while server.ask("second.example").rcode() != dns.rcode.NXDOMAIN:
            assert time.monotonic() < deadline, "the worker never read the settled file"
            time.sleep(0.05)


def test_restarts_leave_no_temporary_links_and_a_start_removes_those_of_dead_processes(tmp_path):
    """Issue 19: `lists.cache_dir/verified/` kept a `.<hash>.bns.<pid>.tmp` link for every process that ever
    started: each verified the list the node's link already named, and rename(2) between two links of one file
    does nothing."""
    live = tmp_path / "live.bns"
    _generation_artifact(live, "first.example")
    cache = tmp_path / "cache"
    config = make_config(["127.0.0.1:9"], lists={"path": str(live), "cache_dir": str(cache)})
    for _process in range(3):  # the supervisor's check, then its workers and admin process, every start
        load_policy_and_lists(config)
    verified = cache / "verified"
    assert [entry.name for entry in verified.iterdir()] == [verified_link(config.lists).name]
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [
        verified / f".x.bns.{dead.pid}.tmp",
        cache / f".y.bns.{dead.pid}.tmp",
        cache / "versions" / f".i.{dead.pid}.tmp",
    ]
    busy = verified / f".z.bns.{os.getppid()}.tmp"  # a live process's, mid-copy
    (cache / "versions").mkdir()
    for path in (*left, busy):
        path.write_bytes(b"")
    RunDirectory.create(cache).remove()  # what `bns serve` does at start
    assert [path for path in left if path.exists()] == [] and busy.exists()


def _generation_artifact(path: Path, name: str) -> None:
    source = path.with_suffix(".src")
    source.write_text(f"{name}\n")
    compile_lists([Source(source, "drugs")], path, CATALOG)


def test_swap_under_load_loses_nothing_and_never_mixes_generations(upstream, tmp_path):
    live = tmp_path / "live.bns"
    _generation_artifact(live, "gen-a.example")
    _generation_artifact(tmp_path / "next.bns", "gen-b.example")
    observations: list[tuple[float, float, str]] = []  # (sent, answered, generation the answer shows)
    failures: list[str] = []
    stop = threading.Event()

    def client(server: ServerThread, name: str, blocked_means: str, allowed_means: str) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                rcode = server.ask(name, timeout=2).rcode()
            except dns.exception.DNSException as exc:
                failures.append(f"{name}: {exc!r}")
                continue
            generation = blocked_means if rcode == dns.rcode.NXDOMAIN else allowed_means
            observations.append((sent, time.monotonic(), generation))

    with serve(upstream, live) as server:
        threads = [
            threading.Thread(target=client, args=(server, "gen-a.example", "A", "B")),
            threading.Thread(target=client, args=(server, "gen-b.example", "B", "A")),
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        swapped_at = time.monotonic()
        (tmp_path / "next.bns").replace(live)  # an atomic install: rename over the served path
        deadline = time.monotonic() + 5
        while server.call(lambda: server.worker.lists.swaps) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(5)
    assert failures == []
    first_new_answer = min(answered for _, answered, generation in observations if generation == "B")
    stale = [sent for sent, _, generation in observations if generation == "A" and sent > first_new_answer]
    assert stale == [], "a query sent after the new list answered got the old list"
    assert sum(g == "A" for _, _, g in observations) > 10 and sum(g == "B" for _, _, g in observations) > 10
    assert first_new_answer - swapped_at < 2.0


@pytest.mark.logs("refused the new artifact")
def test_a_corrupt_install_is_refused_and_the_old_list_keeps_serving(upstream, tmp_path, caplog):
    live = tmp_path / "live.bns"
    _generation_artifact(live, "gen-a.example")
    with serve(upstream, live) as server:
        assert server.ask("gen-a.example").rcode() == dns.rcode.NXDOMAIN
        broken = tmp_path / "broken.bns"
        _generation_artifact(broken, "gen-b.example")
        data = bytearray(broken.read_bytes())
        data[-3] ^= 0x55
        broken.write_bytes(bytes(data))
        with caplog.at_level(logging.ERROR, logger="resolver.shared.lists"):
            broken.replace(live)
            deadline = time.monotonic() + 3
            while "refused" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
        assert "checksum mismatch" in caplog.text and "still serving version" in caplog.text
        assert server.ask("gen-a.example").rcode() == dns.rcode.NXDOMAIN
        assert server.ask("gen-b.example").rcode() == dns.rcode.NOERROR
        _generation_artifact(tmp_path / "fixed.bns", "gen-b.example")
        (tmp_path / "fixed.bns").replace(live)
        deadline = time.monotonic() + 3
        while server.ask("gen-b.example").rcode() != dns.rcode.NXDOMAIN:
            assert time.monotonic() < deadline, "the repaired artifact was never picked up"
            time.sleep(0.05)


def test_other_classes_are_refused_even_for_blocked_names(upstream, fixture_lists):
    name = first_names(FIXTURES / "hate.txt.gz", 1)[0]
    with serve(upstream, fixture_lists) as server:
        query = dns.message.make_query(name, "TXT", "CH")
        response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2)
        assert response.rcode() == dns.rcode.REFUSED and not response.authority


@pytest.mark.logs("refused the new artifact")
@pytest.mark.parametrize("header", [b'"a string"', b"5", b'{"sections": [1, 2]}', b"[" * 3000])
def test_a_malformed_install_neither_stops_the_watcher_nor_the_next_swap(upstream, tmp_path, caplog, header):
    live = tmp_path / "live.bns"
    _generation_artifact(live, "gen-a.example")
    with serve(upstream, live) as server:
        odd = tmp_path / "odd.bns"
        odd.write_bytes(struct.pack("<8sII", b"BNSLIST\x00", 2, len(header)) + header)
        with caplog.at_level(logging.ERROR, logger="resolver.shared.lists"):
            odd.replace(live)
            deadline = time.monotonic() + 3
            while "refused" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
        assert "refused the new artifact" in caplog.text
        assert server.ask("gen-a.example").rcode() == dns.rcode.NXDOMAIN  # the old list serves on
        _generation_artifact(tmp_path / "next.bns", "gen-b.example")
        (tmp_path / "next.bns").replace(live)
        deadline = time.monotonic() + 3
        while server.ask("gen-b.example").rcode() != dns.rcode.NXDOMAIN:
            assert time.monotonic() < deadline, "the watcher stopped after the malformed artifact"
            time.sleep(0.05)
