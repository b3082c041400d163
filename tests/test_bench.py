"""The benches say what they lack before they run anything."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import encrypted, peers
from bench.load import LoadResult
from resolver.shared.config import LocalSettings, TlsSettings, UpstreamSettings
from resolver.shared.dns import text_to_name
from resolver.worker.discovery import Discovery
from resolver.worker.local_zones import LocalZones
from tests.certificates import Authority

pytestmark = pytest.mark.unit


def test_peers_asks_for_matplotlib_before_it_runs_anything(monkeypatch, tmp_path, capsys):
    """Issue 19: `python -m bench.peers --plot peers.png` ran every server for ten minutes, then ended in
    `ModuleNotFoundError: matplotlib`."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed: import fails
    with pytest.raises(SystemExit) as stopped:
        peers.main(["--plot", str(tmp_path / "peers.png")])
    assert stopped.value.code == 2
    assert "--plot needs matplotlib: pip install -e '.[bench]'" in capsys.readouterr().err


# --- bench.encrypted -------------------------------------------------------------------------------------------


def _served(label: str, us: float, sent: int, uncounted: int = 0) -> encrypted.Server:
    server = encrypted.Server(label, lambda directory, ports, idle: None, encrypted.Ports(1, 2, 3))
    result = LoadResult(sent=sent, completed=sent - uncounted, seconds=1.0)
    if uncounted:
        result.rcodes["uncounted by dnsperf"] = uncounted
    server.cpu_us["doh-get"] = [us]
    server.results["doh-get"] = [result]
    return server


def test_encrypted_compares_bns_only_with_peers_that_held_the_rate() -> None:
    """dnsperf 2.10 stalls on some servers' DoH answers (DNS-OARC/dnsperf#240): such a run sends a fraction of
    the queries, so its CPU per query is of another load, and must not be the yardstick bns is held to."""
    stalled = _served("dnsdist", 30.0, sent=580, uncounted=197)
    slow = _served("unbound", 20.0, sent=2_000)  # well below the 3,000 the rate asks for
    steady = _served("other", 50.0, sent=2_990)
    servers = [stalled, slow, steady, _served("bns", 60.0, sent=3_000)]
    assert encrypted.best_peer(servers, "doh-get", expected=3_000) is steady
    assert encrypted.best_peer(servers, "doh-get") is slow  # measures without a rate: every peer counts


def test_encrypted_reads_dnsperf_doh_answers_and_s_time_counts() -> None:
    doh = "DNS-over-HTTPS statistics:\n\n  HTTP/2 return codes:  200: 192, 400: 3\n"
    assert encrypted.http_answers(doh) == 192
    assert encrypted.http_answers("Queries completed:    10 (100.00%)\n") == 0
    full = (
        "Collecting connection statistics for 1 seconds\n*****\n\n5 connections in 0.01s; 500.00 connections/user sec"
    )
    resumed = (
        "\n\nNow timing with session id reuse.\nstarting\nrrrr\n\n4 connections in 0.00s; 4000 connections/user sec"
    )
    assert encrypted.parse_s_time(full) == (5, 0)
    assert encrypted.parse_s_time(full + resumed) == (4, 4)


def test_encrypted_reads_h2loads_report() -> None:
    report = (
        "finished in 8.00s, 2998.38 req/s, 510.24KB/s\n"
        "requests: 24000 total, 23990 started, 23987 done, 23980 succeeded, 7 failed, 7 errored, 0 timeout\n"
        "status codes: 23980 2xx, 0 3xx, 7 4xx, 0 5xx\n"
    )
    result = encrypted.parse_h2load(report)
    assert (result.sent, result.completed, result.seconds) == (23990, 23980, 8.0)
    assert encrypted.parse_h2load(report.replace("8.00s", "812.5ms")).seconds == 0.8125
    with pytest.raises(ValueError, match="h2load output not understood"):
        encrypted.parse_h2load("h2load: connect failed\n")


@pytest.mark.integration
def test_encrypted_server_configs_pass_the_servers_own_checks(tmp_path: Path) -> None:
    """The unbound and dnsdist configurations the bench writes are ones those servers accept: a key they do not
    know would otherwise surface only as a server that never starts, minutes into a run."""
    pair = Authority(tmp_path / "ca").issue()
    ports = encrypted.Ports(5300, 8530, 4430)
    checked = 0
    command = encrypted.unbound(tmp_path, ports, 10_000, upstream=5301, pair=pair)
    if command is not None and shutil.which("unbound-checkconf"):
        subprocess.run(["unbound-checkconf", command[-1]], check=True, capture_output=True)
        checked += 1
    command = encrypted.dnsdist(tmp_path, ports, 10_000, upstream=5301, pair=pair)
    if command is not None:
        subprocess.run([*command, "--check-config"], check=True, capture_output=True)
        checked += 1
    if not checked:
        pytest.skip("neither unbound nor dnsdist is installed")


def test_the_local_workload_asks_only_names_bns_answers_itself():
    questions = peers.local_names(random.Random(7))
    assert len(set(questions)) == len(questions) == 10_000
    zones = LocalZones(LocalSettings(), Discovery(TlsSettings()), UpstreamSettings())
    assert all(zones.find(text_to_name(name)) is not None for name, _type in questions)
    assert {qtype for _name, qtype in questions} == {"PTR", "A", "AAAA"}


def test_the_feed_server_of_bench_feeds_answers_304_to_its_etag_and_changes_only_when_told() -> None:
    import urllib.error
    import urllib.request

    from bench import feeds as feed_bench

    served = feed_bench.FeedHttp(feed_bench.make_feeds(4, 400, seed=1))
    try:

        def get(path: str, etag: str = "") -> tuple[int, str, bytes]:
            request = urllib.request.Request(served.url(path), headers={"If-None-Match": etag} if etag else {})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.headers["ETag"], response.read()
            except urllib.error.HTTPError as answer:
                return answer.code, answer.headers["ETag"], b""

        status, etag, body = get("/feed3.txt")  # gzip-encoded: the same bytes, so the same ETag, each time
        assert status == 200 and body[:2] == b"\x1f\x8b"
        assert get("/feed3.txt", etag)[0] == 304 and get("/feed3.txt")[1] == etag
        status, etag, body = get("/feed0.txt")
        assert status == 200 and body.count(b"\n") == 100
        served.changing = True  # the first feeds list one more name at each download
        assert get("/feed0.txt", etag)[0] == 200 and get("/feed2.txt", get("/feed2.txt")[1])[0] == 304
        assert served.answered == {200: 5, 304: 2}
    finally:
        served.httpd.shutdown()
