"""The subscriber's app (`/app/` on the admin API) against a whole `bns serve` node with real Redis, in headless
Chromium with real clicks: a pause pressed in the app blocks that device's DNS within a second; schedules,
categories and allow/deny lists set in the app land in the site document; the alerts show; screenshots at a
phone's and a desktop's size are kept; the page's headers, and that no cookie opens anything."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import dns.edns
import dns.message
import dns.query
import pytest

from bench.dga import dga_names
from bench.upstream import Script, ScriptedUpstream
from tests.conftest import eventually
from tests.e2e.chromium import ARTIFACTS, Browser, chromium_binary
from tests.e2e.test_admin import ADMIN, http
from tests.e2e.test_process import node

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)"),
]
PHONE_SIZE, DESKTOP_SIZE = (390, 844), (1280, 800)
TABLET, LAPTOP, CONSOLE = "127.0.0.2", "127.0.0.3", "127.0.0.9"  # DNS clients: loopback sources of their own
ZONE = "Europe/London"
SITE = {
    "name": "The Smiths",
    "networks": ["127.0.0.0/8"],
    "mode": "device",
    "timezone": ZONE,
    "default_group": "adults",
    "groups": {"kids": {"name": "Kids"}, "adults": {"name": "Adults"}},
    "devices": {
        "tablet": {"name": "Tablet", "addresses": [TABLET], "group": "kids"},
        "laptop": {"name": "Laptop", "addresses": [LAPTOP], "group": "adults"},
    },
}


@pytest.fixture(scope="module")
def app_node(shared_redis, tmp_path_factory) -> Iterator[tuple[int, str]]:
    """One node for the module (its DNS port, its admin API); each test writes the site afresh."""
    directory = tmp_path_factory.mktemp("app-node")
    config = directory / "bns.toml"
    config.write_text(
        f'[store]\nredis = "{shared_redis.url}"\nprefix = "test-{uuid.uuid4().hex[:12]}:"\n'
        f'[lists]\ncache_dir = "{directory / "lists"}"\n[admin]\ntokens = ["{ADMIN}"]\n'
        "[activity]\nhand_over_seconds = 0.5\n"
    )
    with (
        ScriptedUpstream(script=Script(ttl=300)) as upstream,
        node(
            "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2",
            token=ADMIN,
        ) as (_process, dns_port, api),
    ):  # fmt: skip
        assert api is not None
        yield dns_port, api


@pytest.fixture
def home(app_node) -> tuple[int, str, str]:
    """The site as SITE says (no pause, no policy), and a site token for it: (DNS port, API, token)."""
    dns_port, api = app_node
    assert http(api, "PUT", "/v1/sites/home", SITE)[0] == 200
    status, issued = http(api, "POST", "/v1/sites/home/tokens", {"days": 1})
    assert status == 200
    eventually(lambda: answered(dns_port, "warm.example", TABLET) == "resolved", 2)
    return dns_port, api, issued["token"]


def answered(dns_port: int, name: str, source: str) -> str:
    """ "resolved", or the EDE text a blocked answer carries (`paused`, `denied by policy`, …)."""
    response = dns.query.udp(
        dns.message.make_query(name, "A", use_edns=0), "127.0.0.1", port=dns_port, timeout=3, source=source
    )
    texts = [option.text for option in response.options if option.otype == dns.edns.OptionType.EDE]
    return texts[0] if texts else "resolved" if response.answer else "empty"


def every_answer(dns_port: int, name: str, source: str, expected: str, tries: int = 8) -> bool:
    """`tries` queries in a row, from fresh source ports (the kernel spreads them over both workers)."""
    return all(answered(dns_port, name, source) == expected for _ in range(tries))


def within_a_second_of(clicked: float, dns_port: int, source: str, expected: str) -> float:
    """Seconds from the click until every worker answers `source` so; polled for at most 1 s."""
    while not every_answer(dns_port, f"q{uuid.uuid4().hex[:6]}.example", source, expected, tries=6):
        assert time.monotonic() - clicked < 1.0, f"{source} was not answered {expected!r} within 1 s of the click"
        time.sleep(0.02)
    took = time.monotonic() - clicked
    assert took <= 1.0, f"{source} answered {expected!r} only {took:.2f} s after the click"
    return took


def browser_for(tmp_path: Path) -> Browser:
    return Browser({"app.invalid": "127.0.0.1"}, tmp_path / "chromium")


async def sign_in(browser: Browser, api: str, token: str, size: tuple[int, int], mobile: bool) -> None:
    """Open the sign-in link as the subscriber would, at that size; wait until the site is shown."""
    await browser.viewport(*size, mobile=mobile)
    await browser.open("about:blank")  # a load of its own, even where the app is open (only the fragment differs)
    await browser.open(f"{api}/app/#token={token}")
    await browser.wait_for(
        "document.querySelector('#site-name').textContent === 'The Smiths' && !document.body.hasAttribute('aria-busy')"
    )


async def tab(browser: Browser, name: str) -> None:
    await browser.press(f'#tabs button[data-tab="{name}"]')
    await browser.wait_for(f"!document.querySelector('#view-{name}').hidden")


async def shot(browser: Browser, size: tuple[int, int], view: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"app-{size[0]}x{size[1]}-{view}.png"
    await browser.screenshot(path)
    return path


def site(api: str) -> dict:
    status, document = http(api, "GET", "/v1/sites/home")
    assert status == 200
    return document


# --- pausing --------------------------------------------------------------------------------------------------


def test_a_pause_pressed_in_the_app_blocks_the_device_within_a_second(tmp_path, home):
    dns_port, api, token = home
    assert answered(dns_port, "fine.example", TABLET) == "resolved"

    async def use_the_app() -> dict[str, object]:
        seen: dict[str, object] = {}
        async with browser_for(tmp_path) as browser:
            await sign_in(browser, api, token, PHONE_SIZE, mobile=True)
            # The token left the address bar for sessionStorage, and nothing was put in a cookie.
            seen["address"] = await browser.evaluate("location.href")
            seen["stored"] = await browser.evaluate("sessionStorage.getItem('bns.site-token')")
            seen["cookies"] = (await browser.send("Network.getAllCookies"))["cookies"]

            await tab(browser, "groups")
            await browser.press('[data-group="kids"] .member[data-device="tablet"]')
            await browser.wait_for("document.querySelector('#device-dialog').open")
            clicked = await browser.press('#device-dialog button[data-pause="30"]')
            seen["paused_after"] = within_a_second_of(clicked, dns_port, TABLET, "paused")
            assert every_answer(dns_port, "other.example", LAPTOP, "resolved")  # the laptop is not paused
            seen["badge"] = await browser.wait_for(
                "(document.querySelector('#device-dialog .badge.paused') || {}).textContent"
            )
            await shot(browser, PHONE_SIZE, "device-paused")

            clicked = await browser.press("#device-dialog button[data-unpause]")
            seen["resumed_after"] = within_a_second_of(clicked, dns_port, TABLET, "resolved")
            await browser.wait_for("!document.querySelector('#device-dialog button[data-unpause]')")
            await browser.press("#device-close")

            # A whole group, indefinitely; then resumed.
            clicked = await browser.press('[data-group="kids"] button[data-pause="forever"]')
            seen["group_paused_after"] = within_a_second_of(clicked, dns_port, TABLET, "paused")
            assert every_answer(dns_port, "other.example", LAPTOP, "resolved")
            seen["group_badge"] = await browser.wait_for(
                "(document.querySelector('[data-group=\"kids\"] .member .badge.paused') || {}).textContent"
            )
            clicked = await browser.press('[data-group="kids"] button[data-unpause]')
            seen["group_resumed_after"] = within_a_second_of(clicked, dns_port, TABLET, "resolved")

            # "Until 07:00" on the network's clock, for the other group.
            await browser.press('[data-group="adults"] button[data-pause="morning"]')
            await browser.wait_for("document.querySelector('[data-group=\"adults\"] button[data-unpause]')")
        return seen

    seen = asyncio.run(use_the_app())
    assert seen["address"] == f"{api}/app/" and seen["stored"] == token and seen["cookies"] == []
    assert str(seen["badge"]).startswith("Paused until") and seen["group_badge"] == "Paused until resumed (group Kids)"
    print(f"blocked {seen['paused_after']:.2f} s after the click, open again {seen['resumed_after']:.2f} s after")
    document = site(api)
    assert document["devices"]["tablet"]["paused_until"] is None and document["groups"]["kids"]["paused_until"] is None
    until = datetime.fromisoformat(document["groups"]["adults"]["paused_until"].replace("Z", "+00:00"))
    local = until.astimezone(ZoneInfo(ZONE))
    assert (local.hour, local.minute) == (7, 0) and timedelta(0) < until - datetime.now(until.tzinfo) <= timedelta(
        hours=24
    )
    eventually(lambda: every_answer(dns_port, "late.example", LAPTOP, "paused"), 1)  # the adults' pause


def test_the_devices_list_shows_who_is_online_and_pauses_and_names_from_it(tmp_path, home):
    dns_port, api, token = home
    assert answered(dns_port, "seen.example", TABLET) == "resolved"
    assert answered(dns_port, "seen.example", CONSOLE) == "resolved"  # a device nobody configured

    def listed() -> bool:  # workers hand their counts over every few seconds
        records = http(api, "GET", "/v1/sites/home/devices")[1]["devices"]
        return {"tablet", None} <= {record["device"] for record in records if record["online"]}

    eventually(listed, 20)

    async def use_the_app() -> dict[str, object]:
        seen: dict[str, object] = {}
        async with browser_for(tmp_path) as browser:
            await sign_in(browser, api, token, PHONE_SIZE, mobile=True)
            row = '#device-list button[data-device="tablet"]'
            await browser.wait_for(f"document.querySelector('{row} .dot.on')", 5)
            seen["row"] = await browser.evaluate(f"document.querySelector('{row}').innerText")
            await shot(browser, PHONE_SIZE, "devices")
            await browser.press(row)
            await browser.wait_for("document.querySelector('#device-dialog').open")
            clicked = await browser.press('#device-dialog button[data-pause="60"]')
            seen["paused_after"] = within_a_second_of(clicked, dns_port, TABLET, "paused")
            clicked = await browser.press("#device-dialog button[data-unpause]")
            within_a_second_of(clicked, dns_port, TABLET, "resolved")
            await browser.press("#device-close")

            # The console: listed by its address, named and put in a group from the app.
            console = f"#device-list button[data-key]:not([data-device])[data-key*='{CONSOLE}']"
            await browser.wait_for(f'document.querySelector("{console}")', 5)
            await browser.press(console)
            await browser.type_text("#device-name", "Games console")
            await browser.press('#device-form input[name="device-group"][value="kids"]')
            await browser.press("#device-form button[type=submit]")
            await browser.wait_for("document.querySelector('#notice').textContent === 'Saved Games console.'")
            await browser.press("#device-close")
            await browser.viewport(*DESKTOP_SIZE)
            await shot(browser, DESKTOP_SIZE, "devices")
        return seen

    seen = asyncio.run(use_the_app())
    assert "Tablet" in str(seen["row"]) and "Kids" in str(seen["row"])
    named = [device for device in site(api)["devices"].values() if device["name"] == "Games console"]
    assert len(named) == 1 and named[0]["group"] == "kids"


def test_a_devices_activity_shows_its_hours_and_what_was_blocked(tmp_path, home):
    dns_port, api, token = home
    assert http(api, "PUT", "/v1/sites/home/devices/tablet/policy", {"deny": ["games.example"]})[0] == 200
    eventually(lambda: answered(dns_port, "games.example", TABLET) == "blocked: denied by policy", 2)
    for name in ("a.example", "b.example", "games.example", "www.games.example"):
        answered(dns_port, name, TABLET)

    def counted() -> bool:  # workers hand their counts over every few seconds
        activity = http(api, "GET", "/v1/sites/home/activity")[1]
        return any(entry["name"] == "games.example" for entry in activity["top_blocked"])

    eventually(counted, 20)

    async def use_the_app() -> tuple[str, str]:
        async with browser_for(tmp_path) as browser:
            await sign_in(browser, api, token, PHONE_SIZE, mobile=True)
            await browser.wait_for("document.querySelector('#device-list button[data-device=\"tablet\"]')")
            await browser.press('#device-list button[data-device="tablet"]')
            await browser.wait_for("document.querySelector('#device-dialog').open")
            await browser.press('#device-dialog button[data-action="device-activity"]')
            await browser.wait_for("document.querySelector('#activity-body .totals')", 5)
            chosen = await browser.evaluate("document.querySelector('#activity-device').selectedOptions[0].text")
            assert chosen == "Tablet"
            totals = await browser.evaluate("document.querySelector('#activity-body .totals').innerText")
            top = await browser.evaluate("(document.querySelector('#activity-body .top-list') || {}).innerText")
            await shot(browser, PHONE_SIZE, "activity")
            return totals, top

    totals, top = asyncio.run(use_the_app())
    assert re.search(r"[1-9]\d* queries, [1-9]\d* blocked", totals), totals
    assert "games.example" in top


def test_without_a_good_link_the_app_asks_for_one(tmp_path, home):
    _dns_port, api, token = home
    payload, _, mac = token.rpartition(".")

    async def use_the_app() -> dict[str, str]:
        seen = {}
        async with browser_for(tmp_path) as browser:
            await browser.viewport(*PHONE_SIZE, mobile=True)
            await browser.open(f"{api}/app/")
            seen["none"] = await browser.wait_for("!document.querySelector('#login').hidden && document.body.innerText")
            await shot(browser, PHONE_SIZE, "sign-in")
            # A link with a signature the server refuses, opened where the app is open (the fragment changes).
            await browser.send("Page.navigate", url=f"{api}/app/#token={payload}.{mac[::-1]}")
            # The app signs in with it, the API refuses it (401), the app asks again: wait for that last state.
            seen["forged"] = await browser.wait_for(
                "!document.querySelector('#login').hidden && document.querySelector('#login-reason').textContent"
                ".includes('no longer valid') && document.querySelector('#login-reason').textContent"
            )
            seen["stored"] = await browser.evaluate("String(sessionStorage.getItem('bns.site-token'))")
            await browser.type_text("#login-link", f"{api}/app/#token={token}")  # the link pasted
            await browser.press("#login-form button[type=submit]")
            seen["site"] = await browser.wait_for("document.querySelector('#site-name').textContent === 'The Smiths'")
        return seen

    seen = asyncio.run(use_the_app())
    assert "Open the sign-in link your provider sent you" in seen["none"] and "Tablet" not in seen["none"]
    assert seen["forged"] == "Your sign-in link is no longer valid. Ask for a new one." and seen["stored"] == "null"
    assert seen["site"] is True


# --- rules ----------------------------------------------------------------------------------------------------


async def open_group_rules(browser: Browser, group: str) -> None:
    await tab(browser, "groups")
    await browser.press(f'[data-group="{group}"] button[data-action="rules"]')
    await browser.wait_for("!document.querySelector('#view-rules').hidden")


async def type_time(browser: Browser, label: str, time_of_day: str) -> None:
    """Press a time field's label (its hours take the focus) and type the time as Chromium's time field takes
    it in its default en-US locale: hours on a 12-hour clock, minutes, then A or P."""
    hours, minutes = map(int, time_of_day.split(":"))
    await browser.press(label)
    await browser.keys(f"{(hours + 11) % 12 + 1:02d}{minutes:02d}{'AP'[hours >= 12]}")


def test_a_bedtime_schedule_set_in_the_app_is_in_the_site_document(tmp_path, home):
    _dns_port, api, token = home

    async def use_the_app() -> str:
        async with browser_for(tmp_path) as browser:
            await sign_in(browser, api, token, DESKTOP_SIZE, mobile=False)
            await open_group_rules(browser, "kids")
            await browser.press("#add-schedule")
            editor = "#rules-schedules .schedule:last-child"
            await browser.type_text(f"{editor} .schedule-name", "School nights")
            await browser.press(f'{editor} input[value="thu"]')  # Sun–Thu offered: Thursday off,
            await browser.press(f'{editor} input[value="fri"]')  # Friday on
            await type_time(browser, f"{editor} label[for$='-from']", "20:30")
            await type_time(browser, f"{editor} label[for$='-to']", "06:45")
            await browser.press("#rules-save")
            await browser.wait_for("document.querySelector('#notice').textContent === 'Saved the rules for Kids.'")
            await shot(browser, DESKTOP_SIZE, "rules")
            # A second schedule, for homework: chosen categories only.
            await browser.press("#add-schedule")
            await browser.type_text(f"{editor} .schedule-name", "Homework")
            for day in ("sun", "mon", "tue", "wed", "thu"):
                await browser.press(f'{editor} input[value="{day}"]')
            await browser.press(f'{editor} input[value="sat"]')
            await type_time(browser, f"{editor} label[for$='-from']", "16:00")
            await type_time(browser, f"{editor} label[for$='-to']", "18:00")
            await browser.press(f'{editor} input[type="radio"][value="categories"]')
            await browser.press(f'{editor} .schedule-categories input[value="hacking"]')
            await browser.press("#rules-save")
            eventually(lambda: len(site(api)["groups"]["kids"]["policy"]["schedules"]) == 2, 3)
            await browser.wait_for("document.querySelector('#notice').textContent === 'Saved the rules for Kids.'")
            return await browser.evaluate("document.querySelector('#rules-schedules').innerText")

    shown = asyncio.run(use_the_app())
    assert "School nights" in shown and "Homework" in shown
    assert site(api)["groups"]["kids"]["policy"]["schedules"] == [
        {"name": "School nights", "days": ["mon", "tue", "wed", "fri", "sun"], "from": "20:30", "to": "06:45",
         "block": "all"},
        {"name": "Homework", "days": ["sat"], "from": "16:00", "to": "18:00", "block": ["hacking"]},
    ]  # fmt: skip


def test_a_schedule_in_force_shows_on_the_group_and_its_devices(tmp_path, home):
    dns_port, api, token = home
    now = datetime.now(ZoneInfo(ZONE))
    start, end = now - timedelta(hours=1), now + timedelta(hours=1)
    schedule = {"name": "Quiet", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "block": "all"}
    schedule |= {"from": start.strftime("%H:%M"), "to": end.strftime("%H:%M")}
    assert http(api, "PUT", "/v1/sites/home/groups/kids/policy", {"schedules": [schedule]})[0] == 200
    eventually(lambda: every_answer(dns_port, "x.example", TABLET, "schedule Quiet"), 2)

    async def use_the_app() -> tuple[str, str | None, str]:
        async with browser_for(tmp_path) as browser:
            await sign_in(browser, api, token, PHONE_SIZE, mobile=True)
            await tab(browser, "groups")
            group = await browser.wait_for(
                "(document.querySelector('[data-group=\"kids\"] .pause-state') || {}).innerText"
            )
            until = await browser.evaluate(
                "document.querySelector('[data-group=\"kids\"] .pause-state .badge').dataset.until"
            )
            member = await browser.evaluate("document.querySelector('[data-device=\"tablet\"] .badge').className")
            return group, until, member

    group, until, member = asyncio.run(use_the_app())
    assert group.startswith("Quiet: everything blocked until ") and member == "badge schedule"
    assert until == end.replace(second=0, microsecond=0).astimezone(UTC).isoformat().replace("+00:00", "Z")


PHONE, TV = "127.0.0.4", "127.0.0.5"


def test_the_app_shows_the_servers_status_of_every_device_and_group(tmp_path, home):
    """Issue 19: a device in no group, in a site with no default group, crashed the app (its row and every row
    after it missing), and the app's own copy of the precedence rules disagreed with the resolver's. Here a
    group is paused, a schedule from a profile is in force, one device is in no group: every device the API
    lists is a row, and every badge says what the server's status says, which is what DNS answers."""
    dns_port, api, token = home
    now = datetime.now(ZoneInfo(ZONE))
    start, end = now - timedelta(hours=1), now + timedelta(hours=1)
    quiet = {"name": "Quiet", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "block": "all"}
    quiet |= {"from": start.strftime("%H:%M"), "to": end.strftime("%H:%M")}
    profile = f"evening-{uuid.uuid4().hex[:6]}"
    assert http(api, "PUT", f"/v1/profiles/{profile}", {"schedules": [quiet]})[0] == 200
    document = {
        **SITE,
        "default_group": None,
        "groups": {
            "kids": {"name": "Kids", "paused_until": "forever"},
            "adults": {"name": "Adults"},
            "teens": {"name": "Teens", "policy": {"profile": profile}},
        },
        "devices": {
            "tablet": {"name": "Tablet", "addresses": [TABLET], "group": "kids"},
            "laptop": {"name": "Laptop", "addresses": [LAPTOP], "group": "adults"},
            "phone": {"name": "Phone", "addresses": [PHONE], "group": "teens"},
            "tv": {"name": "TV", "addresses": [TV]},  # as `bns device set home tv --mac …` makes it: no group
        },
    }
    assert http(api, "PUT", "/v1/sites/home", document)[0] == 200
    for source, expected in ((PHONE, "schedule Quiet"), (TABLET, "paused"), (TV, "resolved"), (LAPTOP, "resolved")):
        eventually(lambda source=source, expected=expected: every_answer(dns_port, "x.example", source, expected), 2)

    def keys() -> list[str]:
        return sorted(entry["key"] for entry in http(api, "GET", "/v1/sites/home/devices", token=token)[1]["devices"])

    # Every device has asked, and been seen (the workers hand their counts over every 0.5 s): the list the app
    # shows and the one compared with it below are the same list.
    asked = {f"ip:{address}" for address in (TABLET, LAPTOP, PHONE, TV)}
    eventually(lambda: asked <= set(keys()) and not any(key.startswith("device:") for key in keys()), 5)
    status = http(api, "GET", "/v1/sites/home/status", token=token)[1]
    assert (status["devices"]["tv"]["group"], status["devices"]["tv"]["membership"]) == (None, "none")
    assert (status["devices"]["phone"]["state"], status["devices"]["phone"]["profile"]) == ("scheduled", profile)

    async def use_the_app() -> dict[str, object]:
        async with browser_for(tmp_path) as browser:
            await sign_in(browser, api, token, PHONE_SIZE, mobile=True)
            seen: dict[str, object] = {
                "summary": await browser.evaluate("document.querySelector('#devices-summary').textContent"),
                "rows": await browser.evaluate(
                    "[...document.querySelectorAll('#device-list button[data-key]')].map((row) => [row.dataset.key,"
                    " row.querySelector('.badge').dataset.state, row.querySelector('.badge').dataset.until || null])"
                ),
            }
            await tab(browser, "groups")
            seen["groups"] = await browser.evaluate(
                "Object.fromEntries([...document.querySelectorAll('#group-list [data-group]')].map((card) =>"
                " [card.dataset.group, [(card.querySelector('.pause-state .badge') || {dataset: {}}).dataset.state,"
                " [...card.querySelectorAll('.member')].map((member) => [member.dataset.device,"
                " member.querySelector('.badge').dataset.state])]]))"
            )
            seen["site"] = await browser.evaluate("document.querySelector('[data-site] .badge').dataset.state")
            seen["kids"] = await browser.evaluate("document.querySelector('[data-group=\"kids\"] .badge').innerText")
            seen["problems"] = (await browser.evaluate(A11Y))["problems"]  # long statuses fit a phone's width
            # and nothing widens the page past it (a phone would zoom out, and taps land off their targets)
            seen["width"] = await browser.evaluate("document.documentElement.scrollWidth")
            await shot(browser, PHONE_SIZE, "groups-status")
            await browser.press('[data-group=""] .member[data-device="tv"]')
            await browser.wait_for("document.querySelector('#device-dialog').open")
            seen["tv"] = await browser.evaluate("document.querySelector('#device-body .facts').innerText")
            await browser.press("#device-close")
            await browser.press('[data-group="teens"] .member[data-device="phone"]')
            await browser.wait_for("document.querySelector('#device-dialog').open")
            seen["phone"] = await browser.evaluate("document.querySelector('#device-body').innerText")
        return seen

    seen = asyncio.run(use_the_app())
    listed = http(api, "GET", "/v1/sites/home/devices", token=token)[1]["devices"]
    # Every device the API lists is a row, and the header counts them all.
    assert sorted(key for key, _state, _until in seen["rows"]) == sorted(entry["key"] for entry in listed)
    assert str(seen["summary"]).startswith(f"{len(listed)} devices,"), seen["summary"]
    # Each badge is the server's status.
    assert {key: (state, until) for key, state, until in seen["rows"]} == {
        entry["key"]: (entry["effective"]["state"], entry["effective"]["until"]) for entry in listed
    }
    groups = status["groups"]
    assert seen["groups"] == {
        "kids": [groups["kids"]["state"], [["tablet", "paused"]]],
        "adults": [groups["adults"]["state"], [["laptop", "ok"]]],
        "teens": [groups["teens"]["state"], [["phone", "scheduled"]]],
        "": [None, [["tv", "ok"]]],  # "Not in a group"
    }
    assert (groups["kids"]["state"], groups["adults"]["state"], groups["teens"]["state"]) == (
        "paused",
        "ok",
        "scheduled",
    )
    assert seen["problems"] == [] and seen["width"] == PHONE_SIZE[0]
    assert seen["site"] == status["site"]["state"] == "ok" and seen["kids"] == "Paused until resumed"
    assert "Group\nNone" in str(seen["tv"]) and "The default rules" in str(seen["tv"])
    assert f"Its group's rules (profile {profile})" in str(seen["phone"]), seen["phone"]
    assert "Quiet: everything blocked until" in str(seen["phone"])


def test_categories_and_allow_deny_set_in_the_app_reach_the_api_and_the_answers(tmp_path, home):
    dns_port, api, token = home

    async def use_the_app() -> tuple[str, str]:
        async with browser_for(tmp_path) as browser:
            await sign_in(browser, api, token, PHONE_SIZE, mobile=True)
            await tab(browser, "groups")
            await browser.press('[data-group="kids"] .member[data-device="tablet"]')
            await browser.wait_for("document.querySelector('#device-dialog').open")
            await browser.press('#device-dialog button[data-action="device-rules"]')
            await browser.wait_for("document.querySelector('#rules-title').textContent === 'Rules for Tablet'")
            note = await browser.evaluate("document.querySelector('#rules-note').textContent")
            await browser.press('#rules-categories input[value="drugs"]')  # on by default: off
            await browser.press('#rules-categories input[value="malware"]')  # a warning by default: blocked
            await browser.press("#rules-safe-search")
            await browser.press("#rules-canaries")  # on by default: off
            await browser.type_text("#rules-deny", "games.example\nbad..name")
            await browser.type_text("#rules-allow", "school.example")
            await browser.press("#rules-save")
            error = await browser.wait_for(
                "!document.querySelector('#rules-error').hidden && document.querySelector('#rules-error').textContent"
            )
            await shot(browser, PHONE_SIZE, "rules-refused")
            await browser.type_text("#rules-deny", "games.example")
            await browser.press("#rules-save")
            await browser.wait_for("document.querySelector('#notice').textContent === 'Saved the rules for Tablet.'")
            return note, error

    note, error = asyncio.run(use_the_app())
    assert note == "This device follows the default rules. Saving gives it rules of its own."  # Kids has none
    assert error.startswith("Always block: ")  # the server's reason, shown next to the form
    policy = site(api)["devices"]["tablet"]["policy"]
    content = ["criminal-skills", "hacking", "hate", "pornography", "self-harm-suicide", "violence-gore", "weapons"]
    assert sorted(policy["block"]) == sorted([*content, "encrypted-dns", "malware"])
    assert (policy["deny"], policy["allow"], policy["safe_search"], policy["web_protect"], policy["canaries"]) == (
        ["games.example"],
        ["school.example"],
        True,
        True,
        False,
    )
    eventually(lambda: every_answer(dns_port, "www.games.example", TABLET, "blocked: denied by policy"), 2)
    assert every_answer(dns_port, "www.games.example", LAPTOP, "resolved")
    assert every_answer(dns_port, "use-application-dns.net", TABLET, "resolved")  # its rules turned them off
    assert every_answer(dns_port, "use-application-dns.net", LAPTOP, "blocked: this network filters DNS")


# --- alerts, screenshots, accessibility ----------------------------------------------------------------------

A11Y = (Path(__file__).with_name("a11y.js")).read_text()  # labels, button names, contrast, width


def test_the_alerts_and_every_view_at_a_phones_and_a_desktops_size(tmp_path, home):
    dns_port, api, token = home
    names = dga_names()["necurs"][:6]
    for name in names:  # machine-made names from the tablet: alerts
        answered(dns_port, name, TABLET)

    def alerted() -> bool:
        return len(http(api, "GET", "/v1/sites/home/alerts")[1]["alerts"]) >= 5  # type: ignore[index]

    eventually(alerted, 20)

    async def use_the_app() -> dict[str, object]:
        seen: dict[str, object] = {"problems": {}, "shots": []}
        async with browser_for(tmp_path) as browser:
            for size, mobile in ((PHONE_SIZE, True), (DESKTOP_SIZE, False)):
                await sign_in(browser, api, token, size, mobile)

                async def look(view: str, size: tuple[int, int] = size) -> None:
                    result = await browser.evaluate(A11Y)
                    assert result["checked"] > 3
                    if result["problems"]:
                        seen["problems"][f"{size} {view}"] = result["problems"]  # type: ignore[index]
                    seen["shots"].append(await shot(browser, size, view))  # type: ignore[attr-defined]

                await browser.wait_for("document.querySelectorAll('#device-list li').length >= 2")
                await look("devices")
                await tab(browser, "groups")
                await look("groups")
                await browser.press('[data-group="kids"] .member[data-device="tablet"]')
                await browser.wait_for("document.querySelector('#device-dialog').open")
                await look("device")
                await browser.press("#device-close")
                await browser.press('[data-group="kids"] button[data-action="rules"]')
                await browser.evaluate("window.scrollTo(0, 0)")
                await look("rules")
                await browser.press("#add-schedule")  # scrolled to, as a finger would
                await browser.evaluate(
                    "document.querySelector('#rules-schedules .schedule').scrollIntoView({block: 'start'})"
                )
                await look("schedule")
                await tab(browser, "alerts")
                await browser.wait_for("document.querySelectorAll('#alert-list li.alert').length >= 5")
                seen[f"alerts {size}"] = await browser.evaluate("document.querySelector('#alert-list').innerText")
                await look("alerts")
                # The keyboard's focus is drawn: Tab onto the first control.
                await browser.send(
                    "Input.dispatchKeyEvent", type="keyDown", key="Tab", code="Tab", windowsVirtualKeyCode=9
                )
                await browser.send(
                    "Input.dispatchKeyEvent", type="keyUp", key="Tab", code="Tab", windowsVirtualKeyCode=9
                )
                seen[f"focus {size}"] = await browser.evaluate(
                    "(() => { const s = getComputedStyle(document.activeElement);"
                    " return [document.activeElement.tagName, s.outlineStyle, parseFloat(s.outlineWidth)]; })()"
                )
        return seen

    seen = asyncio.run(use_the_app())
    assert seen["problems"] == {}
    for size in (PHONE_SIZE, DESKTOP_SIZE):
        assert "Machine-made name" in seen[f"alerts {size}"] and any(name in seen[f"alerts {size}"] for name in names)
        tag, style, width = seen[f"focus {size}"]
        assert tag == "BUTTON" and style == "solid" and width >= 2
    print("screenshots:", *seen["shots"], sep="\n  ")


# --- HTTP: headers, cookies, other sites ----------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def get(api: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(api)
    connection = HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_the_app_is_served_with_strict_headers_and_no_inline_code(home):
    _dns_port, api, _token = home
    status, headers, body = get(api, "/app/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"
    parser = _Tags()
    parser.feed(body.decode())
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts == [{"src": "app.js", "defer": None}]  # no inline script, nothing from another host
    assert b"<style" not in body and b" style=" not in body and not re.search(rb"(https?:)?//", body)  # nor a CDN
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("icon.svg", "image/svg+xml")):
        status, headers, _ = get(api, f"/app/{name}")
        assert status == 200 and headers["content-type"].startswith(kind) and "content-security-policy" in headers
    assert get(api, "/app")[:2][0] == 308 and get(api, "/app")[1]["location"] == "/app/"
    assert get(api, "/app/index.html")[1]["cache-control"] == "no-store"
    for path in ("/app/nothing.js", "/app/%2e%2e/api.py", "/app/..%2fapi.py", "/app/app_files/app.js"):
        assert get(api, path)[0] == 404, path


def test_no_route_needs_or_takes_a_cookie_and_a_token_opens_its_own_site_only(home):
    _dns_port, api, token = home
    assert http(api, "PUT", "/v1/sites/other", {"networks": [], "mode": "device"})[0] == 200
    other = http(api, "POST", "/v1/sites/other/tokens", {"days": 1})[1]["token"]

    # No response of the app or the API sets a cookie; the app loads with none.
    for path in ("/app/", "/app/app.js", "/app/app.css", "/app"):
        status, headers, _ = get(api, path)
        assert status in (200, 308) and "set-cookie" not in headers
    for path in ("/v1/sites/home", "/v1/categories"):
        status, headers, _ = get(api, path, Authorization=f"Bearer {token}")
        assert status == 200 and "set-cookie" not in headers and "access-control-allow-origin" not in headers
        # The token in a cookie (as a forged cross-site request would carry one) opens nothing.
        for cookie in (f"token={token}", f"Authorization=Bearer {token}", f"bns.site-token={token}"):
            assert get(api, path, Cookie=cookie, Origin="http://evil.example")[0] == 401
    request = urllib.request.Request(
        api + "/v1/sites/home/pause", data=b'{"until": "forever"}', method="POST", headers={"Cookie": f"token={token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401 and site(api)["paused_until"] is None

    # Another site's token: 403 on every route of this site the app uses.
    for method, path, body in (
        ("GET", "/v1/sites/home", None),
        ("GET", "/v1/sites/home/alerts", None),
        ("POST", "/v1/sites/home/devices/tablet/pause", {"minutes": 30}),
        ("POST", "/v1/sites/home/groups/kids/unpause", {}),
        ("PUT", "/v1/sites/home/groups/kids/policy", {"deny": ["x.example"]}),
        ("PUT", "/v1/sites/home/devices/tablet", {"name": "Mine now"}),
    ):
        status, answer = http(api, method, path, body, token=other)
        assert status == 403 and "another site" in json.dumps(answer), (method, path, status)
    assert http(api, "GET", "/v1/sites/other", token=other)[0] == 200
    assert site(api)["devices"]["tablet"]["name"] == "Tablet"
