"""List feeds on real nodes: an operator's ads category fed by URL is blocked by every node of a fleet and offered
in the subscriber's app; through 500s and a body cut short the nodes keep blocking from the last good copy; when
the node fetching the feeds stops, another takes over and the fleet stays current."""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.admin.feed_server import FeedServer, Script, names
from tests.conftest import eventually
from tests.e2e.test_admin import READ, cli, every_worker, http, node_config, start
from tests.e2e.test_app import LAPTOP, PHONE_SIZE, SITE, TABLET, answered, browser_for, sign_in, tab

pytestmark = pytest.mark.e2e

ADS_CATALOG = """format = 1
extends = "packaged"

[[category]]
id = "ads"
bit = 32
title = "Ads & trackers"
description = "Advertising and tracking servers."
action = "block"
"""


@pytest.fixture
def feed_server():
    server = FeedServer()
    yield server
    server.close()


def fleet_config(tmp_path: Path, node: str, store: str) -> Path:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(ADS_CATALOG)
    config = node_config(
        tmp_path / node / "bns.toml",
        f'{store}\n[feeds]\nallow = ["127.0.0.0/8"]\ncheck_interval = 1.0\ntimeout = 2.0\n',
    )
    text = config.read_text().replace("[lists]\n", f'[lists]\ncatalog = "{catalog}"\n', 1)
    config.write_text(text)
    return config


def feeds_of(api: str) -> list[dict[str, object]]:
    listed = cli(api, "lists", "feed", "list", "--json", token=READ)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def leading(api: str) -> bool:
    _status, text = http(api, "GET", "/metrics")
    return "bns_feeds_leading 1" in str(text)


def test_a_fleet_keeps_an_ads_feed_current_through_faults_and_the_loss_of_its_fetching_node(
    tmp_path, upstream, shared_redis, redis_prefix, feed_server
):
    store = f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"'
    feed_server.scripts["/ads.txt"] = Script(b"# an ads list\n" + names("ad", 200))
    with ExitStack() as first_node, ExitStack() as second_node:
        port_a, api_a = start(first_node, fleet_config(tmp_path, "a", store), upstream)
        port_b, api_b = start(second_node, fleet_config(tmp_path, "b", store), upstream)

        # The operator's own category is offered to subscribers (the app lists /v1/categories).
        _status, categories = http(api_b, "GET", "/v1/categories", token=READ)
        assert {"id": "ads", "title": "Ads & trackers"}.items() <= next(
            c for c in categories if c["id"] == "ads"
        ).items()  # type: ignore[union-attr]

        added = cli(api_a, "lists", "feed", "add", "ads", feed_server.url("/ads.txt"), "--interval", "10", "--json")
        assert added.returncode == 0, added.stderr
        feed_id = json.loads(added.stdout)["id"]
        for port in (port_a, port_b):
            eventually(lambda port=port: every_worker(port, "ad7.example", "blocked: ads"), 10)

        # A 500, then a body cut short: every node keeps blocking from the last good copy, and the API says why.
        for fault, reason in ((Script(status=500), "HTTP 500"), (Script(names("ad", 400), cut=True), "ended")):
            feed_server.scripts["/ads.txt"] = fault
            failed = cli(api_b, "lists", "feed", "refresh", feed_id, "--wait", "10")
            assert failed.returncode != 0 and reason in failed.stderr, failed.stderr
            (feed,) = feeds_of(api_a)
            assert reason in str(feed["error"]) and feed["entries"] == 200
            assert all(every_worker(port, "ad199.example", "blocked: ads") for port in (port_a, port_b))

        # The node that fetches stops; the other takes the lease within a check interval and the list that grew
        # reaches it.
        fetching, other_port, other_api = (
            (first_node, port_b, api_b) if leading(api_a) else (second_node, port_a, api_a)
        )
        fetching.close()
        eventually(lambda: leading(other_api), 3)
        feed_server.scripts["/ads.txt"] = Script(names("ad", 400))
        refreshed = cli(other_api, "lists", "feed", "refresh", feed_id, "--wait", "10", "--json")
        assert refreshed.returncode == 0, refreshed.stderr
        assert json.loads(refreshed.stdout)["entries"] == 400
        eventually(lambda: every_worker(other_port, "ad399.example", "blocked: ads"), 10)
        assert every_worker(other_port, "ad1.example", "blocked: ads")
        (feed,) = feeds_of(other_api)
        assert feed["error"] == "" and feed["published"] and not feed["stale"]


def test_the_subscribers_app_offers_the_operators_own_category_and_its_choice_reaches_the_answers(
    tmp_path, upstream, feed_server
):
    """Issue 21's end: an ads category of the operator's, fed by URL, is a choice in the app like the packaged ones;
    turned off for one device there, its names resolve for that device and stay blocked for the others."""
    feed_server.scripts["/ads.txt"] = Script(names("ad", 50))
    store = f'[store]\nfile = "{tmp_path / "policies.json"}"'
    with ExitStack() as stack:
        port, api = start(stack, fleet_config(tmp_path, "n", store), upstream)
        added = cli(api, "lists", "feed", "add", "ads", feed_server.url("/ads.txt"), "--interval", "3600")
        assert added.returncode == 0, added.stderr
        assert http(api, "PUT", "/v1/sites/home", SITE)[0] == 200
        _status, issued = http(api, "POST", "/v1/sites/home/tokens", {"days": 1})
        eventually(lambda: answered(port, "ad3.example", TABLET) == "blocked: ads", 10)

        async def turn_ads_off_for_the_tablet() -> tuple[str, bool]:
            async with browser_for(tmp_path) as browser:
                await sign_in(browser, api, issued["token"], PHONE_SIZE, mobile=True)
                await tab(browser, "groups")
                await browser.press('[data-group="kids"] .member[data-device="tablet"]')
                await browser.wait_for("document.querySelector('#device-dialog').open")
                await browser.press('#device-dialog button[data-action="device-rules"]')
                await browser.wait_for("document.querySelector('#rules-title').textContent === 'Rules for Tablet'")
                ads = "document.querySelector('#rules-categories input[value=\"ads\"]')"
                label = await browser.evaluate(f"{ads}.closest('label').textContent")
                checked = await browser.evaluate(f"{ads}.checked")
                await browser.press('#rules-categories input[value="ads"]')
                await browser.press("#rules-save")
                await browser.wait_for(
                    "document.querySelector('#notice').textContent === 'Saved the rules for Tablet.'"
                )
                return label, checked

        label, checked = asyncio.run(turn_ads_off_for_the_tablet())
        assert "Ads & trackers" in label and "Advertising and tracking servers." in label
        assert checked  # `action = "block"`: in the default policy, as the packaged Content Control categories
        _status, document = http(api, "GET", "/v1/sites/home")
        block = document["devices"]["tablet"]["policy"]["block"]  # type: ignore[index]
        assert "ads" not in block and "pornography" in block
        eventually(lambda: answered(port, "ad3.example", TABLET) == "resolved", 3)
        assert answered(port, "ad3.example", LAPTOP) == "blocked: ads"
