"""A worker's device activity (resolver/worker/activity.py): counted on the clients, folded per (site, device,
hour), handed over only when the admin process has taken the last file, and bounded whatever clients send."""

from __future__ import annotations

import json

import dns.message

from blocklists.catalog import load_catalog
from resolver.shared.dns import text_to_name
from resolver.shared.identity import Identity
from resolver.shared.loading import policy_maker
from resolver.shared.policy.decision import Action, AnswerMode, Rule, Verdict
from resolver.shared.policy.effective import find_device, governing
from resolver.shared.policy.model import Site, parse_mac, parse_site
from resolver.worker import activity
from resolver.worker.activity import Tally
from resolver.worker.directory import Client
from resolver.worker.threats import ThreatWatch
from resolver.worker.wire import Query, QueryParser
from tests.conftest import make_config

CATALOG = load_catalog()
DENIED = Verdict(Action.BLOCK, Rule.DENY, 0, "denied by policy", b"", AnswerMode.NXDOMAIN, (), (), 60)
PORN = Verdict(
    Action.BLOCK, Rule.CATEGORY, CATALOG.mask(["pornography"]), "pornography", b"", AnswerMode.NXDOMAIN, (), (), 60
)


MAKER = policy_maker(make_config(["127.0.0.1:9"]), CATALOG)
PARSER = QueryParser(4096)


def query(name: str, rdtype: str = "A") -> Query:
    """The interned query for a name, as the query path has it."""
    return PARSER.parse(dns.message.make_query(name, rdtype).to_wire(), ("192.0.2.1", 5300), False).query


def client(mac: str, site: Site | None) -> Client:
    identity = Identity("192.0.2.1", parse_mac(mac))
    return Client(identity, site, governing(site, None, {}), MAKER)


def counted(tally: Tally, who: Client, queries: int) -> None:
    """As the query path counts."""
    for _ in range(queries):
        if not who.queries:
            tally.counted.append(who)
        who.queries += 1


def test_counts_are_folded_per_device_and_hour_with_verdicts_categories_and_names(tmp_path):
    home = Site("home", query_log=True)
    tally = Tally(CATALOG, ThreatWatch(), clock=lambda: 7200.5)
    tablet, stranger = client("02:00:00:00:00:01", home), client("02:00:00:00:00:02", None)
    counted(tally, tablet, 5)
    counted(tally, stranger, 3)  # of no site: nobody to show it to
    tally.blocked(tablet, DENIED, query("bad.example"))
    tally.blocked(tablet, PORN, query("porn.example"))
    tally.blocked(tablet, PORN, query("porn.example"))
    tally.logged(tablet, text_to_name("bad.example"), 28, DENIED, 7200.25)
    tally.collect()
    path = tmp_path / "worker-0.json"
    assert tally.hand_over(path)
    document = json.loads(path.read_bytes())
    (entry,) = document["devices"]
    assert (entry["site"], entry["key"], entry["hour"], entry["queries"], entry["blocked"]) == (
        "home",
        "mac:02:00:00:00:00:01",
        7200,
        5,
        3,
    )
    assert entry["verdicts"] == {"blocked|deny": 1, "blocked|pornography": 2}
    assert entry["names"] == {"blocked|bad.example": 1, "blocked|porn.example": 2}
    assert document["queries"] == [
        {
            "at": 7200.25,
            "site": "home",
            "device": "mac:02:00:00:00:00:01",
            "name": "bad.example",
            "type": "AAAA",
            "verdict": "blocked",
        }
    ]
    assert tablet.queries == 0 and tablet.blocks is None  # counted afresh for the next collection


def test_nothing_is_written_over_a_file_the_admin_process_has_not_taken(tmp_path):
    tally = Tally(CATALOG, ThreatWatch(), clock=lambda: 100.0)
    tablet = client("02:00:00:00:00:01", Site("home"))
    path = tmp_path / "worker-0.json"
    counted(tally, tablet, 2)
    tally.collect()
    assert tally.hand_over(path)
    counted(tally, tablet, 3)
    tally.collect()
    assert not tally.hand_over(path)  # the last one is still there: the counts keep adding up here
    path.unlink()  # taken
    counted(tally, tablet, 4)
    tally.collect()
    assert tally.hand_over(path)
    assert json.loads(path.read_bytes())["devices"][0]["queries"] == 7


def test_a_flood_of_names_and_devices_costs_bounded_memory(monkeypatch):
    monkeypatch.setattr(activity, "_MAX_PENDING", 50)
    tally = Tally(CATALOG, ThreatWatch(), clock=lambda: 100.0)
    home = Site("home")
    tablet = client("02:00:00:00:00:01", home)
    for index in range(1000):
        tally.blocked(tablet, DENIED, query(f"n{index}.example"))
    assert tablet.blocks is not None and len(tablet.blocks) == activity._MAX_NAMES + 1  # the rest, nameless
    assert sum(count for counts in tablet.blocks.values() for count in counts.values()) == 1000
    for index in range(200):
        counted(tally, client(f"02:00:00:00:{index // 256:02x}:{index % 256:02x}", home), 1)
    tally.collect()
    assert len(tally._pending) == 50 and tally.dropped == 150


def test_a_device_found_by_its_client_id_is_recorded_under_it_though_a_mac_came_too():
    site = parse_site({"id": "home", "devices": {"tablet": {"client_ids": ["0a0b0c0d"]}}}, CATALOG)
    identity = Identity("192.0.2.1", parse_mac("3c:22:fb:00:00:01"), "0a0b0c0d")
    device = find_device(site, identity)
    assert device is not None and device.id == "tablet"
    # The record joins its configured device (configured_keys: id:0a0b0c0d), not a stranger's MAC.
    assert Client(identity, site, governing(site, device, {}), MAKER, device).device_key == "id:0a0b0c0d"
    assert client("02:00:00:00:00:01", site).device_key == "mac:02:00:00:00:00:01"
