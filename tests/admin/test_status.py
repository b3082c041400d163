"""The effective status the admin API gives (resolver/admin/status.py) is what the resolver does: for random sites
(modes, groups, default groups, pauses at every level, schedules), the status of a configured device and of a
device the site does not know agrees with the worker's answer at the same moment and with `why` at the ends it
names; and, for chosen sites, the group, profile, level and ends it reports."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings

from resolver.admin.devices import device_list
from resolver.admin.status import profiles_of, site_status, status_of
from resolver.admin.why import Explainer
from resolver.shared.policy.model import parse_profile, parse_site, parse_time, time_document
from resolver.shared.policy.service import PolicyService
from tests.shared.test_decision import LONDON, MAC, NOW, sites
from tests.shared.test_precedence import MAKER, at
from tests.worker.test_pipeline import CATALOG, Pipeline, ScriptedForwarder, ede_text, query

pytestmark = pytest.mark.unit
STRANGER = "02:00:00:00:00:09"  # a MAC the site does not know: the resolver puts it in the default group
PROFILES = {"guest": None}


async def compare(lists: Path, directory: Path, document: dict[str, Any]) -> list[tuple[dict[str, Any], Any, Any]]:
    """For the site's device and a stranger: (its status as the device list gives it, the worker's EDE text for
    a name listed nowhere, why's answer for it), all at NOW."""
    pipeline = Pipeline(lists, directory / "policies.json", ScriptedForwarder(), now=NOW)
    await PolicyService(pipeline.store).put_site("home", document)
    site = await pipeline.store.load_site("home")
    assert site is not None
    maker = pipeline.resolver.directory.maker
    seen = {f"mac:{mac}": {"mac": mac} for mac in (MAC, STRANGER)}
    listed = {
        entry["mac"]: entry for entry in device_list(site, seen, maker, await profiles_of(pipeline.store, CATALOG), NOW)
    }
    assert (
        site_status(site, maker, await profiles_of(pipeline.store, CATALOG), NOW)["devices"]["pc"]
        == (listed[MAC]["effective"])
    )
    explainer = Explainer(pipeline.store, maker, CATALOG, pipeline.resolver.lists)
    found = []
    for mac in (MAC, STRANGER):
        answer = await pipeline.ask(query(f"{mac[-2:]}.unlisted.example", mac=mac))
        why = await explainer.explain(
            {"name": "unlisted.example", "address": "127.0.0.1", "mac": mac, "at": time_document(NOW)}
        )
        found.append((listed[mac]["effective"], ede_text(answer), why))
    return found


async def why_at(lists: Path, directory: Path, document: dict[str, Any], mac: str, moment: float) -> dict[str, Any]:
    directory.mkdir()
    pipeline = Pipeline(lists, directory / "policies.json", ScriptedForwarder(), now=NOW)
    await PolicyService(pipeline.store).put_site("home", document)
    explainer = Explainer(pipeline.store, pipeline.resolver.directory.maker, CATALOG, pipeline.resolver.lists)
    return await explainer.explain(
        {"name": "unlisted.example", "address": "127.0.0.1", "mac": mac, "at": time_document(moment)}
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=sites())
def test_the_status_is_what_the_resolver_answers(lists, document):
    with tempfile.TemporaryDirectory() as directory:
        compared = asyncio.run(compare(lists, Path(directory), document))
    for status, answered, why in compared:
        event(f"{status['state']} {status['membership']}")
        expected = {
            "paused": "paused",
            "scheduled": f"schedule {(status['schedule'] or {}).get('name')}",
            "ok": None,
        }[status["state"]]
        assert answered == expected, f"status {status}, the resolver answered {answered!r}"
        assert (why["level"], why["group"]) == (status["level"], status["group"])
        if status["state"] == "paused":
            assert why["reason"] == f"paused ({status['pause']['level']})"
            assert status["until"] == status["pause"]["until"]
        if status["state"] == "scheduled":
            assert why["reason"] == f"schedule {status['schedule']['name']}"
            assert status["until"] == status["schedule"]["until"]
        if status["state"] == "ok":
            assert status["until"] is None and why["verdict"] == "allowed"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=sites())
def test_what_decides_the_state_holds_until_the_end_it_names_and_not_after(lists, document):
    with tempfile.TemporaryDirectory() as directory:
        ((status, _answered, _why),) = asyncio.run(compare(lists, Path(directory), document))[:1]
        if status["state"] == "ok" or status["until"] == "forever":
            return
        end = parse_time(status["until"], "until")
        assert end is not None
        reason = (
            f"paused ({status['pause']['level']})"
            if status["state"] == "paused"
            else f"schedule {status['schedule']['name']}"
        )
        before = asyncio.run(why_at(lists, Path(directory) / "before", document, MAC, end - 1))
        after = asyncio.run(why_at(lists, Path(directory) / "after", document, MAC, end + 1))
    # Blocked until that end (by it, or by another block-all schedule that began meanwhile and comes first in
    # the policy's order), and no longer by it after.
    assert before["verdict"] == "blocked" and after["reason"] != reason, (status, before["reason"], after["reason"])
    assert before["reason"] == reason or before["reason"].startswith("schedule "), (status, before["reason"])


def home(**overrides: Any) -> dict[str, Any]:
    document = {
        "id": "home",
        "timezone": "Europe/London",
        "mode": "device",
        "groups": {"kids": {"name": "Kids"}, "adults": {"name": "Adults"}},
        "devices": {
            "tablet": {"macs": ["02:00:00:00:00:01"], "group": "kids"},
            "tv": {"macs": ["02:00:00:00:00:02"]},  # in no group
        },
    }
    document.update(overrides)
    return document


def test_a_device_in_no_group_is_in_none_and_a_stranger_in_the_default_group_if_there_is_one():
    site = parse_site(home(), CATALOG)
    now = at(2026, 11, 24, 12)
    status = site_status(site, MAKER, PROFILES, now)
    assert (status["devices"]["tv"]["group"], status["devices"]["tv"]["membership"]) == (None, "none")
    assert (status["devices"]["tablet"]["group"], status["devices"]["tablet"]["membership"]) == ("kids", "own")
    assert (status_of(site, None, MAKER, PROFILES, now)["membership"]) == "none"  # no default group
    with_default = parse_site(home(default_group="adults"), CATALOG)
    stranger = status_of(with_default, None, MAKER, PROFILES, now)
    assert (stranger["group"], stranger["membership"]) == ("adults", "default")
    # A configured device with no group stays in none, default group or not: as the resolver has it.
    assert site_status(with_default, MAKER, PROFILES, now)["devices"]["tv"]["group"] is None
    assert status["site"]["state"] == "ok" and status["site"]["level"] == "default"
    assert status["at"] == time_document(now)


def test_a_group_pause_shows_on_the_group_its_members_and_not_elsewhere():
    now = at(2026, 11, 24, 12)
    groups = {"kids": {"name": "Kids", "paused_until": "forever"}, "adults": {}}
    status = site_status(parse_site(home(groups=groups), CATALOG), MAKER, PROFILES, now)
    for paused in (status["groups"]["kids"], status["devices"]["tablet"]):
        assert (paused["state"], paused["until"], paused["pause"]) == (
            "paused",
            "forever",
            {"level": "group", "until": "forever"},
        )
    assert status["devices"]["tv"]["state"] == status["site"]["state"] == status["groups"]["adults"]["state"] == "ok"


def test_a_bedtime_schedule_across_midnight_ends_in_the_morning_and_names_its_profile():
    bedtime = {"name": "Bedtime", "days": ["tue"], "from": "21:00", "to": "07:00", "block": "all"}
    homework = {"name": "Homework", "days": ["tue"], "from": "16:00", "to": "22:00", "block": ["hacking"]}
    groups = {"kids": {"policy": {"profile": "strict", "schedules": [homework, bedtime]}}, "adults": {}}
    now = at(2026, 11, 24, 21, 30)  # a Tuesday evening
    profiles = {"strict": parse_profile("strict", {"block": ["drugs"]}, CATALOG)}
    status = site_status(parse_site(home(groups=groups), CATALOG), MAKER, profiles, now)["devices"]["tablet"]
    morning = time_document(at(2026, 11, 25, 7))
    assert (status["state"], status["until"], status["level"], status["profile"]) == (
        "scheduled",
        morning,
        "group",
        "strict",
    )
    assert status["schedule"] == {"name": "Bedtime", "block": "all", "until": morning}
    assert status["schedules"] == [
        {"name": "Homework", "block": ["hacking"], "until": time_document(at(2026, 11, 24, 22))},
        status["schedule"],
    ]
    assert status["valid_until"] == time_document(at(2026, 11, 24, 22))  # Homework ends first
    # Whole days in a row run on: the schedule ends when its last day does.
    days = {"name": "Holiday", "days": ["tue", "wed"], "from": "00:00", "to": "00:00", "block": "all"}
    groups = {"kids": {"policy": {"schedules": [days]}}, "adults": {}}
    status = site_status(parse_site(home(groups=groups), CATALOG), MAKER, {}, now)["groups"]["kids"]
    assert status["until"] == time_document(at(2026, 11, 26, 0, zone=LONDON))
