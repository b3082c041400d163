"""Headless Chromium driven over the DevTools protocol (aiohttp's WebSocket client): open a page, read it,
click an element with real mouse events (and, in a one-page app, without waiting for a page load), type, wait
for the page to show something, size the viewport as a phone's or a desktop's, take a screenshot, read a
screenshot's pixels back. Also what a managed browser is given: policies (Chromium reads them from
/etc/chromium/policies/managed on Linux) and a CA trusted through NSS."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_process import REPO

WIDTH, HEIGHT = 1000, 700
# Where the browser tests keep their screenshots (CI uploads them).
ARTIFACTS = Path(os.environ.get("BNS_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
POLICIES = Path("/etc/chromium/policies/managed")  # Chromium's (Debian's build) on Linux; Chrome's is /etc/opt/chrome


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@contextmanager
def managed_policies(policies: dict[str, Any]) -> Iterator[None]:
    """Policies every Chromium started meanwhile on this machine takes, as an administrator's managed browser
    would: a file of its own in POLICIES, always removed. Skips the test where that directory cannot be written
    (not root)."""
    path = POLICIES / f"bns-test-{uuid.uuid4().hex[:12]}.json"
    try:
        POLICIES.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(policies))
    except OSError as exc:
        pytest.skip(f"cannot write Chromium's managed policies in {POLICIES} ({exc.strerror}); CI runs as root")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def trust(authority: Path, home: Path) -> None:
    """An NSS database in `home` (where Chromium on Linux looks: $HOME/.pki/nssdb) that trusts the CA certificate
    `authority` to identify servers."""
    database = home / ".pki" / "nssdb"
    database.mkdir(parents=True)
    for command in (
        ["certutil", "-N", "--empty-password", "-d", f"sql:{database}"],
        ["certutil", "-A", "-n", "bns-test", "-t", "C,,", "-i", str(authority), "-d", f"sql:{database}"],
    ):
        subprocess.run(command, check=True, capture_output=True, timeout=30)


class Browser:
    """One headless Chromium with its own profile in `profile`; `resolve` maps host names to addresses, as a
    DNS answer would (the browser cannot be pointed at a DNS server on a test port, but for DNS over HTTPS: a
    name it does not map, it resolves as its secure DNS settings say). `home`: its $HOME, whose NSS database
    (`trust`) says which CAs it trusts."""

    def __init__(self, resolve: dict[str, str], profile: Path, home: Path | None = None) -> None:
        self._resolve = resolve
        self._profile = profile
        self._home = home
        self._process: subprocess.Popen[str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Browser:
        binary = chromium_binary()
        assert binary is not None
        rules = ",".join(f"MAP {name} {address}" for name, address in self._resolve.items())
        self._process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self._profile}",
                f"--window-size={WIDTH},{HEIGHT}",
                f"--host-resolver-rules={rules},EXCLUDE localhost",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "HOME": str(self._home)} if self._home is not None else None,
        )
        endpoint = await asyncio.wait_for(asyncio.to_thread(self._devtools_endpoint), 30)
        self._session = aiohttp.ClientSession()
        port = re.search(r":(\d+)/", endpoint).group(1)  # type: ignore[union-attr]
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(target for target in targets if target["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False
        )
        return self

    def _devtools_endpoint(self) -> str:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                return found.group(1)
        raise RuntimeError(f"chromium exited with {self._process.wait()} before listening")

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._replies:
                self._replies.pop(data["id"]).set_result(data)
            elif "method" in data:
                self._events.put_nowait(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        reply = self._replies[call_id] = asyncio.get_running_loop().create_future()
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        data = await asyncio.wait_for(reply, 30)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data["result"]

    async def _loaded(self) -> None:
        while (await asyncio.wait_for(self._events.get(), 30))["method"] != "Page.loadEventFired":
            pass

    async def open(self, url: str) -> str | None:
        """Go to `url` and wait for the page (or the browser's error page) to load; returns the navigation's net
        error (net::ERR_NAME_NOT_RESOLVED…), None when it loaded."""
        self._drain()
        navigated = await self.send("Page.navigate", url=url)
        await self._loaded()
        return navigated.get("errorText") or None

    def _drain(self) -> None:
        while not self._events.empty():
            self._events.get_nowait()

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def click(self, selector: str) -> None:
        """A real click (mouse down and up at the element's centre), then wait for the next page load."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        self._drain()
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        await self._loaded()

    async def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        """The page's size, as a phone (`mobile`: the page's viewport meta applies, touch-sized) or a desktop."""
        await self.send(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile
        )

    async def press(self, selector: str) -> float:
        """A real click on the element, scrolled into view, with no page load to wait for (a button in a one-page
        app); fails if something else covers the element's centre. Returns time.monotonic() at the release."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center', inline: 'center'}); const r = e.getBoundingClientRect();"
            " const x = r.x + r.width / 2, y = r.y + r.height / 2; const hit = document.elementFromPoint(x, y);"
            " return [x, y, r.width > 0 && r.height > 0 && !!hit && (hit === e || e.contains(hit))]; })()"
        )
        assert box is not None, f"nothing matches {selector}"
        assert box[2], f"{selector} is hidden or covered where a finger would press it"
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        return time.monotonic()

    async def type_text(self, selector: str, text: str, replace: bool = True) -> None:
        """Click into a text field and type `text` (as a keyboard's input method would insert it); with
        `replace`, select what it holds first so the typing replaces it."""
        await self.press(selector)
        if replace:
            await self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        await self.send("Input.insertText", text=text)

    async def keys(self, text: str) -> None:
        """Key presses, one per character, into the focused element (a time field takes its digits so)."""
        for character in text:
            await self.send("Input.dispatchKeyEvent", type="keyDown", text=character, key=character)
            await self.send("Input.dispatchKeyEvent", type="keyUp", key=character)

    async def wait_for(self, expression: str, timeout: float = 5.0) -> Any:
        """Polls a JavaScript expression until it is truthy (an element found counts as true); returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(f"(() => {{ const v = ({expression}); return v instanceof Node || v; }})()")
            if value:
                return value
            assert time.monotonic() < deadline, f"not within {timeout} s: {expression}"
            await asyncio.sleep(0.02)

    async def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(png)
        return png

    async def pixel(self, png: bytes, x: int, y: int) -> list[int]:
        """The RGBA of one pixel of a PNG, decoded by the browser itself (a canvas on a blank page)."""
        await self.open("about:blank")
        data_url = "data:image/png;base64," + base64.b64encode(png).decode()
        return await self.evaluate(
            "new Promise(done => { const image = new Image(); image.onload = () => { "
            "const canvas = document.createElement('canvas'); canvas.width = image.width; "
            "canvas.height = image.height; const context = canvas.getContext('2d'); context.drawImage(image, 0, 0); "
            f"done(Array.from(context.getImageData({x}, {y}, 1, 1).data)); }}; image.src = {json.dumps(data_url)}; }})"
        )
