"""Each site's threat alerts posted to its webhook (`webhook` in the site document): signed, retried, bounded.

Every second the admin process takes the alerts its node's workers flagged since the last look (metrics.py
reads them from the run directory) and queues them by site. A site's queue is posted as one JSON body,
`{"site": …, "alerts": [...]}`, with `X-BNS-Signature: sha256=<hex HMAC-SHA256 of the body with the
webhook's secret>`; anything but a 2xx is tried again after 1, 2, 4 … 60 s, the same alerts and more. A
queue holds at most `MAX_QUEUED` alerts per site: beyond, the oldest are dropped and counted
(`bns_webhook_alerts_total{outcome="dropped"}`), so a receiver that is down costs bounded memory. Each node
posts what its own workers saw.

A webhook is a site owner's URL fetched by this node, so it is held to where the operator lets it go: only a
public address, or one in `admin.webhook_allow` (outbound.py); an address in the URL is checked as written. A
redirect is not followed (a 3xx is a failed post), a URL with a user name or password is not posted to, and no
proxy from the environment is used. A refused post is logged and counted (`bns_webhook_refused_total`), and
tried again like any failed one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from resolver.admin.metrics import Metrics
from resolver.admin.outbound import TargetRefused, checked_session
from resolver.shared.errors import StoreUnavailable
from resolver.shared.policy.model import PolicyError, Webhook, check_webhook_url

log = logging.getLogger(__name__)

MAX_QUEUED = 1000
_BATCH = 100
_LOOK_EVERY = 1.0
_FIRST_RETRY, _LAST_RETRY = 1.0, 60.0
_SITE_TTL = 10.0  # seconds a site's webhook setting is trusted before it is read again
_LATE = 2.0  # a worker writes its alerts every second: one may show an alert older than another's newest

SiteHook = Callable[[str], Awaitable[Webhook | None]]


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _Queue:
    __slots__ = ("alerts", "delay", "next_try")

    def __init__(self) -> None:
        self.alerts: deque[dict[str, Any]] = deque()
        self.next_try = 0.0
        self.delay = _FIRST_RETRY


class AlertHooks:
    def __init__(
        self,
        metrics: Metrics,
        webhook_of: SiteHook,
        allow: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._webhook_of = webhook_of
        self._allow = allow  # admin.webhook_allow
        self._clock = clock
        self._seen_until = time.time()  # alerts from before this process started were someone else's to send
        self._seen: set[tuple[Any, ...]] = set()  # the alerts of the last second, which a later look repeats
        self._queues: dict[str, _Queue] = {}
        self._hooks: dict[str, tuple[float, Webhook | None]] = {}
        self.dropped = 0
        self.delivered = 0
        self.refused = 0  # posts not made: the webhook's address is not one alerts may go to

    def session(self) -> aiohttp.ClientSession:
        """The HTTP client of the posts: it connects to checked addresses only (and to no proxy)."""
        return checked_session(self._allow, "admin.webhook_allow", 10)

    async def run(self) -> None:
        async with self.session() as session:
            while True:
                await self.look()
                await self.deliver(session)
                await asyncio.sleep(_LOOK_EVERY)

    async def look(self) -> None:
        """Queue the alerts seen since the last look, for the sites that have a webhook."""
        fresh = [
            alert
            for alert in self._metrics.alerts()
            if alert.get("site") and alert["at"] >= self._seen_until and _identity(alert) not in self._seen
        ]
        if not fresh:
            return
        newest = max(alert["at"] for alert in fresh)
        self._seen = {_identity(alert) for alert in fresh if alert["at"] >= newest - _LATE} | {
            key for key in self._seen if key[0] >= newest - _LATE
        }
        self._seen_until = max(self._seen_until, newest - _LATE)
        for alert in sorted(fresh, key=lambda alert: alert["at"]):
            if await self._hook(alert["site"]) is None:
                continue
            queue = self._queues.setdefault(alert["site"], _Queue())
            if len(queue.alerts) >= MAX_QUEUED:
                queue.alerts.popleft()
                self.dropped += 1
            queue.alerts.append(alert)

    async def deliver(self, session: aiohttp.ClientSession) -> None:
        now = self._clock()
        for site, queue in list(self._queues.items()):
            if not queue.alerts or now < queue.next_try:
                continue
            hook = await self._hook(site)
            if hook is None:
                del self._queues[site]  # the webhook was removed: nobody to tell
                continue
            batch = [queue.alerts[index] for index in range(min(_BATCH, len(queue.alerts)))]
            body = json.dumps({"site": site, "alerts": batch}, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json", "X-BNS-Signature": signature(hook.secret, body)}
            try:
                check_webhook_url(hook.url, self._allow)  # stored before this node's rules, or under others
                async with session.post(hook.url, data=body, headers=headers, allow_redirects=False) as response:
                    posted = 200 <= response.status < 300
                    why = f"HTTP {response.status}"
            except PolicyError as refused:
                posted, why = False, f"not posted: {refused.reason}"
                self.refused += 1
            except aiohttp.ClientConnectorError as exc:
                posted, why = False, str(exc)
                if isinstance(exc.os_error, TargetRefused):
                    posted, why = False, f"not posted: {exc.os_error}"
                    self.refused += 1
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                posted, why = False, str(exc) or type(exc).__name__
            if posted:
                for _ in batch:
                    queue.alerts.popleft()  # the batch is still at the queue's head: nothing else ran meanwhile
                self.delivered += len(batch)
                queue.delay = _FIRST_RETRY
                queue.next_try = 0.0
            else:
                log.warning("webhook of site %s: %s; trying again in %.0f s", site, why, queue.delay)
                queue.next_try = now + queue.delay
                queue.delay = min(queue.delay * 2, _LAST_RETRY)

    async def _hook(self, site: str) -> Webhook | None:
        now = self._clock()
        known = self._hooks.get(site)
        if known is not None and now - known[0] < _SITE_TTL:
            return known[1]
        try:
            hook = await self._webhook_of(site)
        except StoreUnavailable:
            return known[1] if known is not None else None  # keep the last known setting through an outage
        self._hooks[site] = (now, hook)
        return hook


def _identity(alert: dict[str, Any]) -> tuple[Any, ...]:
    return (alert["at"], alert.get("site"), alert.get("client"), alert.get("name"), alert.get("reason"))
