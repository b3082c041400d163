"""Threat alerts posted to a site's webhook (resolver/admin/alert_hooks.py): signed, retried, bounded. The
receiver is a real HTTP server on loopback; the alerts come as the workers' counters files give them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import aiohttp
import pytest
from aiohttp import web

from resolver.admin.alert_hooks import MAX_QUEUED, AlertHooks
from resolver.shared.policy.model import Webhook

pytestmark = pytest.mark.integration
SECRET = "webhook-secret-for-tests"


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


async def receiver(statuses: list[int]) -> tuple[web.AppRunner, str, list[tuple[bytes, str]]]:
    got: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((await request.read(), request.headers["X-BNS-Signature"]))
        return web.Response(status=statuses.pop(0) if statuses else 200)

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

        hooks = AlertHooks(alerts, webhook_of, clock=lambda: now[0])  # type: ignore[arg-type]
        alerts.add(3)
        alerts.add(2, site="elsewhere")
        async with aiohttp.ClientSession() as session:
            await hooks.look()
            await hooks.deliver(session)  # 500: kept
            assert len(got) == 1 and hooks.delivered == 0
            await hooks.deliver(session)  # not before the retry delay
            assert len(got) == 1
            now[0] = 1.5
            await hooks.look()  # the same alerts seen again: not queued twice
            await hooks.deliver(session)
        assert len(got) == 2 and hooks.delivered == 3
        body, signature = got[1]
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

        hooks = AlertHooks(alerts, webhook_of)  # type: ignore[arg-type]
        alerts.add(MAX_QUEUED + 500)
        await hooks.look()
        async with aiohttp.ClientSession() as session:
            await hooks.deliver(session)
        assert hooks.dropped == 500 and hooks.delivered == 0

    asyncio.run(scenario())
