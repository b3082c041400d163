"""Per-device policy through a real worker, a real Redis and real EDNS identity options (dnspython)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from blocklists.catalog import load_catalog
from resolver.shared.dns import OptionCode
from resolver.shared.policy.model import time_document
from resolver.shared.policy.service import PolicyService
from tests.conftest import ServerThread, answer_addresses, eventually, make_config, redis_policy_store

pytestmark = pytest.mark.integration
CATALOG = load_catalog()
LONDON = ZoneInfo("Europe/London")
TUESDAY_NOON = datetime(2026, 11, 24, 12, 0, tzinfo=LONDON).timestamp()
TUESDAY_NIGHT = datetime(2026, 11, 24, 22, 0, tzinfo=LONDON).timestamp()
WEDNESDAY_MORNING = datetime(2026, 11, 25, 7, 0, tzinfo=LONDON).timestamp()

MACS = {
    "dad": "02:00:00:00:00:01",
    "tablet": "02:00:00:00:00:02",
    "phone": "02:00:00:00:00:03",
    "tv": "02:00:00:00:00:04",
    "stranger": "02:00:00:00:00:99",
}

SITE = {
    "name": "Smith family",
    "networks": ["127.0.0.0/8"],
    "timezone": "Europe/London",
    "mode": "device",
    "default_group": "guests",
    "groups": {
        "kids": {
            "name": "Kids",
            "policy": {
                "block": ["pornography", "drugs"],
                "schedules": [
                    {
                        "name": "bedtime",
                        "days": ["sun", "mon", "tue", "wed", "thu"],
                        "from": "21:00",
                        "to": "07:00",
                        "block": "all",
                    }
                ],
            },
        },
        "guests": {"name": "Guests", "policy": {"profile": "guest"}},
    },
    "devices": {
        "dad": {"macs": [MACS["dad"]], "policy": {"block": []}},
        "tablet": {"macs": [MACS["tablet"]], "group": "kids"},
        "phone": {
            "macs": [MACS["phone"]],
            "group": "kids",
            "policy": {"block": ["pornography"], "allow": ["ok.porn.example"], "deny": ["denied.example"]},
        },
        "tv": {"macs": [MACS["tv"]], "group": "guests"},
    },
}


def write(redis_url: str, prefix: str, work: Callable[[PolicyService], Awaitable[Any]]) -> Any:
    """Run one write through the policy service, as an admin would, on a connection of its own."""

    async def run() -> Any:
        store = redis_policy_store(redis_url, prefix)
        try:
            return await work(PolicyService(store))
        finally:
            await store.close()

    return asyncio.run(run())


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def server_for(
    redis_url: str,
    prefix: str,
    lists: Path,
    upstream,
    clock: Clock | None = None,
    cold_wait: float = 1.0,
    **sections: dict[str, Any],
) -> ServerThread:
    config = make_config(
        [upstream.address],
        lists={"path": str(lists)},
        store={"redis": redis_url, "prefix": prefix, "cold_wait": cold_wait},
        identity={"trusted_networks": ["127.0.0.1/32"]},
        **sections,
    )
    return ServerThread(config, wall_clock=clock)


def ask(
    server: ServerThread, name: str, mac: str | None = None, source: str = "127.0.0.1", rdtype: str = "A"
) -> dns.message.Message:
    options = [dns.edns.GenericOption(OptionCode.MAC, bytes.fromhex(mac.replace(":", "")))] if mac else []
    query = dns.message.make_query(name, rdtype, use_edns=0, options=options)
    return dns.query.udp(query, "127.0.0.1", port=server.port, source=source, timeout=3)


def outcome(response: dns.message.Message) -> str:
    """ "ok", or the EDE text of a blocked answer ("blocked: pornography", "Web Protect: malware"…)."""
    ede = [option for option in response.options if option.otype == dns.edns.OptionType.EDE]
    if response.rcode() == dns.rcode.NOERROR and not ede:
        return "ok"
    assert ede, f"rcode {dns.rcode.to_text(response.rcode())} without an EDE"
    return ede[0].text


@pytest.fixture
def family(shared_redis, redis_prefix) -> tuple[str, str]:
    write(shared_redis.url, redis_prefix, lambda service: service.put_site("smith", SITE))
    return shared_redis.url, redis_prefix


# The precedence table of docs/policies.md, for the family site, on a Tuesday at noon.
TABLE = [
    ("dad", "porn.example", "ok"),  # device policy blocks nothing; it replaces the group/site ones
    ("dad", "malware.example", "Web Protect: malware"),  # Web Protect is on unless a policy turns it off
    ("tablet", "porn.example", "blocked: pornography"),  # no device policy: the group's
    ("tablet", "drug.example", "blocked: drugs"),
    ("tablet", "allowed.example", "ok"),
    ("phone", "drug.example", "ok"),  # the device's policy replaces its group's
    ("phone", "porn.example", "blocked: pornography"),
    ("phone", "ok.porn.example", "ok"),  # allow beats category
    ("phone", "denied.example", "blocked: denied by policy"),  # deny beats the (absent) category
    ("tv", "drug.example", "blocked: drugs"),  # guests group: the guest profile blocks the eight categories
    ("stranger", "porn.example", "blocked: pornography"),  # unknown device: the site's default group
]


@pytest.mark.parametrize(("device", "name", "expected"), TABLE, ids=[f"{d}-{n}" for d, n, _ in TABLE])
def test_precedence_table(family, lists, upstream, device, name, expected):
    with server_for(*family, lists, upstream, Clock(TUESDAY_NOON)) as server:
        assert outcome(ask(server, name, MACS[device])) == expected


def test_two_devices_of_one_site_get_different_answers_at_the_same_moment(family, lists, upstream):
    with server_for(*family, lists, upstream, Clock(TUESDAY_NOON)) as server:
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"
        assert outcome(ask(server, "porn.example", MACS["tablet"])) == "blocked: pornography"
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"


def test_identity_options_from_an_untrusted_source_are_ignored(family, lists, upstream):
    with server_for(*family, lists, upstream, Clock(TUESDAY_NOON)) as server:
        assert outcome(ask(server, "porn.example", MACS["dad"], source="127.0.0.1")) == "ok"
        # the same MAC from 127.0.0.2, which is not trusted: only the address counts, an unknown device
        # of the site, so the default (guests) group
        assert outcome(ask(server, "porn.example", MACS["dad"], source="127.0.0.2")) == "blocked: pornography"


def test_unknown_client_gets_the_global_default(family, lists, upstream, shared_redis, redis_prefix):
    write(shared_redis.url, redis_prefix, lambda service: service.set_site_fields("smith", {"networks": []}))
    with server_for(*family, lists, upstream, Clock(TUESDAY_NOON), policy={"block": ["drugs"], "warn": []}) as server:
        assert outcome(ask(server, "drug.example", MACS["dad"])) == "blocked: drugs"
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"


def test_schedule_blocks_everything_in_its_window_and_ends_by_itself(family, lists, upstream):
    clock = Clock(TUESDAY_NOON)
    with server_for(*family, lists, upstream, clock) as server:
        assert outcome(ask(server, "allowed.example", MACS["tablet"])) == "ok"
        clock.now = TUESDAY_NIGHT
        assert outcome(ask(server, "allowed.example", MACS["tablet"])) == "schedule bedtime"
        assert outcome(ask(server, "allowed.example", MACS["phone"])) == "ok"  # its own policy has no bedtime
        clock.now = WEDNESDAY_MORNING - 1
        assert outcome(ask(server, "allowed.example", MACS["tablet"])) == "schedule bedtime"
        clock.now = WEDNESDAY_MORNING
        assert outcome(ask(server, "allowed.example", MACS["tablet"])) == "ok"


def test_pause_beats_allow_and_ends_at_its_time(family, lists, upstream, shared_redis, redis_prefix):
    clock = Clock(TUESDAY_NOON)
    until = TUESDAY_NOON + 600
    # Written as a document: a pause ending before the wall clock's now is refused when asked for (issue 19).
    phone = {**SITE["devices"]["phone"], "paused_until": time_document(until)}
    write(shared_redis.url, redis_prefix, lambda service: service.put_device("smith", "phone", phone))
    with server_for(*family, lists, upstream, clock) as server:
        assert outcome(ask(server, "ok.porn.example", MACS["phone"])) == "paused"
        clock.now = until
        assert outcome(ask(server, "ok.porn.example", MACS["phone"])) == "ok"


def test_a_change_on_a_running_server_takes_effect_within_a_second(family, lists, upstream, shared_redis, redis_prefix):
    with server_for(*family, lists, upstream) as server:
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"
        write(shared_redis.url, redis_prefix, lambda service: service.pause("smith", ("device", "dad")))
        eventually(lambda: outcome(ask(server, "porn.example", MACS["dad"])) == "paused", 1.0)
        write(shared_redis.url, redis_prefix, lambda service: service.unpause("smith", ("device", "dad")))
        eventually(lambda: outcome(ask(server, "porn.example", MACS["dad"])) == "ok", 1.0)


def test_a_sites_own_names_are_answered_to_its_devices_only_filtered_and_changed_live(
    family, lists, upstream, shared_redis, redis_prefix
):
    """Issue 21: a business's `printer.office.example` in its site document: its devices get the record (after
    their policy: a device that denies the name is blocked), every other client what the upstream says."""
    records = [
        "printer.office.example. 300 A 192.168.1.20",
        "files.office.example. CNAME nas.office.example.",
        "nas.office.example. AAAA fd00::20",
        "_ipp._tcp.office.example. SRV 0 0 631 printer.office.example.",
    ]
    own = {"records": records, "networks": ["127.0.0.1/32"]}  # 127.0.0.2 is a client of no site
    write(shared_redis.url, redis_prefix, lambda service: service.set_site_fields("smith", own))
    write(
        shared_redis.url,
        redis_prefix,
        lambda service: service.put_device(
            "smith", "phone", {**SITE["devices"]["phone"], "policy": {"deny": ["printer.office.example"]}}
        ),
    )
    with server_for(*family, lists, upstream, Clock(TUESDAY_NOON)) as server:  # the kids' bedtime is over
        printer = ask(server, "printer.office.example", MACS["dad"])
        assert answer_addresses(printer) == ["192.168.1.20"] and printer.answer[0].ttl == 300
        assert [
            str(rrset.name) for rrset in ask(server, "Files.Office.Example", MACS["tablet"], rdtype="AAAA").answer
        ] == [
            "Files.Office.Example.",
            "nas.office.example.",
        ]
        srv = ask(server, "_ipp._tcp.office.example", MACS["tablet"], rdtype="SRV")
        assert srv.answer[0][0].port == 631
        nodata = ask(server, "printer.office.example", MACS["dad"], rdtype="TXT")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
        assert outcome(ask(server, "printer.office.example", MACS["phone"])) == "blocked: denied by policy"
        stranger = ask(server, "printer.office.example", source="127.0.0.2")
        assert answer_addresses(stranger)[0].startswith("192.0.2.")  # a client of no site: the upstream's answer
        assert upstream.names_seen().count("printer.office.example") == 1
        write(
            shared_redis.url,
            redis_prefix,
            lambda service: service.set_site_fields("smith", {"records": ["printer.office.example. A 192.168.1.21"]}),
        )
        eventually(
            lambda: answer_addresses(ask(server, "printer.office.example", MACS["dad"])) == ["192.168.1.21"], 1.0
        )


@pytest.mark.parametrize(
    ("records", "field", "reason"),
    [
        (["printer.office.example. A 300.1.1.1"], "records", "line 1"),
        (["a.office.example. CNAME b.office.example.", "b.office.example. CNAME a.office.example."], "records", "loop"),
        (["printer.home.arpa. A 192.168.1.20"], "records[0]", "under home.arpa, which is answered before the device"),
        (["20.1.168.192.in-addr.arpa. PTR printer.office.example."], "records[0]", "under 168.192.in-addr.arpa"),
        ("printer A 192.0.2.1", "records", "must be a list"),
    ],
)
def test_a_bad_site_record_is_refused_naming_the_field(family, shared_redis, redis_prefix, records, field, reason):
    from resolver.shared.policy.model import PolicyError

    with pytest.raises(PolicyError) as refused:
        write(shared_redis.url, redis_prefix, lambda service: service.set_site_fields("smith", {"records": records}))
    assert refused.value.field == field and reason in refused.value.reason, refused.value


@pytest.mark.logs("local records in the store cannot be read")
def test_records_in_the_store_that_do_not_parse_leave_the_last_ones_served(
    family, lists, upstream, shared_redis, redis_prefix
):
    import redis

    async def put(service: PolicyService) -> object:
        return await service.store.set_records(["intranet.corp.example. A 10.1.2.3"])

    write(shared_redis.url, redis_prefix, put)
    with server_for(*family, lists, upstream) as server:

        def intranet() -> list[str]:
            return answer_addresses(ask(server, "intranet.corp.example", source="127.0.0.2"))

        eventually(lambda: intranet() == ["10.1.2.3"], 2)
        client = redis.Redis.from_url(shared_redis.url)
        for garbage in (b"{not json", json.dumps(["intranet.corp.example. A 999.1.2.3"]).encode()):
            client.hset(f"{redis_prefix}records", "doc", garbage)  # not as the API writes them
            client.publish(f"{redis_prefix}changes", "records - 1")
            time.sleep(0.3)
            assert intranet() == ["10.1.2.3"]
        client.close()


# A subscriber writing its own site without pause (issue 18), from a process of its own: a device's 1,000
# allow names, new ones each time, straight to the store.
_STORM = """
import asyncio, sys, time
from blocklists.catalog import load_catalog
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.redis import RedisConnection
from resolver.shared.store.redis_policies import RedisStore

async def main(url, prefix, seconds):
    store = RedisStore(RedisConnection(url, prefix), load_catalog())
    deadline, written = time.monotonic() + float(seconds), 0
    while time.monotonic() < deadline:
        names = [f"w{written}-{index}.allowed.example.com" for index in range(1000)]
        await PolicyService(store).set_policy("noisy", ("device", "d0"), {"allow": names})
        written += 1
    await store.close()
    print(written)

asyncio.run(main(*sys.argv[1:]))
"""


def test_a_site_written_without_pause_is_reloaded_spaced_out(family, lists, upstream, shared_redis, redis_prefix):
    """Every write of a site makes each worker holding it parse its whole document again, between two answers
    to anybody (issue 18). A site written as fast as its writer can is reloaded only at a spacing of 200 times
    what its reload took (about 1 s here, for its 100 kB), not every 50 ms: the worker stays free for the
    other sites, whose changes still arrive at once, and the noisy site's last change arrives too."""
    names = [f"n{n}.allowed-names.example.com" for n in range(1000)]
    devices = {f"d{index}": {"policy": {"allow": [f"{index}-{name}" for name in names]}} for index in range(3)}
    noisy = {"networks": ["127.0.1.0/24"], "mode": "device", "devices": devices}
    write(shared_redis.url, redis_prefix, lambda service: service.put_site("noisy", noisy))
    with server_for(*family, lists, upstream) as server:
        assert outcome(ask(server, "porn.example", source="127.0.1.1")) == "blocked: pornography"  # held
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"
        assert server.worker is not None
        sites = server.worker.directory._sites
        storm = subprocess.Popen(
            [sys.executable, "-c", _STORM, shared_redis.url, redis_prefix, "3"], stdout=subprocess.PIPE, text=True
        )
        held: set[int] = set()  # the versions of the noisy site the worker was seen to hold
        other_changed = False
        started = time.monotonic()
        while storm.poll() is None:
            held.add(server.call(lambda: sites["noisy"].version))
            if not other_changed and time.monotonic() - started > 1.0:  # another site's change, mid-storm
                write(shared_redis.url, redis_prefix, lambda service: service.pause("smith", ("device", "dad")))
                eventually(lambda: outcome(ask(server, "porn.example", MACS["dad"])) == "paused", 1.0)
                other_changed = True
            time.sleep(0.01)
        written = int(storm.communicate()[0])
        write(shared_redis.url, redis_prefix, lambda service: service.pause("noisy", ("site", None)))
        eventually(lambda: outcome(ask(server, "porn.example", source="127.0.1.1")) == "paused", 5.0)
    reloads = len(held) - 1  # the version held before the storm was no reload
    assert written > 30, written  # the writer did write without pause
    assert reloads <= 15, f"{reloads} reloads of {written} writes in 3 s"


def test_an_invalid_write_is_refused_whole(family, shared_redis, redis_prefix):
    from resolver.shared.policy.model import PolicyError

    before = write(shared_redis.url, redis_prefix, lambda service: service.get_site("smith"))
    broken = {**SITE, "name": "changed", "devices": {**SITE["devices"], "tv": {"macs": ["not-a-mac"]}}}
    with pytest.raises(PolicyError, match=r"devices\.tv\.macs\[0\]: 'not-a-mac' is not a MAC address"):
        write(shared_redis.url, redis_prefix, lambda service: service.put_site("smith", broken))
    assert write(shared_redis.url, redis_prefix, lambda service: service.get_site("smith")) == before


def test_redis_killed_keeps_last_policies_and_comes_back(own_redis, redis_prefix, lists, upstream, caplog):
    caplog.set_level(logging.INFO, logger="resolver.worker.directory")
    write(own_redis.url, redis_prefix, lambda service: service.put_site("smith", SITE))
    with server_for(own_redis.url, redis_prefix, lists, upstream, Clock(TUESDAY_NOON), cold_wait=0.05) as server:
        assert outcome(ask(server, "porn.example", MACS["tablet"])) == "blocked: pornography"
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"
        own_redis.kill()
        # known clients keep their policies; an unseen one gets the default at once instead of waiting
        for _ in range(3):
            assert outcome(ask(server, "porn.example", MACS["tablet"])) == "blocked: pornography"
            assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"
        started = time.monotonic()
        assert outcome(ask(server, "porn.example", MACS["tv"])) == "blocked: pornography"  # the global default
        assert time.monotonic() - started < 0.5
        assert "policy store unavailable" in caplog.text
        own_redis.start()  # same data (append-only file)
        write(own_redis.url, redis_prefix, lambda service: service.pause("smith", ("device", "dad")))
        eventually(lambda: outcome(ask(server, "porn.example", MACS["dad"])) == "paused", 5.0)
        # said by the resync after the outage, which may end after the pause's own notice was applied
        eventually(lambda: "policy store reachable again" in caplog.text, 5.0)


def test_missed_notices_are_caught_up_by_a_resync(own_redis, redis_prefix, lists, upstream):
    """A change that no notice announces (as if published while the subscription was down) is found by the
    resync that follows a broken subscription."""
    write(own_redis.url, redis_prefix, lambda service: service.put_site("smith", SITE))
    with server_for(own_redis.url, redis_prefix, lists, upstream, Clock(TUESDAY_NOON)) as server:
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"
        document, version = write(own_redis.url, redis_prefix, lambda service: service.get_site("smith"))
        document["devices"]["dad"]["paused_until"] = "forever"
        own_redis.command(
            "HSET", f"{redis_prefix}site:smith", "doc", json.dumps(document), "version", str(version + 1)
        )  # behind the store's back: no notice
        time.sleep(0.3)
        assert outcome(ask(server, "porn.example", MACS["dad"])) == "ok"  # nobody told the worker
        own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        eventually(lambda: outcome(ask(server, "porn.example", MACS["dad"])) == "paused", 5.0)


def test_a_frozen_redis_never_holds_a_new_client_longer_than_cold_wait(own_redis, redis_prefix, lists, upstream):
    write(own_redis.url, redis_prefix, lambda service: service.put_site("smith", SITE))
    with server_for(own_redis.url, redis_prefix, lists, upstream, Clock(TUESDAY_NOON), cold_wait=0.02) as server:
        own_redis.freeze()
        try:
            started = time.monotonic()
            response = ask(server, "porn.example", MACS["tv"])
            assert time.monotonic() - started < 0.5
            assert outcome(response) == "blocked: pornography"  # the global default, not a wait
        finally:
            own_redis.thaw()


def test_cname_chain_into_a_blocked_name_is_blocked(family, lists, upstream):
    upstream.script.cnames["innocent.example"] = "porn.example"
    with server_for(*family, lists, upstream, Clock(TUESDAY_NOON)) as server:
        assert outcome(ask(server, "innocent.example", MACS["tablet"])) == "blocked: pornography"
        assert outcome(ask(server, "innocent.example", MACS["dad"])) == "ok"  # same cached answer, other policy
        assert outcome(ask(server, "innocent.example", MACS["tablet"])) == "blocked: pornography"  # a cache hit


def test_safe_search_answers_with_the_restrict_name(family, lists, upstream, shared_redis, redis_prefix):
    write(
        shared_redis.url,
        redis_prefix,
        lambda service: service.set_policy("smith", ("device", "dad"), {"safe_search": True}),
    )
    with server_for(*family, lists, upstream, Clock(TUESDAY_NOON)) as server:
        response = ask(server, "www.google.com", MACS["dad"])
        assert response.answer[0].rdtype == dns.rdatatype.CNAME
        assert str(response.answer[0][0].target) == "forcesafesearch.google.com."
        assert answer_addresses(response)
        assert str(response.answer[1].name) == "forcesafesearch.google.com."
        assert "forcesafesearch.google.com" in upstream.names_seen()
        plain = ask(server, "www.google.com", MACS["tablet"])  # no safe search for the tablet
        assert plain.answer[0].rdtype == dns.rdatatype.A


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed (Debian: dnsmasq-base)")
def test_a_real_router_dnsmasq_adds_the_cpe_id_that_picks_the_site(lists, upstream, shared_redis, redis_prefix):
    """dnsmasq in front of bns, as a customer's router: `--add-cpe-id` (option 65074) and `--add-subnet`
    (ECS) on every query it forwards. (Its `--add-mac` needs the client in the ARP table, which a loopback
    client never is, so MAC identity is tested with dnspython above.)"""
    site = {
        "name": "Jones",
        "networks": ["198.51.100.0/29"],
        "cpe_ids": ["cpe-jones"],
        "mode": "network",
        "policy": {"block": ["pornography"], "web_protect": False},
    }
    write(shared_redis.url, redis_prefix, lambda service: service.put_site("jones", site))
    with server_for(shared_redis.url, redis_prefix, lists, upstream) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            router_port = probe.getsockname()[1]
        router = subprocess.Popen(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                f"--port={router_port}",
                "--pid-file=",
                f"--server=127.0.0.1#{server.port}",
                "--add-cpe-id=cpe-jones",
                "--add-subnet=32",
                "--cache-size=0",
                "--user=" + pwd.getpwuid(os.getuid()).pw_name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def through_router(name: str) -> int:
                query = dns.message.make_query(name, "A")
                return dns.query.udp(query, "127.0.0.1", port=router_port, timeout=3).rcode()

            deadline = time.monotonic() + 10
            while True:
                try:
                    assert through_router("allowed.example") == dns.rcode.NOERROR
                    break
                except dns.exception.Timeout:
                    assert router.poll() is None and time.monotonic() < deadline, router.stderr.read()
            assert through_router("porn.example") == dns.rcode.NXDOMAIN  # the Jones site's policy, by CPE id
            assert through_router("malware.example") == dns.rcode.NOERROR  # its Web Protect is off
            # Straight to bns, with no router to vouch for it: no site, the global default.
            assert outcome(ask(server, "malware.example")) == "Web Protect: malware"
            assert outcome(ask(server, "porn.example")) == "blocked: pornography"
        finally:
            router.terminate()
            router.wait(10)


# Two sites: alpha's router is 127.0.0.1 (trusted); bravo is a neighbour at 127.0.5.0/24 with a TV and a CPE id.
ALPHA = {"networks": ["127.0.0.1/32"], "mode": "network", "policy": {"block": ["drugs"]}}
BRAVO = {
    "networks": ["127.0.5.0/24"],
    "cpe_ids": ["bravo-cpe"],
    "mode": "network",
    "policy": {"block": ["pornography"]},
    "devices": {"tv": {"addresses": ["127.0.5.9"]}},
}


def ask_claiming(server: ServerThread, name: str, *, subnet: str | None = None, cpe: str | None = None):
    options: list[dns.edns.Option] = []
    if subnet is not None:
        options.append(dns.edns.ECSOption(subnet, 32))
    if cpe is not None:
        options.append(dns.edns.GenericOption(OptionCode.CPE_ID, cpe.encode()))
    query = dns.message.make_query(name, "A", use_edns=0, options=options)
    return dns.query.udp(query, "127.0.0.1", port=server.port, source="127.0.0.1", timeout=3)


@pytest.fixture
def neighbours(shared_redis, redis_prefix) -> tuple[str, str]:
    async def both(service: PolicyService) -> None:
        await service.put_site("alpha", ALPHA)
        await service.put_site("bravo", BRAVO)

    write(shared_redis.url, redis_prefix, both)
    return shared_redis.url, redis_prefix


def test_a_router_speaks_for_its_own_site_only(neighbours, lists, upstream):
    """An attacker's reproduction: site A's router sent ECS with an address of site B, and its queries were
    recorded as site B's TV (its alert posted to B's webhook). Claims about another site are ignored and
    counted; the router's own site decides, for its LAN addresses too."""
    with server_for(*neighbours, lists, upstream, Clock(TUESDAY_NOON)) as server:
        # bravo's address, bravo's CPE id: both refused, so alpha's own policy answers (drugs, not porn)
        for claim in ({"subnet": "127.0.5.9"}, {"cpe": "bravo-cpe"}, {"subnet": "127.0.5.9", "cpe": "bravo-cpe"}):
            assert outcome(ask_claiming(server, "drug.example", **claim)) == "blocked: drugs", claim
            assert outcome(ask_claiming(server, "porn.example", **claim)) == "ok", claim
        assert outcome(ask_claiming(server, "malware.example", subnet="127.0.5.9")) == "Web Protect: malware"
        alerts = server.call(lambda: list(server.worker.resolver.threats.recent))
        assert [(alert.site, alert.device) for alert in alerts] == [("alpha", "ip:127.0.0.1")]
        refused = server.call(lambda: dict(server.worker.resolver.directory.refused_claims))
        assert refused.keys() == {"address", "cpe_id"} and min(refused.values()) >= 2  # more if a stand-in was made
        # a LAN address no site holds is the router's to name: alpha decides it, not the global default
        assert outcome(ask_claiming(server, "drug.example", subnet="192.168.1.23")) == "blocked: drugs"
        assert outcome(ask_claiming(server, "porn.example", subnet="192.168.1.23")) == "ok"


def test_a_trusted_source_in_no_site_speaks_for_any(neighbours, lists, upstream, shared_redis, redis_prefix):
    """The ISP's edge (trusted, in no site's networks) adds every customer's address: believed as it is."""
    write(shared_redis.url, redis_prefix, lambda service: service.set_site_fields("alpha", {"networks": []}))
    with server_for(*neighbours, lists, upstream, Clock(TUESDAY_NOON)) as server:
        assert outcome(ask_claiming(server, "porn.example", subnet="127.0.5.9")) == "blocked: pornography"
        assert outcome(ask_claiming(server, "porn.example", cpe="bravo-cpe")) == "blocked: pornography"
        assert server.call(lambda: dict(server.worker.resolver.directory.refused_claims)) == {}


def test_while_the_store_is_out_a_router_whose_site_is_not_held_cannot_speak_for_a_held_one(
    own_redis, redis_prefix, lists, upstream
):
    """The confinement holds without the store too: the worker holds bravo (one of its devices asked) but not
    alpha, whose router then claims bravo's CPE id. It must not get bravo's policy (its stand-in would, by
    CPE id): its claims are set aside and it gets the default policy, the most it can be told apart by."""

    async def both(service: PolicyService) -> None:
        await service.put_site("alpha", ALPHA)
        await service.put_site("bravo", BRAVO)

    write(own_redis.url, redis_prefix, both)
    with server_for(
        own_redis.url, redis_prefix, lists, upstream, Clock(TUESDAY_NOON), cold_wait=0.05, policy={"block": ["drugs"]}
    ) as server:
        tv = dns.message.make_query("drug.example", "A", use_edns=0)
        assert outcome(dns.query.udp(tv, "127.0.0.1", port=server.port, source="127.0.5.9", timeout=3)) == "ok"
        eventually(lambda: server.call(lambda: server.worker.resolver.directory._site_networks is not None), 2)
        own_redis.kill()
        assert outcome(ask_claiming(server, "drug.example", cpe="bravo-cpe")) == "blocked: drugs"  # not bravo's
        assert outcome(ask_claiming(server, "malware.example", cpe="bravo-cpe")) == "Web Protect: malware"
        alerts = server.call(lambda: list(server.worker.resolver.threats.recent))
        assert [alert.site for alert in alerts] == [None]
