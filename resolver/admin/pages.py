"""The block and warning pages: what a browser shows at a name the resolver answered with a page address.

A page knows two things only: the name the browser asked for (the Host header) and who is asking (the
connection's source address, identified like a DNS client of that address). It asks the explainer, which
takes the resolver's steps, what the verdict for that name and client is now, and shows it:

- blocked (Content Control, a deny entry, a pause, a schedule): what was blocked and why;
- warned (Web Protect: malware, phishing): the danger, "go back", and "continue anyway" for a device the
  network knows. The button posts a token, signed with HMAC-SHA256 and expiring after `pages.offer_minutes`,
  that names the site, the device and the name. Accepting it writes a pass on that device through the policy
  store (every node sees it within a second) that lifts warnings for that name for `pages.pass_minutes`. A
  forged token, one for another name or device, an expired one, one used before, one posted by a script
  rather than a user's navigation (Sec-Fetch-Mode), or one posted from another site's page (Sec-Fetch-Site,
  Origin) changes nothing;
- anything else, a name this client may reach or one the page was not asked about: a page that says
  nothing about any name. When the store cannot be asked, a page that says so.

Every page forbids what it does not use (Content-Security-Policy: its own style and "Go back" script by hash,
nothing loaded, its form posted to itself only, never framed; nosniff) and sends no Referer, but for the
warning page, whose button must show the browser's Origin (`same-origin`: nothing else is same-origin to it).

Devices behind a router share its address. A page reached on an address of `pages.device_networks` is for
the one device of the asking address's site that the resolver sent there for that name
(resolver/shared/page_pool.py): the verdict and the button are that device's, and a button posted there
must be that device's too. When no device, or more than one, has that address for the name, the page warns
without a button.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from string import Template
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from blocklists.catalog import Catalog
from blocklists.names import BadName, normalize
from resolver.admin.why import Explainer
from resolver.shared.config import PagesSettings
from resolver.shared.dns import text_to_name
from resolver.shared.errors import BnsError, NotFound, StoreUnavailable
from resolver.shared.page_pool import PagePool
from resolver.shared.policy.model import Device, PolicyError, Site
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.page_tokens import Secret, UsedTokens

log = logging.getLogger(__name__)

CONTINUE_PATH = "/.well-known/bns/continue"
_MAX_TOKEN = 2048


class TokenRefused(BnsError):
    """A continue token that opens nothing: forged, expired, used, or for another name or device."""


@dataclass(frozen=True)
class Offer:
    """What a "continue anyway" button offers: this name, for this device."""

    site: str
    device: str
    name: str
    expires: float  # the button is void after this
    nonce: str


class ContinueTokens:
    """Signs and checks offers: `<base64url(JSON)>.<base64url(HMAC-SHA256)>`."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, offer: Offer) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(asdict(offer), separators=(",", ":")).encode())
        return f"{payload.decode()}.{self._mac(payload)}"

    def verify(self, token: str, now: float) -> Offer:
        payload, _, mac = token.encode("utf-8", "replace").partition(b".")
        if not payload or len(token) > _MAX_TOKEN or not hmac.compare_digest(mac, self._mac(payload).encode()):
            raise TokenRefused("this button was not made by this network")
        try:
            offer = Offer(**json.loads(base64.urlsafe_b64decode(payload)))
        except (ValueError, TypeError):
            raise TokenRefused("this button was not made by this network") from None
        if now >= offer.expires:
            raise TokenRefused("this button has expired: reload the page for a new one")
        return offer

    def _mac(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._secret, payload, hashlib.sha256).digest()).decode()


_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#e9e9ee;color:#1d1d1f}body.warning{background:#f6d7d2}
main{max-width:36rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:12px;
box-shadow:0 2px 12px rgba(0,0,0,.15)}
h1{margin-top:0;font-size:1.6rem}.name{font-family:ui-monospace,monospace;word-break:break-all}
.why{padding:.75rem 1rem;background:#f4f4f6;border-radius:8px}
button{font:inherit;padding:.6rem 1.2rem;border-radius:8px;border:1px solid #888;background:#fff;
cursor:pointer;color:inherit;margin-right:.5rem}
button.primary{background:#1d1d1f;color:#fff;border-color:#1d1d1f}
small{color:#555}
"""
_GO_BACK = 'document.getElementById("back").addEventListener("click",function(){history.back()})'


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing runs or loads but this file's own style and "Go back" script (by their hashes), the form posts only
# to the page's own origin, and no page may frame it: a name's warning page cannot be turned against its user.
_SECURITY_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src {_digest(_STYLE)}; script-src {_digest(_GO_BACK)}; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_PAGE = Template(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="robots" content="noindex">$refresh<title>$title</title>
<style>{_STYLE}</style></head>
<body class="$tone"><main>
<h1>$title</h1>
$body
</main></body></html>
""")


def _page(
    status: int, title: str, body: str, tone: str = "", refresh: str = "", referrer: str = "no-referrer"
) -> web.Response:
    text = _PAGE.substitute(title=html.escape(title), body=body, tone=tone, refresh=refresh)
    headers = {**_SECURITY_HEADERS, "Referrer-Policy": referrer}
    return web.Response(status=status, text=text, content_type="text/html", headers=headers)


def _nothing_here() -> web.Response:
    return _page(404, "Nothing to show", "<p>There is no block or warning page for this address.</p>")


def _unavailable() -> web.Response:
    return _page(503, "Try again", "<p>The network cannot check this site just now. Try again in a moment.</p>")


def _from_another_page(request: web.Request) -> bool:
    """Whether the browser says this POST comes from a page of another origin than the one it is sent to (the
    warning page's own: the name in its Host). An Origin, when there is one, must be this one: "null" too is
    refused (a page that hides its origin). Sec-Fetch-Site, when there is one (browsers send it over HTTPS
    only), must be same-origin or none. An old browser that sends neither is let through: the token
    still binds the name, the device and one use."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    return origin is not None and origin.lower() != f"{request.scheme}://{request.host}".lower()


def _clock_time(moment: float, timezone: str | None) -> str:
    """The time of day in the site's time zone, as its users read clocks."""
    zone = ZoneInfo(timezone) if timezone else UTC
    return datetime.fromtimestamp(moment, zone).strftime("%H:%M %Z")


class Pages:
    """The pages' HTTP application: GET shows the page for the Host asked; POST to CONTINUE_PATH accepts a
    continue token."""

    def __init__(
        self,
        explainer: Explainer,
        service: PolicyService | None,
        secret: Secret,
        used: UsedTokens,
        settings: PagesSettings,
        catalog: Catalog,
        blocked_ttl: int,
        clock: Callable[[], float] = time.time,
        pool: PagePool | None = None,
    ) -> None:
        self.explainer = explainer
        self.service = service
        self.secret = secret
        self.used = used
        self.settings = settings
        self.catalog = catalog
        self.blocked_ttl = blocked_ttl
        self.clock = clock
        self.pool = pool or PagePool(())
        self._titles = {category.id: category for category in catalog}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024)
        app.router.add_post(CONTINUE_PATH, self.continue_anyway)
        app.router.add_route("GET", "/{tail:.*}", self.show)
        return app

    @staticmethod
    def _asked_name(request: web.Request) -> str | None:
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        try:
            return normalize(host)
        except BadName:
            return None

    async def _verdict(self, request: web.Request, name: str) -> dict[str, Any] | None:
        """The resolver's verdict for the asking address now; None for an address that is no client's. On a
        device's own page address, the verdict of the device of that address's site whose address it is for
        `name`; with `untold` set when the site has none or several (no device is named then). Raises
        StoreUnavailable."""
        question = {"name": name, "address": request.remote or "", "at": None}
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        place = self.pool.place(sockname[0]) if sockname else None
        try:
            if place is None:
                return await self.explainer.explain(question)
            found: list[Device] = []

            def device_of(site: Site) -> Device | None:
                found.extend(self.pool.devices_at(site, text_to_name(name), place))
                return found[0] if len(found) == 1 else None

            verdict = await self.explainer.explain(question, device_of)
        except PolicyError as exc:
            log.info("page for %s: %s", name, exc)
            return None
        verdict["untold"] = verdict["site"] is not None and len(found) != 1
        return verdict

    async def show(self, request: web.Request) -> web.Response:
        name = self._asked_name(request)
        try:
            verdict = await self._verdict(request, name) if name else None
        except StoreUnavailable:
            return _unavailable()
        if name is None or verdict is None or verdict["verdict"] == "allowed":
            return _nothing_here()
        shown = html.escape(name)
        if verdict["verdict"] == "blocked":
            return _page(
                403,
                "Blocked",
                f'<p><span class="name">{shown}</span> is blocked on this network.</p>'
                f'<p class="why">{self._why(verdict)}</p>'
                "<p><small>Ask this network's administrator if you think this is a "
                "mistake.</small></p>",
            )
        # same-origin: its button's POST then carries this page's Origin (no-referrer would make it "null", as
        # another site's page can make its own), and the page has nothing else same-origin to tell but us.
        body = await self._warning(name, verdict)
        return _page(403, "Warning: this site may harm you", body, tone="warning", referrer="same-origin")

    def _why(self, verdict: dict[str, Any]) -> str:
        rule = verdict["rule"]
        if rule == "pause":
            return "Internet access is paused for this device."
        if rule == "schedule":
            return html.escape(f"Blocked by the {verdict['reason'].removeprefix('schedule ')} schedule.")
        if rule == "deny":
            return "This site is on this network's deny list."
        return "<br>".join(
            f"<b>{html.escape(self._titles[c].title)}</b>: {html.escape(self._titles[c].description)}"
            for c in verdict["categories"]
            if c in self._titles
        )

    async def _warning(self, name: str, verdict: dict[str, Any]) -> str:
        shown = html.escape(name)
        body = (
            f'<p><span class="name">{shown}</span> is known to be dangerous.</p>'
            f'<p class="why">{self._why(verdict)}</p>'
            f'<p><button type="button" id="back">Go back</button></p><script>{_GO_BACK}</script>'
        )
        if verdict.get("untold"):
            return (
                body + "<p><small>This network cannot tell which of its devices behind your router this is, so "
                "it cannot continue from here. Ask this network's administrator.</small></p>"
            )
        if verdict["site"] is None or verdict["device"] is None or self.service is None:
            return (
                body + "<p><small>This device is not known to the network, so it cannot continue from "
                "here. Ask this network's administrator.</small></p>"
            )
        try:
            tokens = ContinueTokens(await self.secret.key())
        except StoreUnavailable:
            return body + "<p><small>Continuing is not possible just now. Try again in a moment.</small></p>"
        offer = Offer(
            verdict["site"],
            verdict["device"],
            name,
            self.clock() + self.settings.offer_minutes * 60,
            secrets.token_urlsafe(12),
        )
        return body + (
            f'<form method="post" action="{CONTINUE_PATH}">'
            f'<input type="hidden" name="token" value="{html.escape(tokens.sign(offer))}">'
            f'<button class="primary" type="submit" id="continue">Continue anyway</button></form>'
            f"<p><small>Continuing opens {shown} on this device only, for "
            f"{self.settings.pass_minutes:g} minutes.</small></p>"
        )

    async def continue_anyway(self, request: web.Request) -> web.Response:
        name = self._asked_name(request)
        try:
            # A browser says how a request came about; a script on some page cannot claim a navigation.
            if request.headers.get("Sec-Fetch-Mode", "navigate") != "navigate":
                raise TokenRefused("the button must be pressed by you, on the warning page")
            if _from_another_page(request):
                raise TokenRefused("the button must be pressed on this warning page, not on another site")
            form = await request.post()
            token = form.get("token")
            if not isinstance(token, str) or name is None:
                raise TokenRefused("no button was pressed")
            now = self.clock()
            offer = ContinueTokens(await self.secret.key()).verify(token, now)
            verdict = await self._verdict(request, name)
            if (
                offer.name != name
                or verdict is None
                or (verdict["site"], verdict["device"]) != (offer.site, offer.device)
            ):
                raise TokenRefused("this button was made for another site or device")
            if not await self.used.claim(offer.nonce, offer.expires):
                raise TokenRefused("this button has been used already")
            until = now + self.settings.pass_minutes * 60
            assert self.service is not None
            try:
                await self.service.grant_pass(offer.site, offer.device, offer.name, until, now)
            except (NotFound, PolicyError, StoreUnavailable):
                await self.used.release(offer.nonce)
                raise
        except TokenRefused as refused:
            return _page(403, "Not opened", f"<p>{html.escape(str(refused))}</p>")
        except web.HTTPRequestEntityTooLarge:
            return _page(413, "Not opened", "<p>That is not what the button sends.</p>")
        except (NotFound, PolicyError, StoreUnavailable) as exc:
            log.warning("continue anyway for %s: %s", name, exc)
            return _page(503, "Not opened", "<p>The network could not open this site just now. Try again.</p>")
        log.info(
            "continue anyway: site %s device %s opened %s until %s",
            offer.site,
            offer.device,
            offer.name,
            _clock_time(until, None),
        )
        shown = html.escape(name)
        wait = self.blocked_ttl + 2
        return _page(
            200,
            "Opened",
            f'<p><span class="name">{shown}</span> is open on this device until '
            f"{_clock_time(until, verdict['timezone'])}.</p><p>Taking you there in {wait} "
            "seconds "
            f'(your browser may remember the warning that long): <a href="http://{shown}/">'
            f"{shown}</a></p>",
            refresh=f'<meta http-equiv="refresh" content="{wait};url=http://{shown}/">',
        )
