"""Threat alerts posted to a site's webhook (resolver/admin/alert_hooks.py): signed, retried, bounded, and only
where the operator lets them go. The receivers are real HTTP servers on loopback (which the hooks may reach
only with admin.webhook_allow); the alerts come as the workers' counters files give them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest
from aiohttp import web

from resolver.admin.alert_hooks import MAX_QUEUED, AlertHooks
from resolver.shared.policy.model import Webhook

pytestmark = pytest.mark.integration
SECRET = "webhook-secret-for-tests"
LOOPBACK = ("127.0.0.0/8", "::1/128")  # admin.webhook_allow for receivers on this machine


class Alerts:
    """The node's newest alerts, as Metrics.alerts gives them."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, count: int, site: str = "home") -> None:
        start = time.time()
        self.items += [
            {"at": start + i / 1000, "site": site, "client": "127.0.0.1", "name": f"n{i}.example", "reason": "dga"}
            for i in range(count)
        ]

    def alerts(self, site: str | None = None) -> list[dict]:
        return sorted(self.items, key=lambda alert: alert["at"], reverse=True)


async def receiver(
    statuses: list[int], headers: dict[str, str] | None = None
) -> tuple[web.AppRunner, str, list[tuple[bytes, str, str]]]:
    """A webhook receiver answering `statuses` in turn (then 200), with `headers`; what it got (body, signature,
    Host)."""
    got: list[tuple[bytes, str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((await request.read(), request.headers["X-BNS-Signature"], request.host))
        return web.Response(status=statuses.pop(0) if statuses else 200, headers=headers)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/hook", got


def test_alerts_are_signed_retried_until_taken_and_only_for_sites_with_a_webhook():
    async def scenario() -> None:
        runner, url, got = await receiver([500])
        now = [0.0]
        alerts = Alerts()

        async def webhook_of(site: str) -> Webhook | None:
            return Webhook(url, SECRET) if site == "home" else None

        hooks = AlertHooks(alerts, webhook_of, LOOPBACK, clock=lambda: now[0])  # type: ignore[arg-type]
        alerts.add(3)
        alerts.add(2, site="elsewhere")
        async with hooks.session() as session:
            await hooks.look()
            await hooks.deliver(session)  # 500: kept
            assert len(got) == 1 and hooks.delivered == 0
            await hooks.deliver(session)  # not before the retry delay
            assert len(got) == 1
            now[0] = 1.5
            await hooks.look()  # the same alerts seen again: not queued twice
            await hooks.deliver(session)
        assert len(got) == 2 and hooks.delivered == 3
        body, signature, _host = got[1]
        assert signature == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        posted = json.loads(body)
        assert posted["site"] == "home" and [alert["name"] for alert in posted["alerts"]] == [
            "n0.example",
            "n1.example",
            "n2.example",
        ]
        await runner.cleanup()

    asyncio.run(scenario())


def test_a_webhook_that_never_answers_costs_a_bounded_queue():
    async def scenario() -> None:
        alerts = Alerts()

        async def webhook_of(site: str) -> Webhook | None:
            return Webhook("http://127.0.0.1:9/hook", SECRET)  # the discard port: nothing listens

        hooks = AlertHooks(alerts, webhook_of, LOOPBACK)  # type: ignore[arg-type]
        alerts.add(MAX_QUEUED + 500)
        await hooks.look()
        async with hooks.session() as session:
            await hooks.deliver(session)
        assert hooks.dropped == 500 and hooks.delivered == 0

    asyncio.run(scenario())


async def post_once(url: str, allow: tuple[str, ...]) -> AlertHooks:
    """One look and one delivery of one alert to `url`, with `allow` as admin.webhook_allow."""
    alerts = Alerts()

    async def webhook_of(site: str) -> Webhook | None:
        return Webhook(url, SECRET)

    hooks = AlertHooks(alerts, webhook_of, allow)  # type: ignore[arg-type]
    alerts.add(1)
    await hooks.look()
    async with hooks.session() as session:
        await hooks.deliver(session)
    return hooks


def test_a_webhook_reaches_this_machine_only_where_the_operator_allows_it():
    """Issue 18: a site's webhook could make the node post to its own loopback and its neighbours. Refused
    without admin.webhook_allow, by address or by a name resolving to one (checked on the address connected
    to); delivered, with the name kept in the Host header, with it."""

    async def scenario() -> tuple[list[int], int, list[str]]:
        runner, url, got = await receiver([])
        by_name = url.replace("127.0.0.1", "localhost")  # /etc/hosts: 127.0.0.1 (and ::1)
        refused = [await post_once(target, ()) for target in (url, by_name)]
        received_refused = len(got)
        allowed = await post_once(by_name, LOOPBACK)
        await runner.cleanup()
        assert [hooks.delivered for hooks in refused] == [0, 0] and allowed.delivered == 1
        return [hooks.refused for hooks in refused], received_refused, [host for _body, _signature, host in got]

    refused, received_refused, hosts = asyncio.run(scenario())
    assert refused == [1, 1] and received_refused == 0
    assert len(hosts) == 1 and hosts[0].startswith("localhost:")  # the name, though an address was connected to


def test_a_webhook_is_not_redirected_and_never_sends_credentials_from_its_url():
    async def scenario() -> tuple[int, int, int, int]:
        target, target_url, target_got = await receiver([])
        redirecting, url, got = await receiver([307], {"Location": target_url})
        redirected = await post_once(url, LOOPBACK)
        with_credentials = await post_once(target_url.replace("http://", "http://user:pass@"), LOOPBACK)
        await target.cleanup()
        await redirecting.cleanup()
        assert redirected.delivered == 0 and with_credentials.delivered == 0
        return len(got), len(target_got), redirected.refused, with_credentials.refused

    posted, redirected_to, refused_redirect, refused_credentials = asyncio.run(scenario())
    assert posted == 1 and redirected_to == 0  # the 307 is a failed post, tried again later; never followed
    assert (refused_redirect, refused_credentials) == (0, 1)
