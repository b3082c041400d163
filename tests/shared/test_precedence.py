"""Precedence, pauses, schedules (midnight, DST), profiles and allow/deny: every rule of docs/policies.md."""

from __future__ import annotations

import math
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from blocklists.catalog import load_catalog
from resolver.shared.config import PolicySettings
from resolver.shared.dns import text_to_name
from resolver.shared.policy.decision import ALLOWED, PASSED, Action
from resolver.shared.policy.effective import MAX_VALIDITY, PolicyMaker, answering_from, default_policy, governing
from resolver.shared.policy.model import parse_site

pytestmark = pytest.mark.unit
CATALOG = load_catalog()
SETTINGS = PolicySettings(block=["weapons"], warn=[])
MAKER = PolicyMaker(CATALOG, answering_from(SETTINGS), default_policy(SETTINGS, CATALOG))
LONDON = ZoneInfo("Europe/London")
PROFILES = {"guest": None}


def at(year: int, month: int, day: int, hour: int, minute: int = 0, zone: ZoneInfo = LONDON) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=zone).timestamp()


def site(mode: str = "device", **overrides) -> dict:
    document = {
        "id": "s",
        "timezone": "Europe/London",
        "mode": mode,
        "policy": {"block": ["hate"]},
        "groups": {"g": {"policy": {"block": ["drugs"]}}, "bare": {}},
        "devices": {
            "own": {"macs": ["02:00:00:00:00:01"], "group": "g", "policy": {"block": ["pornography"]}},
            "grouped": {"macs": ["02:00:00:00:00:02"], "group": "g"},
            "loose": {"macs": ["02:00:00:00:00:03"]},
            "in-bare": {"macs": ["02:00:00:00:00:04"], "group": "bare"},
        },
    }
    document.update(overrides)
    return document


def policy_of(document: dict, device: str | None, now: float = 0.0, profiles: dict | None = None):
    parsed = parse_site(document, CATALOG)
    rule = governing(parsed, parsed.devices.get(device) if device else None, profiles or {})
    return MAKER.effective(rule, now)


def blocked(document: dict, device: str | None, now: float = 0.0) -> list[str]:
    return CATALOG.ids(policy_of(document, device, now)[0].blocked)


@pytest.mark.parametrize(
    ("mode", "device", "expected", "level"),
    [
        ("device", "own", ["pornography"], "device"),  # the device's own policy
        ("device", "grouped", ["drugs"], "group"),  # no device policy: its group's
        ("device", "loose", ["weapons"], "default"),  # neither: the global default, not the site's
        ("device", "in-bare", ["weapons"], "default"),  # a group without a policy: the global default
        ("device", None, ["weapons"], "default"),  # an unknown device, no default group
        ("network", "own", ["hate"], "subscriber"),  # network mode: the site's policy for everyone
        ("network", None, ["hate"], "subscriber"),
    ],
)
def test_precedence(mode, device, expected, level):
    policy, _ = policy_of(site(mode), device)
    assert CATALOG.ids(policy.blocked) == expected
    assert policy.level == level


def test_network_mode_without_a_site_policy_is_the_global_default():
    assert blocked(site("network", policy=None), "own") == ["weapons"]


def test_unknown_device_joins_the_default_group():
    assert blocked(site("device", default_group="g"), None) == ["drugs"]


def test_no_site_at_all_is_the_global_default():
    policy, until = MAKER.effective(governing(None, None, {}), 0.0)
    assert policy is MAKER.default and until == MAX_VALIDITY


def test_pause_beats_everything_and_ends_by_itself():
    document = site()
    document["devices"]["own"]["paused_until"] = "1970-01-01T00:10:00Z"
    document["devices"]["own"]["policy"]["allow"] = ["example.com"]
    policy, until = policy_of(document, "own", now=0.0)
    assert policy.block_all is not None and policy.block_all.reason == "paused (device)"
    assert until == 600
    assert policy_of(document, "own", now=600.0)[0].block_all is None


@pytest.mark.parametrize(("level", "entity"), [("group", ("groups", "g")), ("subscriber", None)])
def test_group_and_site_pauses_reach_the_device(level, entity):
    document = site()
    target = document if entity is None else document[entity[0]][entity[1]]
    target["paused_until"] = "forever"
    policy, until = policy_of(document, "grouped", now=0.0)
    assert policy.block_all.reason == f"paused ({level})"
    assert until == MAX_VALIDITY  # forever: made again hourly, still paused


def test_forever_is_infinite():
    document = site()
    document["devices"]["loose"]["paused_until"] = "forever"
    assert parse_site(document, CATALOG).devices["loose"].paused_until == math.inf


BEDTIME = {"name": "bedtime", "days": ["mon"], "from": "21:00", "to": "07:00", "block": "all"}
HOMEWORK = {"name": "homework", "days": ["mon", "tue"], "from": "16:00", "to": "18:00", "block": ["hacking"]}


def scheduled(*schedules: dict) -> dict:
    document = site()
    document["devices"]["own"]["policy"]["schedules"] = list(schedules)
    return document


@pytest.mark.parametrize(
    ("when", "active"),
    [
        (at(2026, 11, 23, 20, 59), False),  # Monday before the window
        (at(2026, 11, 23, 21, 0), True),  # Monday 21:00
        (at(2026, 11, 23, 23, 59), True),
        (at(2026, 11, 24, 0, 0), True),  # past midnight: Tuesday morning belongs to Monday's window
        (at(2026, 11, 24, 6, 59), True),
        (at(2026, 11, 24, 7, 0), False),  # ends at 07:00
        (at(2026, 11, 24, 22, 0), False),  # Tuesday evening: not a listed day
        (at(2026, 11, 23, 6, 0), False),  # Monday morning belongs to Sunday's window: not listed
    ],
)
def test_a_window_crossing_midnight(when, active):
    policy, _ = policy_of(scheduled(BEDTIME), "own", when)
    assert (policy.block_all is not None) is active
    if active:
        assert policy.block_all.reason == "schedule bedtime"


def test_a_category_schedule_adds_categories_in_its_window():
    assert blocked(scheduled(HOMEWORK), "own", at(2026, 11, 24, 17, 0)) == ["hacking", "pornography"]
    assert blocked(scheduled(HOMEWORK), "own", at(2026, 11, 24, 18, 0)) == ["pornography"]


def next_change(document: dict, device: str, now: float) -> float:
    """Follow `until` from one recomputation to the next, as a worker does, to the first different policy."""

    def decides(policy) -> tuple:
        return policy.blocked, policy.warned, policy.block_all.reason if policy.block_all else None

    first, until = policy_of(document, device, now)
    assert now < until <= now + MAX_VALIDITY
    while True:
        policy, next_until = policy_of(document, device, until)
        if decides(policy) != decides(first):
            return until
        assert until < next_until <= until + MAX_VALIDITY
        until = next_until


def test_the_policy_changes_exactly_at_each_boundary():
    document = scheduled(BEDTIME, HOMEWORK)
    assert next_change(document, "own", at(2026, 11, 23, 12, 0)) == at(2026, 11, 23, 16, 0)  # homework
    assert next_change(document, "own", at(2026, 11, 23, 16, 0)) == at(2026, 11, 23, 18, 0)
    assert next_change(document, "own", at(2026, 11, 23, 18, 0)) == at(2026, 11, 23, 21, 0)  # bedtime
    assert next_change(document, "own", at(2026, 11, 23, 22, 0)) == at(2026, 11, 24, 7, 0)


def test_schedules_follow_the_wall_clock_across_dst():
    """Europe/London: clocks go forward on 2026-03-29 (01:00 → 02:00) and back on 2026-10-25 (02:00 → 01:00).
    A 21:00–07:00 window still ends at 07:00 local time on the mornings after."""
    spring = scheduled({**BEDTIME, "days": ["sat"]})  # Saturday 2026-03-28 21:00 → Sunday 07:00 (BST)
    end = next_change(spring, "own", at(2026, 3, 28, 22, 0))
    assert end == at(2026, 3, 29, 7, 0)
    assert end - at(2026, 3, 28, 22, 0) == 8 * 3600  # nine wall-clock hours, one of them skipped
    autumn = scheduled({**BEDTIME, "days": ["sat"]})  # Saturday 2026-10-24 21:00 → Sunday 07:00 (GMT)
    end = next_change(autumn, "own", at(2026, 10, 24, 22, 0))
    assert end - at(2026, 10, 24, 22, 0) == 10 * 3600  # one hour repeated
    assert policy_of(autumn, "own", at(2026, 10, 25, 1, 30))[0].block_all is not None


def test_a_window_in_the_skipped_hour_still_happens():
    early = {"name": "early", "days": ["sun"], "from": "01:15", "to": "01:45", "block": "all"}
    # 01:15–01:45 does not exist on 2026-03-29 in London; the boundaries still advance time.
    _, until = policy_of(scheduled(early), "own", at(2026, 3, 29, 0, 30, ZoneInfo("UTC")))
    assert until > at(2026, 3, 29, 0, 30, ZoneInfo("UTC"))


def test_allow_beats_deny_beats_category_and_covers_subdomains():
    document = site()
    document["devices"]["own"]["policy"].update(allow=["ok.example.com"], deny=["example.com"])
    policy, _ = policy_of(document, "own")
    assert policy.listed(text_to_name("ok.example.com")) is ALLOWED
    assert policy.listed(text_to_name("a.ok.example.com")) is ALLOWED
    verdict = policy.listed(text_to_name("www.example.com"))
    assert verdict.action is Action.BLOCK and verdict.reason == "denied by policy"
    assert policy.listed(text_to_name("example.org")) is None
    assert policy.listed(text_to_name("notexample.com")) is None


def test_a_block_all_schedule_beats_allow():
    document = scheduled(BEDTIME)
    document["devices"]["own"]["policy"]["allow"] = ["example.com"]
    policy, _ = policy_of(document, "own", at(2026, 11, 23, 22, 0))
    assert policy.block_all is not None  # the query path checks it before the allow list


def test_profiles_give_defaults_that_a_policy_overrides():
    guest = {"block": ["pornography", "drugs"], "web_protect": False}
    from resolver.shared.policy.model import parse_profile

    profiles = {"guest": parse_profile("guest", guest, CATALOG)}
    document = site()
    document["groups"]["g"]["policy"] = {"profile": "guest", "block": ["hate"]}
    policy, _ = policy_of(document, "grouped", profiles=profiles)
    assert CATALOG.ids(policy.blocked) == ["hate"]  # its own field wins
    assert policy.warned == 0  # the profile's web_protect: off
    document["groups"]["g"]["policy"] = {"profile": "guest"}
    assert CATALOG.ids(policy_of(document, "grouped", profiles=profiles)[0].blocked) == ["drugs", "pornography"]


def test_web_protect_off_removes_the_warnings():
    document = site()
    document["devices"]["own"]["policy"]["web_protect"] = False
    assert policy_of(document, "own")[0].warned == 0
    document["devices"]["own"]["policy"]["web_protect"] = True
    assert CATALOG.ids(policy_of(document, "own")[0].warned) == ["malware", "phishing"]


def test_clients_in_the_same_state_share_one_policy_object():
    parsed = parse_site(site(), CATALOG)
    rule = governing(parsed, parsed.devices["grouped"], {})
    other_device = governing(parsed, parsed.devices["loose"], {})
    assert MAKER.effective(rule, 1.0)[0] is MAKER.effective(rule, 2.0)[0]
    assert MAKER.effective(rule, 1.0)[0] is not MAKER.effective(other_device, 1.0)[0]


WARNING_MAKER = PolicyMaker(CATALOG, answering_from(PolicySettings()), default_policy(PolicySettings(), CATALOG))
PASS_END = at(2026, 11, 23, 12, 0)


def passed_policy(device: str, now: float, **device_fields):
    document = site("device")
    document["devices"][device].update(device_fields, passes={"phish.example": "2026-11-23T12:00:00Z"})
    parsed = parse_site(document, CATALOG)
    return WARNING_MAKER.effective(governing(parsed, parsed.devices[device], {}), now)


@pytest.mark.parametrize("device", ["own", "loose"])  # under the device's own policy, and the global default
def test_a_pass_lifts_warnings_for_its_name_until_it_ends(device):
    policy, until = passed_policy(device, PASS_END - 60)
    assert until == PASS_END  # made again when the pass ends
    assert policy.listed(text_to_name("login.phish.example")) is PASSED
    assert policy.listed(text_to_name("other.example")) is None
    assert policy.warned and policy.passed
    after, _ = passed_policy(device, PASS_END)
    assert after.listed(text_to_name("login.phish.example")) is None


def test_a_pass_does_not_lift_a_deny_or_a_pause():
    denied, _ = passed_policy("own", PASS_END - 60, policy={"deny": ["phish.example"]})
    assert denied.listed(text_to_name("phish.example")).reason == "denied by policy"
    paused, _ = passed_policy("own", PASS_END - 60, paused_until="forever")
    assert paused.block_all is not None and paused.block_all.reason == "paused (device)"


def test_a_pass_belongs_to_its_device_only():
    document = site("device")
    document["devices"]["own"]["passes"] = {"phish.example": "2026-11-23T12:00:00Z"}
    parsed = parse_site(document, CATALOG)
    other, _ = WARNING_MAKER.effective(governing(parsed, parsed.devices["grouped"], {}), PASS_END - 60)
    assert other.listed(text_to_name("phish.example")) is not PASSED
