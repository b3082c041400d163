"""Bypass prevention (resolver/shared/policy/decision.py, resolver/worker/threats.py): the canaries of Firefox and
iCloud Private Relay answered NXDOMAIN by default, whatever the answer mode and through a pause, and resolved
when a site's policy turns them off; the encrypted-dns category (a sample of the real list, tests/fixtures)
blocked by default, and a device asking for one of its names while it is blocked raising one alert, which the
admin API lists under the device's key. None of these is ever asked upstream while it is answered here."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
import dns.rcode
import pytest
from aiohttp.test_utils import TestClient, TestServer

from resolver.admin.recorder import Recorder
from resolver.admin.why import Explainer
from tests.conftest import answer_addresses
from tests.shared.test_store_faults import API_TOKEN, api_over
from tests.worker.test_pipeline import CATALOG, Pipeline, ScriptedForwarder, ede_text, query, run, write_site

pytestmark = pytest.mark.unit
CANARIES = ["use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com"]
FILTERS = "blocked: this network filters DNS"
TABLET, PHONE = "02:00:00:00:00:01", "02:00:00:00:00:02"
TABLET_KEY = f"mac:{TABLET}"
DOH = ["dns.google", "mozilla.cloudflare-dns.com", "cloudflare-dns.com"]  # in tests/fixtures/encrypted-dns.txt.gz


async def answers(pipeline: Pipeline, names: list[str], mac: str | None = None) -> list[dns.message.Message]:
    return [dns.message.from_wire(await pipeline.ask(query(name, mac=mac))) for name in names]


def nxdomain(answer: dns.message.Message, text: str) -> bool:
    return answer.rcode() == dns.rcode.NXDOMAIN and ede_text(answer.to_wire()) == text


def test_the_canaries_are_nxdomain_by_default_whatever_the_answer_mode_and_never_asked_upstream(lists, tmp_path):
    site = {
        "networks": ["127.0.0.1/32"],  # not the plain client's (127.0.0.2)
        "mode": "device",
        "groups": {"kids": {"policy": {"block": ["drugs"]}}},
        "devices": {
            "tablet": {"macs": [TABLET], "group": "kids"},
            "phone": {"macs": [PHONE], "group": "kids", "paused_until": "forever"},
        },
    }

    async def work(pipeline: Pipeline) -> None:
        await write_site(pipeline, site)
        for name in ["drug.example", *CANARIES]:  # a client of no site: the default policy
            answer = dns.message.from_wire(await pipeline.ask(query(name), ("127.0.0.2", 5353)))
            assert nxdomain(answer, FILTERS) if name in CANARIES else answer_addresses(answer) == ["0.0.0.0"]
        for mac in (TABLET, PHONE):  # blocked by its policy, paused
            blocked = (await answers(pipeline, ["drug.example"], mac))[0]
            assert answer_addresses(blocked) == ["0.0.0.0"], blocked
            for answer in await answers(pipeline, CANARIES, mac):  # an address would say "no filter here"
                assert nxdomain(answer, FILTERS), answer
        assert pipeline.forwarder.asked == []
        assert pipeline.resolver.threats.counts == {}  # asked at every browser start: no alert
        explainer = Explainer(pipeline.store, pipeline.resolver.directory.maker, CATALOG, pipeline.resolver.lists)
        why = await explainer.explain({"name": "mask.icloud.com", "address": "127.0.0.1", "mac": PHONE})
        assert {key: why[key] for key in ("verdict", "rule", "reason", "answer", "ede_text", "entry", "device")} == {
            "verdict": "blocked",
            "rule": "canary",
            "reason": "bypass canary",
            "answer": "nxdomain",
            "ede_text": FILTERS,
            "entry": "mask.icloud.com",
            "device": "phone",
        }

    run(lists, tmp_path, work, sections={"policy": {"answer": "null"}})  # blocked names get 0.0.0.0


def test_a_site_that_turns_the_canaries_off_gets_them_resolved_for_its_devices_only(lists, tmp_path):
    site = {
        "networks": ["127.0.0.0/8"],
        "mode": "device",
        "groups": {"adults": {"policy": {"canaries": False, "block": ["pornography"]}}},
        "devices": {"laptop": {"macs": [TABLET], "group": "adults"}, "phone": {"macs": [PHONE]}},
    }

    async def work(pipeline: Pipeline) -> None:
        await write_site(pipeline, site)
        for answer in await answers(pipeline, CANARIES, TABLET):
            assert answer.rcode() == dns.rcode.NOERROR and answer_addresses(answer), answer
        assert pipeline.forwarder.asked == CANARIES
        for answer in await answers(pipeline, CANARIES, PHONE):  # the default policy: on
            assert nxdomain(answer, FILTERS), answer
        assert pipeline.forwarder.asked == CANARIES
        assert (await answers(pipeline, ["porn.example"], TABLET))[0].rcode() == dns.rcode.NXDOMAIN

    run(lists, tmp_path, work)


def bypass_alerts(pipeline: Pipeline) -> list[Any]:
    return [alert for alert in pipeline.resolver.threats.recent if alert.reason == "bypass"]


def test_an_encrypted_dns_server_is_blocked_by_default_and_its_asker_alerted_once(lists, tmp_path):
    site = {
        "networks": ["127.0.0.1/32"],  # not the plain client's (127.0.0.2)
        "mode": "device",
        "groups": {
            "guests": {"policy": {"profile": "guest"}},
            "open": {"policy": {"block": ["pornography"]}},  # a block list without encrypted-dns
        },
        "devices": {"tablet": {"macs": [TABLET], "group": "guests"}, "phone": {"macs": [PHONE], "group": "open"}},
    }

    async def work(pipeline: Pipeline) -> None:
        await write_site(pipeline, site)
        for name in DOH:  # a client of no site: the default policy blocks them
            answer = dns.message.from_wire(await pipeline.ask(query(name), ("127.0.0.2", 5353)))
            assert nxdomain(answer, "blocked: encrypted-dns"), answer
        for _ in range(3):
            for answer in await answers(pipeline, DOH, TABLET):  # the guest profile blocks them too
                assert nxdomain(answer, "blocked: encrypted-dns"), answer
        assert pipeline.forwarder.asked == []
        # Once per client and domain (mozilla.cloudflare-dns.com stands for cloudflare-dns.com too).
        assert [(alert.site, alert.device, alert.name, alert.detail) for alert in bypass_alerts(pipeline)] == [
            (None, "ip:127.0.0.2", "dns.google", "tried to bypass the filter"),
            (None, "ip:127.0.0.2", "mozilla.cloudflare-dns.com", "tried to bypass the filter"),
            ("home", TABLET_KEY, "dns.google", "tried to bypass the filter"),
            ("home", TABLET_KEY, "mozilla.cloudflare-dns.com", "tried to bypass the filter"),
        ]
        for answer in await answers(pipeline, DOH, PHONE):  # not blocked for it: resolved, no alert
            assert answer_addresses(answer), answer
        assert pipeline.forwarder.asked == DOH and len(bypass_alerts(pipeline)) == 4

    run(lists, tmp_path, work)


@pytest.mark.integration
def test_a_bypass_alert_reaches_the_api_once_under_the_devices_key(lists, tmp_path):
    """Two workers see the device try (each alerts once): the store keeps one alert, listed by the API."""
    site = {"networks": ["127.0.0.0/8"], "mode": "device", "devices": {"tablet": {"macs": [TABLET]}}}

    async def work() -> list[dict[str, Any]]:
        spool = tmp_path / "spool"
        workers = [Pipeline(lists, tmp_path / "policies.json", ScriptedForwarder()) for _index in range(2)]
        await write_site(workers[0], site)
        for index, pipeline in enumerate(workers):
            for _ in range(2):
                await answers(pipeline, ["dns.google"], TABLET)
            assert pipeline.resolver.threats.counts == {"bypass": 1}  # each worker alerts once
            pipeline.resolver.tally.collect()
            assert pipeline.resolver.tally.hand_over(spool / f"worker-{index}.json")
        api = api_over(workers[0].store, tmp_path / "admin")
        await Recorder(spool, api.activity, workers[0].store).take()
        async with TestClient(TestServer(api.app())) as client:
            response = await client.get("/v1/sites/home/alerts", headers={"Authorization": f"Bearer {API_TOKEN}"})
            assert response.status == 200
            return (await response.json())["alerts"]

    for directory in ("admin", "spool"):
        (tmp_path / directory).mkdir()
    alerts = asyncio.run(work())
    assert [(alert["reason"], alert["device"], alert["name"], alert["site"]) for alert in alerts] == [
        ("bypass", TABLET_KEY, "dns.google", "home")
    ]
