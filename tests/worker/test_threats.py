"""Threat signs in a device's names (resolver/worker/threats.py): machine-made names and DNS tunnels."""

from __future__ import annotations

import base64
import random
import time
from pathlib import Path

import dns.message
import dns.query
import pytest

from bench.dga import dga_names
from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists
from resolver.shared.dns import text_to_name
from resolver.worker.counters import worker_counters
from resolver.worker.threats import ThreatWatch
from tests.conftest import ServerThread, answer_addresses, make_config

A, TXT = 1, 16
PEOPLE = [
    "google.com",
    "wikipedia.org",
    "stackoverflow.com",
    "bbc.co.uk",
    "netflix.com",
    "microsoftonline.com",
    "whatsapp.net",
    "booking.com",
    "cloudflare-dns.com",
    "amazonaws.com",
    "googleusercontent.com",
]


def alerts_for(names: list[str], qtype: int = A, rate: float = 50.0, client: str = "laptop") -> list:
    now = [0.0]
    watch = ThreatWatch(wall_clock=lambda: now[0])
    for index, name in enumerate(names):
        now[0] = 1000.0 + index / rate
        watch.miss(client, "home", text_to_name(name), qtype, now[0])
    return list(watch.recent)


@pytest.mark.unit
def test_names_of_two_dga_families_are_flagged_and_peoples_names_are_not():
    for family, names in dga_names().items():
        watch = ThreatWatch(recent=1000)
        for name in names[:500]:
            watch.miss(family, "home", text_to_name(name), A, 1000.0)
        assert watch.counts["dga"] >= 0.9 * 500, family  # each name is a domain of its own: each is an alert
    assert alerts_for(PEOPLE) == []


@pytest.mark.unit
def test_a_tunnel_at_50_queries_a_second_is_flagged_within_ten_seconds():
    chunks = [base64.b32encode(random.Random(index).randbytes(30)).decode().rstrip("=").lower() for index in range(500)]
    names = [f"{chunk[:40]}.{chunk[40:]}.t.exfil.example" for chunk in chunks]
    alerts = alerts_for(names, rate=50.0)
    tunnel = [alert for alert in alerts if alert.reason == "tunnel"]
    assert len(tunnel) == 1  # once per domain and hour, however long it goes on
    assert tunnel[0].at - 1000.0 <= 10.0
    assert tunnel[0].client == "laptop" and tunnel[0].name.endswith("exfil.example")


@pytest.mark.unit
def test_a_burst_of_txt_queries_under_one_domain_is_a_tunnel_too():
    names = [f"q{index}.txt.exfil.example" for index in range(40)]
    assert [alert.reason for alert in alerts_for(names, qtype=TXT)] == ["tunnel"]
    assert alerts_for(names, qtype=A) == []  # the same short names as A queries are ordinary browsing


@pytest.mark.unit
def test_many_subdomains_of_a_cdn_from_people_browsing_are_not_a_tunnel():
    names = [f"img{index}.static.example-cdn.com" for index in range(200)] + [
        f"r{index}---sn-abcdefgh.googlevideo.com" for index in range(200)
    ]
    assert alerts_for(names) == []


@pytest.mark.unit
def test_a_steady_drip_under_one_domain_holds_no_more_than_a_window_of_names():
    watch = ThreatWatch()
    for index in range(5000):  # 5 a second, for 1,000 s: one window holds 50 of them, never more
        chunk = base64.b32encode(random.Random(index).randbytes(15)).decode().rstrip("=").lower()
        watch.miss("laptop", "home", text_to_name(f"{chunk}.drip.example"), A, 1000.0 + index / 5)
    windows = list(watch._windows.values())
    assert len(windows) == 1 and len(windows[0].seen) <= 60 and len(windows[0].names) <= 60


@pytest.mark.unit
def test_names_in_alerts_and_logs_cannot_break_a_line():
    watch = ThreatWatch({1: "phishing"})
    watch.listed("laptop", "home", b"\x0bx\nCRITICAL:\x07example\x03com\x00", 1, 1000.0)
    assert watch.recent[0].name == "x\\010CRITICAL:.example.com"


@pytest.mark.unit
def test_slow_drips_stay_under_the_window():
    chunks = [base64.b32encode(random.Random(index).randbytes(30)).decode().rstrip("=").lower() for index in range(60)]
    names = [f"{chunk}.drip.example" for chunk in chunks]
    assert alerts_for(names, rate=2.0) == []  # 20 names in any 10 s: below the 30 that make a tunnel


# --- in a worker, on real sockets -------------------------------------------------------------------------


@pytest.fixture
def phishing_list(tmp_path) -> Path:
    source = tmp_path / "phishing.txt"
    source.write_text("phish.example\n")
    out = tmp_path / "lists.bns"
    compile_lists([Source(source, "phishing")], out, load_catalog())
    return out


@pytest.mark.integration
def test_a_worker_flags_its_clients_dga_names_tunnels_and_listed_names(upstream, phishing_list):
    config = make_config([upstream.address], lists={"path": str(phishing_list)})
    with ServerThread(config) as server:
        for name in dga_names()["ramnit"][:20]:
            dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=server.port, timeout=3)
        began, started = time.time(), time.monotonic()
        for index in range(60):  # a tunnel at 50 queries a second
            chunk = base64.b32encode(random.Random(index).randbytes(25)).decode().rstrip("=").lower()
            dns.query.udp(dns.message.make_query(f"{chunk}.t.exfil.example", "A"), "127.0.0.1", port=server.port)
            time.sleep(max(0.0, started + (index + 1) / 50 - time.monotonic()))
        warned = dns.query.udp(dns.message.make_query("phish.example", "A"), "127.0.0.1", port=server.port, timeout=3)
        assert not answer_addresses(warned)  # warned, not resolved: the alert is for having asked
        threats = server.worker.resolver.threats
        assert threats.counts["dga"] >= 18 and threats.counts["tunnel"] == 1 and threats.counts["phishing"] == 1
        tunnel = next(alert for alert in threats.recent if alert.reason == "tunnel")
        assert tunnel.at - began <= 10 and tunnel.name.endswith("t.exfil.example") and tunnel.client == "127.0.0.1"
        assert counters_of(server)["threats"] == threats.counts
        for name in dga_names()["ramnit"][:5]:  # another device of the same family: the names are cached now
            dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=server.port, source="127.0.0.2")
        assert {alert.name for alert in threats.recent if alert.client == "127.0.0.2"} == set(dga_names()["ramnit"][:5])


def counters_of(server: ServerThread) -> dict:
    return worker_counters(server.worker.resolver, load_catalog())
