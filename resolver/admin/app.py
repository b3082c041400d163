"""The subscriber's app: static files the admin process serves at `/app/` on the admin API's listener.

The page is plain HTML, CSS and one script (`app_files/`). It holds no secret of its own and needs no token to
load: every piece of data comes from the JSON API, with the site token in `Authorization: Bearer`. The login
link is `<admin>/app/#token=site.…`; the fragment never reaches a server, the script keeps the token in
sessionStorage and takes it out of the address bar. No route here sets or reads a cookie, so a page on another
site cannot make the browser send the credential (the CSRF defence); the headers below keep the page out of
frames, keep its address out of Referer, and allow only its own script and style (no inline code).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

FILES = Path(__file__).with_name("app_files")
PREFIX = "/app/"
_TYPES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css", "icon.svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


async def _index(_request: web.Request) -> web.StreamResponse:
    return _file("index.html", "no-store")


async def _asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in _TYPES:
        raise web.HTTPNotFound()
    # The page itself is never stored; its script and style are revalidated (ETag) each time, so an upgrade of
    # bns shows at once.
    return _file(name, "no-store" if name == "index.html" else "no-cache")


async def _to_index(_request: web.Request) -> web.StreamResponse:
    return web.Response(status=308, headers={**SECURITY_HEADERS, "Location": PREFIX})


def _file(name: str, cache: str) -> web.FileResponse:
    response = web.FileResponse(FILES / name, headers={**SECURITY_HEADERS, "Cache-Control": cache})
    response.content_type = _TYPES[name]
    if _TYPES[name].startswith("text/"):
        response.charset = "utf-8"
    return response


def add_app_routes(app: web.Application) -> None:
    """GET (and HEAD) `/app`, `/app/` and its few files; nothing else, so no path can reach another file."""
    app.router.add_get(PREFIX.rstrip("/"), _to_index)
    app.router.add_get(PREFIX, _index)
    app.router.add_get(PREFIX + "{name}", _asset)
