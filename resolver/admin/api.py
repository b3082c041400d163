"""The admin HTTP API: JSON in and out, bearer tokens, every write through the policy store.

Each route is declared once in `ROUTES` (method, path, role, summary, handler); the aiohttp router and the
OpenAPI document at `/openapi.json` are both built from it, so they cannot disagree.

Auth: `Authorization: Bearer <token>`. Tokens come from `admin.tokens` / `admin.read_tokens` and from
$BNS_ADMIN_TOKENS / $BNS_READ_TOKENS (comma-separated); each is compared in constant time. A site token
(site_tokens.py, made by an admin token) opens the routes marked `subscriber`, on its own site only. A route of
the `public` role (/health) answers without a token too, and shows more to an operator's token. No token or an
unknown one → 401; a read-only token on a write, or a site token anywhere else → 403. With no token configured
every request but a site token's and a public route's is refused, and the 401 says so (`hint`). A source whose
tokens keep failing is answered 429 for a while, and the failures are logged (auth_failures.py). A webhook's
secret is shown to admin tokens only. Errors are `{"error": {"status": N, "message": "...", "field": "..."}}`,
with `"hint"` when what to do next is not the client's to know.
"""

from __future__ import annotations

import hmac
import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from blocklists.catalog import Catalog
from blocklists.errors import ArtifactError, BlocklistError
from resolver.admin.app import add_app_routes
from resolver.admin.auth_failures import AuthFailures
from resolver.admin.devices import activity_view, identity_fields, site_devices
from resolver.admin.feeds import Feeds
from resolver.admin.metrics import Metrics
from resolver.admin.site_tokens import PREFIX as SITE_TOKEN
from resolver.admin.site_tokens import SiteTokens
from resolver.admin.sources import Sources
from resolver.admin.status import profiles_of, site_status
from resolver.admin.why import Explainer
from resolver.shared.config import AdminSettings, TlsSettings
from resolver.shared.errors import (
    BnsError,
    NotAllowed,
    NotFound,
    StoreUnavailable,
    TooLarge,
    Unauthenticated,
    WriteUnknown,
    http_status_of,
)
from resolver.shared.local_records import parse_records
from resolver.shared.policy.model import PolicyError, Site, parse_shared_records
from resolver.shared.policy.service import PolicyService, Target, client_id_endpoints, describe
from resolver.shared.store.activity import Activity
from resolver.shared.store.policies import Store
from resolver.shared.store.publications import Publications

READ, ADMIN = "read", "admin"
SUBSCRIBER = "subscriber"  # a site token (site_tokens.py): its own site's routes marked `subscriber` only
PUBLIC = "public"  # a route that answers without a token too (/health for probes); a token may show more
# A 401's hint from a node no admin or read token can open: no client can fix that, its operator can.
_NO_TOKENS = (
    "this node has no admin or read token: its operator must set admin.tokens (or $BNS_ADMIN_TOKENS) and "
    "restart it, or reload it (SIGHUP) after editing its configuration file"
)


Handler = Callable[["Api", web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: str
    summary: str
    handler: Handler
    body: str | None = None  # what the request body is, for the OpenAPI document
    subscriber: bool = False  # a site token may use it (on its own site, where the path names one)
    answer: str | None = None  # what a 200 answers, for the OpenAPI document (a schema in _BODIES)


def tokens_from(settings: AdminSettings) -> dict[str, str]:
    """token → role. An admin token listed as read-only too stays admin."""
    roles = dict.fromkeys(settings.read_tokens, READ)
    roles.update(dict.fromkeys(settings.tokens, ADMIN))
    return roles


def _written(site: Site | None) -> web.Response:
    """The site as the write left it. Never read back from the store: a read that fails after a write that
    succeeded would report the write as failed."""
    assert site is not None
    return web.json_response(_shown(describe(site)))


_ROLE: ContextVar[str] = ContextVar("role", default=READ)  # the credential of the request being answered


def _shown(document: dict[str, Any]) -> dict[str, Any]:
    """A site document as the credential may see it: a webhook's secret only to an admin token (it signs the
    site's alerts; a subscriber or a read-only token could forge them)."""
    if _ROLE.get() == ADMIN or not document.get("webhook"):
        return document
    # Chat services (Slack, Discord, Teams) put their credential in the URL's path: only its host is shown.
    url = urlsplit(document["webhook"]["url"])
    return {**document, "webhook": {"url": f"{url.scheme}://{url.netloc.rpartition('@')[2]}/…"}}


def _presented(request: web.Request) -> str:
    """The bearer token a request presents ("" for none)."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else ""


def _failure(exc: BnsError | BlocklistError, detailed: bool = True, hint: str | None = None) -> web.Response:
    """The error response for a failure: its status, its message, the field at fault, whether a write's
    outcome is unknown, and what to do next when the client cannot know. Not `detailed` (anyone but an admin
    token): a store failure says what it means, not where the store is."""
    if isinstance(exc, PolicyError):
        message = exc.reason
    elif isinstance(exc, StoreUnavailable | WriteUnknown) and not detailed:
        message = exc.summary
    else:
        message = exc.explain() if isinstance(exc, BnsError) else str(exc)
    response = _error(
        http_status_of(exc),
        message,
        field=exc.field if isinstance(exc, PolicyError) else None,
        outcome="unknown" if isinstance(exc, WriteUnknown) else None,
        hint=hint,
    )
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="bns"'
    return response


def _error(
    status: int, message: str, field: str | None = None, outcome: str | None = None, hint: str | None = None
) -> web.Response:
    body: dict[str, Any] = {"status": status, "message": message}
    if field is not None:
        body["field"] = field
    if outcome is not None:
        body["outcome"] = outcome
    if hint is not None:
        body["hint"] = hint
    return web.json_response({"error": body}, status=status)


class Api:
    def __init__(
        self,
        tokens: dict[str, str],
        catalog: Catalog,
        store: Store | None,
        publications: Publications,
        sources: Sources,
        feeds: Feeds,
        explainer: Explainer,
        metrics: Metrics,
        max_upload: int,
        max_json: int,
        scratch: Path,
        site_tokens: SiteTokens,
        activity: Activity,
        tls: TlsSettings | None = None,
    ) -> None:
        """`tls`: where DoT and DoH listen, to say where a device's new client id goes."""
        self.use_tokens(tokens)
        self.tls = tls or TlsSettings()
        self.failures = AuthFailures()
        self.site_tokens = site_tokens
        self.activity = activity
        self.catalog = catalog
        self.store = store
        self.service = PolicyService(store, activity) if store is not None else None
        self.publications = publications
        self.sources = sources
        self.feeds = feeds
        self.local_records: tuple[str, ...] = ()  # this node's local.records, which the API's must stand beside
        self.explainer = explainer
        self.metrics = metrics
        self.max_upload = max_upload
        self.max_json = max_json
        self.scratch = scratch
        self.started = time.time()
        self._routes: dict[Callable[..., Any], Route] = {}  # the bound handler → its declaration

    # --- plumbing ---------------------------------------------------------------------------------------------

    def use_tokens(self, tokens: dict[str, str]) -> None:
        """token → role; replaced whole on SIGHUP."""
        self._tokens = [(token.encode(), role) for token, role in tokens.items()]

    def app(self) -> web.Application:
        # client_max_size bounds request.read(), which only _json uses: a chunked body stops there. Uploads
        # stream through _received, bounded by max_upload.
        app = web.Application(client_max_size=self.max_json, middlewares=[self._guard])
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._bind(route))
        add_app_routes(app)  # the subscriber's app (app.py): static files, no token; its data comes from ROUTES
        return app

    def _bind(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await route.handler(self, request)

        self._routes[handle] = route
        return handle

    async def _credential(self, request: web.Request) -> tuple[str, str | None] | None:
        """(role, the site of a site token); None when no valid token is presented. A site token is checked
        against the store: StoreUnavailable when it cannot be (a 503, never a pass)."""
        presented = _presented(request)
        if not presented:
            return None
        if presented.startswith(SITE_TOKEN):
            site = await self.site_tokens.site_of(presented)
            return (SUBSCRIBER, site) if site is not None else None
        found = None
        for token, role in self._tokens:  # every token compared, in constant time each
            if hmac.compare_digest(token, presented.encode()):
                found = role
        return (found, None) if found is not None else None

    @staticmethod
    def _authorize(route: Route, role: str, site: str | None, request: web.Request) -> None:
        """Raises NotAllowed unless the credential may use the route (docs/admin-api.md, "Site tokens")."""
        if role == SUBSCRIBER:
            if not route.subscriber:
                raise NotAllowed("a site token opens its own site's devices, groups, policies, pauses and alerts only")
            if "site" in request.match_info and request.match_info["site"] != site:
                raise NotAllowed("this site token is for another site")
        elif route.role == ADMIN and role != ADMIN:
            raise NotAllowed("this token is read-only; the operation needs an admin token")

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = self._routes.get(request.match_info.handler)
        if route is None:  # aiohttp's own 404/405
            try:
                return await handler(request)
            except web.HTTPException as exc:
                return _error(exc.status, exc.reason)
        role = None
        # A probe (a load balancer's, a container's) asks a public route without a token: never slowed for
        # the failures of others behind the same address.
        anonymous = route.role == PUBLIC and not _presented(request)
        try:
            wait = 0 if anonymous else self.failures.wait(request.remote)
            # A soundly signed site token is no guess (its HMAC cannot be made without the key): the
            # subscribers behind an address someone else fails from (a proxy, a CGNAT pool) are not locked out.
            if wait and not await self.site_tokens.signed(_presented(request)):
                refused = _error(429, f"too many failed authentications from this address: try again in {wait} s")
                refused.headers["Retry-After"] = str(wait)
                return refused
            credential = (PUBLIC, None) if anonymous else await self._credential(request)
            if credential is None:
                if _presented(request):
                    self.failures.failed(request.remote, f"{route.method} {route.path}")
                raise Unauthenticated("a valid bearer token is required (Authorization: Bearer <token>)")
            role = credential[0]
            self._authorize(route, *credential, request)
            shown = _ROLE.set(role)
            try:
                return await handler(request)
            finally:
                _ROLE.reset(shown)
        except web.HTTPRequestEntityTooLarge:
            return _failure(TooLarge("admin.max_json", self.max_json))
        except (BnsError, BlocklistError) as exc:
            untokened = isinstance(exc, Unauthenticated) and not self._tokens
            return _failure(exc, detailed=role == ADMIN, hint=_NO_TOKENS if untokened else None)

    async def _json(self, request: web.Request) -> Any:
        """The body as JSON; over admin.max_json it is a 413, before it is read when its length is given."""
        if request.content_length is not None and request.content_length > self.max_json:
            raise TooLarge("admin.max_json", self.max_json)
        try:
            return json.loads(await request.read() or b"null")
        except json.JSONDecodeError as exc:
            raise PolicyError("", f"the body is not JSON: {exc}") from None

    async def _object(self, request: web.Request, optional: bool = False) -> dict[str, Any]:
        body = await self._json(request)
        if body is None and optional:
            return {}
        if not isinstance(body, dict):
            raise PolicyError("", "the body must be a JSON object")
        return body

    def _policies(self) -> PolicyService:
        if self.service is None:
            raise BnsError("no policy store is configured (store.redis or store.file)")
        return self.service

    @staticmethod
    def _target(request: web.Request) -> Target:
        info = request.match_info
        if "group" in info:
            return "group", info["group"]
        if "device" in info:
            return "device", info["device"]
        return "site", None

    # --- handlers ---------------------------------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        """Without a token, the status alone (a probe's: 200 when serving, 503 while starting); with one, why."""
        ready, fallback = self.metrics.readiness()
        status = "starting" if not ready else "degraded" if fallback else "ok"
        if _ROLE.get() == PUBLIC:
            return web.json_response({"status": status}, status=200 if ready else 503)
        store_state = "none"
        if self.store is not None:
            try:
                await self.store.check()
                store_state = "up"
            except StoreUnavailable:
                store_state = "down"
        snapshot = self.explainer.lists.snapshot
        body = {
            "status": status,
            "ready": ready,
            "store": store_state,
            "lists_version": snapshot.version,
            "uptime": round(time.time() - self.started, 1),
        }
        if fallback:
            body["lists_fallback"] = f"serving the last verified list: {fallback}"
        return web.json_response(body, status=200 if ready else 503)

    async def issue_site_token(self, request: web.Request) -> web.Response:
        body = await self._object(request, optional=True)
        token, claims = await self.site_tokens.issue(request.match_info["site"], body.get("days"))
        return web.json_response({"site": claims.site, "token": token, "id": claims.id, "expires": claims.expires})

    async def list_site_tokens(self, request: web.Request) -> web.Response:
        live = await self.site_tokens.live(request.match_info["site"])
        return web.json_response(
            {"tokens": [{"id": token_id, "expires": expires} for token_id, expires in sorted(live.items())]}
        )

    async def revoke_site_token(self, request: web.Request) -> web.Response:
        await self.site_tokens.revoke(request.match_info["site"], request.match_info["id"])
        return web.json_response({"site": request.match_info["site"], "revoked": request.match_info["id"]})

    async def alerts(self, request: web.Request) -> web.Response:
        return web.json_response({"alerts": await self.activity.alerts(request.match_info["site"])})

    async def _site(self, request: web.Request) -> Site:
        """The site the path names, as the store has it. Raises NotFound."""
        site_id = request.match_info["site"]
        site = await self._policies().store.load_site(site_id)
        if site is None:
            raise NotFound(f"no site {site_id!r}")
        return site

    async def devices(self, request: web.Request) -> web.Response:
        store, site = self._policies().store, request.match_info["site"]
        listed = await site_devices(store, self.activity, self.explainer.maker, self.catalog, site, time.time())
        return web.json_response({"devices": listed})

    async def status(self, request: web.Request) -> web.Response:
        site = await self._site(request)
        profiles = await profiles_of(self._policies().store, self.catalog)
        return web.json_response(site_status(site, self.explainer.maker, profiles, time.time()))

    async def adopt_device(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        unknown = sorted(set(body) - {"name", "group"})
        if unknown:
            raise PolicyError(unknown[0], "unknown field; known: group, name")
        try:
            identity = identity_fields(request.match_info["key"])
        except ValueError as exc:
            raise PolicyError("key", str(exc)) from None
        return _written(await self._policies().adopt_device(request.match_info["site"], identity, body))

    async def forget_device(self, request: web.Request) -> web.Response:
        site = await self._site(request)
        await self.activity.forget(site.id, {request.match_info["key"]}, time.time())
        return web.json_response({"forgotten": request.match_info["key"]})

    async def device_activity(self, request: web.Request) -> web.Response:
        site = await self._site(request)
        device = request.query.get("device") or None
        since = self.activity.window(request.query.get("hours"), time.time())
        return web.json_response(await activity_view(self.activity, site.id, device, since))

    async def queries(self, request: web.Request) -> web.Response:
        site = await self._site(request)
        logged = await self.activity.queries(site.id, time.time()) if site.query_log else []
        return web.json_response(
            {
                "enabled": site.query_log,
                "retention_hours": self.activity.settings.query_log_hours,
                "queries": logged[::-1],
            }
        )

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def metrics_text(self, _request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def forwards(self, _request: web.Request) -> web.Response:
        """Each local.forward zone's health on this node: its servers, how many are down, replies, failed sends."""
        return web.json_response(
            [
                {
                    "zone": zone,
                    "servers": counts.get("servers", 0),
                    "down": counts.get("down", 0),
                    "state": "down" if counts.get("down", 0) >= counts.get("servers", 0) else "up",
                    "replies": counts.get("replies", 0),
                    "send_errors": counts.get("send_errors", 0),
                }
                for zone, counts in sorted(self.metrics.forwards().items())
            ]
        )

    async def categories(self, _request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"id": c.id, "bit": c.bit, "title": c.title, "description": c.description, "action": c.action}
                for c in self.catalog
            ]
        )

    async def list_sites(self, _request: web.Request) -> web.Response:
        return web.json_response(await self._policies().list_sites())

    async def get_site(self, request: web.Request) -> web.Response:
        document, version = await self._policies().get_site(request.match_info["site"])
        return web.json_response({**_shown(document), "version": version})

    async def put_site(self, request: web.Request) -> web.Response:
        site = await self._policies().put_site(request.match_info["site"], await self._object(request))
        return _written(site)

    async def patch_site(self, request: web.Request) -> web.Response:
        site = await self._policies().set_site_fields(
            request.match_info["site"], await self._object(request), create=False
        )
        return _written(site)

    async def delete_site(self, request: web.Request) -> web.Response:
        await self._policies().delete_site(request.match_info["site"])
        return web.json_response({"deleted": request.match_info["site"]})

    async def put_group(self, request: web.Request) -> web.Response:
        fields = await self._object(request)
        return _written(
            await self._policies().put_group(request.match_info["site"], request.match_info["group"], fields)
        )

    async def delete_group(self, request: web.Request) -> web.Response:
        site_id = request.match_info["site"]
        return _written(await self._policies().delete_group(site_id, request.match_info["group"]))

    async def put_device(self, request: web.Request) -> web.Response:
        fields = await self._object(request)
        return _written(
            await self._policies().put_device(request.match_info["site"], request.match_info["device"], fields)
        )

    async def renew_client_id(self, request: web.Request) -> web.Response:
        info = request.match_info
        site, client_id = await self._policies().renew_client_id(info["site"], info["device"])
        body = {"site": site.id, "device": info["device"], "client_id": client_id, "version": site.version}
        return web.json_response({**body, **client_id_endpoints(self.tls, client_id)})

    async def delete_device(self, request: web.Request) -> web.Response:
        site_id = request.match_info["site"]
        return _written(await self._policies().delete_device(site_id, request.match_info["device"]))

    async def put_policy(self, request: web.Request) -> web.Response:
        site_id = request.match_info["site"]
        return _written(await self._policies().set_policy(site_id, self._target(request), await self._object(request)))

    async def delete_policy(self, request: web.Request) -> web.Response:
        site_id = request.match_info["site"]
        return _written(await self._policies().set_policy(site_id, self._target(request), None))

    async def pause(self, request: web.Request) -> web.Response:
        site_id = request.match_info["site"]
        body = await self._object(request)
        if "minutes" in body:
            minutes = body["minutes"]
            if not isinstance(minutes, int | float) or isinstance(minutes, bool) or not 0 < minutes <= 525_600:
                raise PolicyError("minutes", f"{minutes!r} is not a number of minutes from 0 to 525600")
            until: str | float = time.time() + minutes * 60
        else:
            until = body.get("until", "forever")
        return _written(await self._policies().pause(site_id, self._target(request), until))

    async def unpause(self, request: web.Request) -> web.Response:
        site_id = request.match_info["site"]
        return _written(await self._policies().unpause(site_id, self._target(request)))

    async def import_sites(self, request: web.Request) -> web.Response:
        """Many sites at once (an array of site documents), validated whole first: a bad one writes none."""
        documents = await self._json(request)
        if not isinstance(documents, list):
            raise PolicyError("", "the body must be a JSON array of site documents")
        return web.json_response({"imported": await self._policies().store.import_sites(documents)})

    async def delete_profile(self, request: web.Request) -> web.Response:
        await self._policies().set_profile(request.match_info["profile"], None)
        return web.json_response({"profile": request.match_info["profile"], "deleted": True})

    async def get_records(self, _request: web.Request) -> web.Response:
        return web.json_response({"records": list(await self._policies().store.load_records())})

    async def put_records(self, request: web.Request) -> web.Response:
        """Replace the operator's records every worker answers beside local.records (zone-file lines); refused
        when they do not stand beside this node's local.records (its workers would serve those alone)."""
        body = await self._object(request)
        records = parse_shared_records(body.get("records"))
        try:
            parse_records(self.local_records + records)
        except ValueError as exc:
            where = f"beside this node's local.records (lines 1–{len(self.local_records)})"
            raise PolicyError("records", f"{where}: {exc}") from None
        return web.json_response({"records": list(await self._policies().store.set_records(list(records)))})

    async def put_profile(self, request: web.Request) -> web.Response:
        await self._policies().set_profile(request.match_info["profile"], await self._object(request))
        return web.json_response({"profile": request.match_info["profile"]})

    async def why(self, request: web.Request) -> web.Response:
        return web.json_response(await self.explainer.explain(await self._object(request)))

    async def list_versions(self, _request: web.Request) -> web.Response:
        versions, current = await self.publications.versions()
        return web.json_response({"current": current, "versions": [v.document(current) for v in versions]})

    @asynccontextmanager
    async def _received(self, request: web.Request) -> AsyncIterator[Path]:
        """The request body in a temporary file, streamed; over admin.max_upload it is a 413."""
        if request.content_length is not None and request.content_length > self.max_upload:
            raise TooLarge("admin.max_upload", self.max_upload)
        self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.scratch, suffix=".upload") as upload:
            size = 0
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > self.max_upload:
                    raise TooLarge("admin.max_upload", self.max_upload)
                upload.write(chunk)
            upload.flush()
            yield Path(upload.name)

    async def publish(self, request: web.Request) -> web.Response:
        """The body is a compiled artifact (`bns lists compile`): verified, stored, announced."""
        async with self._received(request) as upload:
            try:
                published = await self.publications.publish(upload)
            except ArtifactError as refused:  # named after the temporary file: say "the artifact" instead
                raise ArtifactError(str(refused).replace(str(upload), "the artifact")) from None
        return web.json_response(published.document(published.version), status=201)

    async def list_sources(self, _request: web.Request) -> web.Response:
        return web.json_response([asdict(entry) for entry in await self.sources.list()])

    async def upload_source(self, request: web.Request) -> web.Response:
        """The body is a list file in any supported format (gzip or not); `?name=` names it."""
        async with self._received(request) as upload:
            entry = await self.sources.add_upload(
                request.match_info["category"], request.query.get("name", "upload"), upload
            )
        return web.json_response(asdict(entry), status=201)

    async def path_source(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        entry = await self.sources.add_path(request.match_info["category"], body.get("path"))
        return web.json_response(asdict(entry), status=201)

    async def feed_source(self, request: web.Request) -> web.Response:
        """A feed: `url`, and optionally `interval` (seconds) and `format`; downloaded now, refused if unusable."""
        body = await self._object(request)
        entry = await self.feeds.add(
            request.match_info["category"], body.get("url"), body.get("interval"), body.get("format")
        )
        return web.json_response(asdict(entry), status=201)

    async def list_feeds(self, _request: web.Request) -> web.Response:
        return web.json_response(await self.feeds.report())

    async def refresh_feed(self, request: web.Request) -> web.Response:
        body = await self._object(request, optional=True)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise PolicyError("force", "must be true or false")
        return web.json_response(await self.feeds.request_refresh(request.match_info["source"], force), status=202)

    async def delete_source(self, request: web.Request) -> web.Response:
        await self.sources.remove(request.match_info["category"], request.match_info["source"])
        return web.json_response({"deleted": request.match_info["source"]})

    async def compile(self, request: web.Request) -> web.Response:
        body = await self._object(request, optional=True)
        publish = body.get("publish", False)
        if not isinstance(publish, bool):
            raise PolicyError("publish", "must be true or false")
        return web.json_response(self.sources.start_compile(publish).document(), status=202)

    async def compile_job(self, request: web.Request) -> web.Response:
        return web.json_response(self.sources.job(request.match_info["job"]).document())

    async def rollback(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        version = body.get("version")
        if not isinstance(version, str):
            raise PolicyError("version", "missing: the version to make current again")
        found = await self.publications.rollback(version)
        return web.json_response(found.document(found.version))


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/health",
        PUBLIC,
        "Is this node serving: its status without a token (200, or 503 while starting); with one, its store, "
        "list version, uptime and why it is degraded",
        Api.health,
    ),
    Route("GET", "/openapi.json", READ, "This document", Api.openapi),
    Route("GET", "/metrics", READ, "Prometheus metrics of this node", Api.metrics_text),
    Route("GET", "/v1/categories", READ, "The category catalogue", Api.categories, subscriber=True),
    Route("GET", "/v1/local/forwards", READ, "Each local.forward zone's health on this node", Api.forwards),
    Route("GET", "/v1/local/records", READ, "The operator's records written through the API", Api.get_records),
    Route(
        "PUT",
        "/v1/local/records",
        ADMIN,
        "Replace the operator's records, answered by every node beside local.records",
        Api.put_records,
        "Records",
    ),
    Route("GET", "/v1/sites", READ, "Every site id", Api.list_sites),
    Route(
        "POST",
        "/v1/sites",
        ADMIN,
        "Create or replace many sites (an array of site documents), all or none",
        Api.import_sites,
        "Sites",
    ),
    Route("GET", "/v1/sites/{site}", READ, "A site with its groups and devices", Api.get_site, subscriber=True),
    Route(
        "GET",
        "/v1/sites/{site}/alerts",
        READ,
        "The threat alerts of a site's devices, newest first, from every node",
        Api.alerts,
        subscriber=True,
    ),
    Route(
        "GET",
        "/v1/sites/{site}/status",
        READ,
        "What applies now to the site, each group and each configured device, as the resolver decides it: "
        "state (paused, scheduled, ok) and until when, the pause in force (level: device, group, subscriber), "
        "the block-all schedule in force and every running schedule (each until when), the governing level "
        "(device, group, subscriber, default) and profile, the group and how the device is in it (own, "
        "default, none), and valid_until",
        Api.status,
        subscriber=True,
        answer="SiteStatus",
    ),
    Route(
        "GET",
        "/v1/sites/{site}/devices",
        READ,
        "Every device seen or configured: vendor, group, status (the state) and effective (the whole status, as "
        "/v1/sites/{site}/status gives it), first and last seen, counts",
        Api.devices,
        subscriber=True,
    ),
    Route(
        "PATCH",
        "/v1/sites/{site}/devices/seen/{key}",
        ADMIN,
        "Name a seen device or put it in a group (it becomes a configured device)",
        Api.adopt_device,
        "SeenDevice",
        True,
    ),
    Route(
        "DELETE",
        "/v1/sites/{site}/devices/seen/{key}",
        ADMIN,
        "Forget a seen device: its record, activity, logged queries and alerts",
        Api.forget_device,
        subscriber=True,
    ),
    Route(
        "GET",
        "/v1/sites/{site}/activity",
        READ,
        "Counts by hour (verdicts, categories) and top blocked names, of the site or one device (?device=key), "
        "over the last ?hours=N (default: all kept)",
        Api.device_activity,
        subscriber=True,
    ),
    Route(
        "GET",
        "/v1/sites/{site}/queries",
        READ,
        "The site's recent queries, newest first, if it opted in (query_log)",
        Api.queries,
        subscriber=True,
    ),
    Route(
        "POST",
        "/v1/sites/{site}/tokens",
        ADMIN,
        "A site token for the subscriber: this site's own routes only, for some days",
        Api.issue_site_token,
        "SiteToken",
    ),
    Route("GET", "/v1/sites/{site}/tokens", READ, "The site's live site tokens: id, expiry", Api.list_site_tokens),
    Route(
        "DELETE",
        "/v1/sites/{site}/tokens/{id}",
        ADMIN,
        "Revoke a site token (refused at once, on every node)",
        Api.revoke_site_token,
    ),
    Route("PUT", "/v1/sites/{site}", ADMIN, "Create or replace a whole site", Api.put_site, "Site"),
    Route("PATCH", "/v1/sites/{site}", ADMIN, "Change some of a site's own fields", Api.patch_site, "SiteFields"),
    Route("DELETE", "/v1/sites/{site}", ADMIN, "Delete a site", Api.delete_site),
    Route("PUT", "/v1/sites/{site}/groups/{group}", ADMIN, "Create or change a group", Api.put_group, "Group", True),
    Route(
        "DELETE",
        "/v1/sites/{site}/groups/{group}",
        ADMIN,
        "Delete a group (its devices stay)",
        Api.delete_group,
        subscriber=True,
    ),
    Route(
        "PUT", "/v1/sites/{site}/devices/{device}", ADMIN, "Create or change a device", Api.put_device, "Device", True
    ),
    Route("DELETE", "/v1/sites/{site}/devices/{device}", ADMIN, "Delete a device", Api.delete_device, subscriber=True),
    Route(
        "POST",
        "/v1/sites/{site}/devices/{device}/client-id",
        ADMIN,
        "A new random client id for the device (26 lowercase base32 characters), replacing every one it had: its "
        "credential over DoT and DoH from anywhere, with the Private DNS host name and DoH template it goes in",
        Api.renew_client_id,
        subscriber=True,
        answer="ClientId",
    ),
    *(
        route
        for prefix in ("/v1/sites/{site}", "/v1/sites/{site}/groups/{group}", "/v1/sites/{site}/devices/{device}")
        for route in (
            Route(
                "PUT",
                f"{prefix}/policy",
                ADMIN,
                "Set the policy (categories, allow, deny, schedules…)",
                Api.put_policy,
                "Policy",
                True,
            ),
            Route("DELETE", f"{prefix}/policy", ADMIN, "Remove the policy", Api.delete_policy, subscriber=True),
            Route(
                "POST",
                f"{prefix}/pause",
                ADMIN,
                "Pause: block everything for some minutes, until a time, or until unpaused",
                Api.pause,
                "Pause",
                True,
            ),
            Route("POST", f"{prefix}/unpause", ADMIN, "End a pause", Api.unpause, subscriber=True),
        )
    ),
    Route("PUT", "/v1/profiles/{profile}", ADMIN, "Create or change a policy profile", Api.put_profile, "Policy"),
    Route("DELETE", "/v1/profiles/{profile}", ADMIN, "Delete a policy profile", Api.delete_profile),
    Route("POST", "/v1/why", READ, "Why a name is or is not blocked for a client at a time", Api.why, "Why"),
    Route("GET", "/v1/lists", READ, "Published list versions and the current one", Api.list_versions),
    Route("POST", "/v1/lists", ADMIN, "Publish a compiled artifact to every node", Api.publish, "Artifact"),
    Route("GET", "/v1/sources", READ, "Every list source, by category", Api.list_sources),
    Route(
        "POST",
        "/v1/sources/{category}",
        ADMIN,
        "Add an uploaded list file (any format, gzip or not; ?name=)",
        Api.upload_source,
        "Source",
    ),
    Route(
        "POST",
        "/v1/sources/{category}/path",
        ADMIN,
        "Add a list file on the server (under admin.source_roots)",
        Api.path_source,
        "SourcePath",
    ),
    Route(
        "POST",
        "/v1/sources/{category}/feed",
        ADMIN,
        "Add a feed: a list fetched by URL and kept current (downloaded now, refused if unusable)",
        Api.feed_source,
        "SourceFeed",
    ),
    Route("DELETE", "/v1/sources/{category}/{source}", ADMIN, "Remove a source", Api.delete_source),
    Route(
        "GET", "/v1/lists/feeds", READ, "Every feed's health: last download, error, entries, 304s, age", Api.list_feeds
    ),
    Route(
        "POST",
        "/v1/lists/feeds/{source}/refresh",
        ADMIN,
        "Download a feed at the lease holder's next look; force: take it even if it shrank (202)",
        Api.refresh_feed,
        "FeedRefresh",
    ),
    Route(
        "POST",
        "/v1/lists/compile",
        ADMIN,
        "Compile every source into a list, and publish it if asked (202: a job to poll)",
        Api.compile,
        "Compile",
    ),
    Route("GET", "/v1/lists/compile/{job}", READ, "A compile job's progress and result", Api.compile_job),
    Route("POST", "/v1/lists/rollback", ADMIN, "Make an earlier version current again", Api.rollback, "Rollback"),
)

_BODIES: dict[str, dict[str, Any]] = {
    "Site": {"type": "object", "description": "A site document (see docs/policies.md)", "required": []},
    "Sites": {"type": "array", "items": {"$ref": "#/components/schemas/Site"}},
    "SiteFields": {"type": "object", "description": "name, networks, cpe_ids, timezone, mode, default_group"},
    "Group": {"type": "object", "properties": {"name": {"type": "string"}, "policy": {"type": "object"}}},
    "Device": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "macs": {"type": "array", "items": {"type": "string"}},
            "client_ids": {"type": "array", "items": {"type": "string"}},
            "addresses": {"type": "array", "items": {"type": "string"}},
            "group": {"type": "string"},
            "passes": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": 'name → RFC 3339 end: where the device chose "continue anyway"',
            },
        },
    },
    "Policy": {
        "type": "object",
        "properties": {
            "profile": {"type": "string"},
            "block": {"type": "array", "items": {"type": "string"}},
            "web_protect": {"type": "boolean"},
            "allow": {"type": "array", "items": {"type": "string"}},
            "deny": {"type": "array", "items": {"type": "string"}},
            "schedules": {"type": "array"},
            "safe_search": {"type": "boolean"},
            "answer": {"enum": ["nxdomain", "nodata", "null", "page"]},
            "canaries": {
                "type": "boolean",
                "description": "answer the bypass canaries (Firefox's, iCloud Private Relay's) NXDOMAIN; default true",
            },
        },
    },
    "Pause": {"type": "object", "properties": {"minutes": {"type": "number"}, "until": {"type": "string"}}},
    "SiteToken": {"type": "object", "properties": {"days": {"type": "number", "description": "default 30"}}},
    "SeenDevice": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "group": {"type": ["string", "null"]}},
    },
    "Why": {
        "type": "object",
        "required": ["name", "address"],
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string"},
            "mac": {"type": "string"},
            "client_id": {"type": "string"},
            "cpe_id": {"type": "string"},
            "at": {"type": "string"},
            "cnames": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the CNAME chain an upstream answered the name with, judged like the resolver",
            },
        },
    },
    "Rollback": {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}},
    "Status": {
        "type": "object",
        "description": "What applies now, worked out by the resolver's own code (the app shows it as it is). Times "
        'are RFC 3339 in UTC, or "forever".',
        "properties": {
            "state": {
                "enum": ["paused", "scheduled", "ok"],
                "description": "every name blocked by a pause, every name blocked by a schedule, or the policy's rules",
            },
            "until": {"type": ["string", "null"], "description": "when the pause or the schedule of `state` ends"},
            "pause": {
                "type": ["object", "null"],
                "description": "the pause in force, whatever `state` shows",
                "properties": {"level": {"enum": ["device", "group", "subscriber"]}, "until": {"type": "string"}},
            },
            "schedule": {
                "type": ["object", "null"],
                "description": "the block-all schedule in force (under a pause too)",
                "properties": {"name": {"type": "string"}, "until": {"type": "string"}},
            },
            "schedules": {
                "type": "array",
                "description": "every schedule of the governing policy running now",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "block": {"description": '"all" or the categories it blocks'},
                        "until": {"type": "string"},
                    },
                },
            },
            "level": {
                "enum": ["device", "group", "subscriber", "default"],
                "description": "whose policy governs: the device's, its group's, the site's (network mode) or "
                "the node's default",
            },
            "profile": {"type": ["string", "null"], "description": "the profile the governing policy names"},
            "group": {"type": ["string", "null"], "description": "the group the resolver puts the device in"},
            "membership": {
                "enum": ["own", "default", "none"],
                "description": "the device's own group, the site's default group (a device the site does not "
                "know), or none",
            },
            "valid_until": {"type": "string", "description": "the next moment any of this may change"},
        },
    },
    "SiteStatus": {
        "type": "object",
        "properties": {
            "at": {"type": "string"},
            "site": {
                "$ref": "#/components/schemas/Status",
                "description": "a device in no group with nothing of its own: the site's pause and, in network "
                "mode, its policy",
            },
            "groups": {
                "type": "object",
                "description": "group id → what a member with no pause or policy of its own follows",
                "additionalProperties": {"$ref": "#/components/schemas/Status"},
            },
            "devices": {
                "type": "object",
                "description": "configured device id → its status",
                "additionalProperties": {"$ref": "#/components/schemas/Status"},
            },
        },
    },
    "ClientId": {
        "type": "object",
        "properties": {
            "site": {"type": "string"},
            "device": {"type": "string"},
            "client_id": {"type": "string", "description": "26 lowercase base32 characters"},
            "version": {"type": "integer", "description": "the site's version after the write"},
            "private_dns": {"type": "string", "description": "{client_id}.{tls.name}, when tls.name is set"},
            "doh_template": {"type": "string", "description": "https://{tls.name}{tls.doh_path}/{client_id}"},
        },
    },
    "SourcePath": {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}},
    "SourceFeed": {
        "type": "object",
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "description": "http or https"},
            "interval": {"type": "number", "description": "seconds between refreshes (default feeds.interval)"},
            "format": {"type": "string", "description": "the list's format, when it must not be detected"},
        },
    },
    "FeedRefresh": {"type": "object", "properties": {"force": {"type": "boolean"}}},
    "Records": {
        "type": "object",
        "required": ["records"],
        "properties": {"records": {"type": "array", "items": {"type": "string"}, "description": "zone-file lines"}},
    },
    "Compile": {"type": "object", "properties": {"publish": {"type": "boolean"}}},
}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "security": [{}, {"bearer": []}] if route.role == PUBLIC else [{"bearer": []}],  # {}: no token needed
            "x-role": route.role,
            "x-site-token": route.subscriber,
            "responses": {
                "200": {"description": "OK"}
                if route.answer is None
                else {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.answer}"}}},
                },
                "401": {"$ref": "#/components/responses/Error"},
                "403": {"$ref": "#/components/responses/Error"},
            },
        }
        parameters = [
            {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for part in route.path.split("/")
            if part.startswith("{")
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.body in ("Artifact", "Source"):
            operation["requestBody"] = {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        elif route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}},
            }
            operation["responses"]["422"] = {"$ref": "#/components/responses/Error"}
        if route.body is not None:
            operation["responses"]["413"] = {"$ref": "#/components/responses/Error"}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "bns admin API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _BODIES,
            "responses": {
                "Error": {
                    "description": "An error",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "error": {
                                        "type": "object",
                                        "properties": {
                                            "status": {"type": "integer"},
                                            "message": {"type": "string"},
                                            "field": {"type": "string"},
                                            "hint": {
                                                "type": "string",
                                                "description": "what to do next, when the client cannot "
                                                "know (a 401 from a node with no token configured)",
                                            },
                                            "outcome": {
                                                "enum": ["unknown"],
                                                "description": "504: the write may or may not have "
                                                "been applied; read it back",
                                            },
                                        },
                                    }
                                },
                            }
                        }
                    },
                }
            },
        },
    }
