"""A whole `bns serve` with DoT and DoH: two workers on shared ports, real clients (kdig, dnspython, OpenSSL), TLS
sessions resumed whichever worker takes the next connection, the certificate replaced and reloaded on SIGHUP, and a
bad certificate refused by `bns config --check` with the key named; headless Chromium set to secure DNS with a
device's DoH template (issue 20's browser), filtered, paused and alerted as that device."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.message
import dns.query
import pytest

from bench.upstream import Script, ScriptedUpstream
from tests.certificates import NAME, Authority
from tests.conftest import answer_addresses, eventually
from tests.e2e.chromium import ARTIFACTS, Browser, chromium_binary, managed_policies, trust
from tests.e2e.test_admin import ADMIN, http
from tests.e2e.test_pages import page_address
from tests.e2e.test_process import bns, node

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig is not installed (Debian: knot-dnsutils)")
def test_a_node_serves_dot_and_doh_resumes_sessions_on_any_worker_and_takes_a_new_certificate_on_sighup(
    tmp_path, upstream
):
    authority = Authority(tmp_path / "ca")
    live = authority.issue("live")
    config = tmp_path / "bns.toml"
    config.write_text(
        f'[tls]\ndot_listen = ["127.0.0.1:0"]\ndoh_listen = ["127.0.0.1:0"]\ncertificate = "{live.certificate}"\n'
        f'key = "{live.key}"\nname = "{NAME}"\n'
    )
    args = ("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2")
    with node(*args) as (process, _port, _admin):
        found = re.search(r"dot 127\.0\.0\.1:(\d+), doh 127\.0\.0\.1:(\d+)", process.log)
        assert found, process.log
        dot, doh = int(found.group(1)), int(found.group(2))
        ask = ["kdig", "@127.0.0.1", "-p", str(dot), "+tls", f"+tls-ca={authority.path}", f"+tls-hostname={NAME}"]
        kdig = subprocess.run(
            [*ask, "+timeout=3", "example.com"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert "status: NOERROR" in kdig.stdout, kdig.stdout + kdig.stderr
        context = ssl.create_default_context(cafile=str(authority.path))
        query = dns.message.make_query("example.com", "A")
        doh_url = f"https://{NAME}:{doh}/dns-query"
        assert answer_addresses(dns.query.https(query, doh_url, bootstrap_address="127.0.0.1", verify=context))

        def connect(session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
            sock = context.wrap_socket(
                socket.create_connection(("127.0.0.1", dot)), server_hostname=NAME, session=session
            )
            dns.query.tls(query, "127.0.0.1", sock=sock, timeout=3)  # TLS 1.3: the tickets come after the handshake
            return sock

        with connect() as first:
            session, serial = first.session, first.getpeercert()["serialNumber"]
        resumed = []
        for _ in range(8):  # new source ports: the kernel spreads them over both workers
            with connect(session) as again:
                resumed.append(again.session_reused)
        assert all(resumed), resumed  # every worker took the one session ticket: their keys are the same

        second = authority.issue("second")
        os.replace(second.certificate, live.certificate)
        os.replace(second.key, live.key)
        process.send_signal(signal.SIGHUP)

        def new_serial() -> bool:
            with connect() as sock:
                return sock.getpeercert()["serialNumber"] != serial

        eventually(lambda: all(new_serial() for _ in range(6)), 5)  # on both workers
        eventually(lambda: process.log.count("TLS certificate") >= 2, 5)
    assert "SIGHUP: nothing to apply but the TLS certificate files" in process.log


def test_config_check_names_the_key_of_a_bad_certificate(tmp_path):
    authority = Authority(tmp_path / "ca")
    expired = authority.issue("expired", valid_from=-datetime.timedelta(days=10), valid_for=datetime.timedelta(days=1))
    config = tmp_path / "bns.toml"
    config.write_text(
        f'[tls]\ndot_listen = ["127.0.0.1:0"]\ncertificate = "{expired.certificate}"\nkey = "{expired.key}"\n'
        f'name = "{NAME}"\n'
    )
    checked = subprocess.run(bns("config", "--check", str(config)), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2
    assert f"tls.certificate: {expired.certificate} expired on " in checked.stderr
    Path(expired.certificate).unlink()
    checked = subprocess.run(bns("config", "--check", str(config)), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2 and "tls.certificate: cannot read" in checked.stderr


class _Site(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>reached</title><p>reached through bns</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def web_site() -> Iterator[tuple[str, int]]:
    """A web site on a loopback address of its own, which a browser finds only if bns resolved its name there:
    (address, port)."""
    address, _ = page_address()
    server = ThreadingHTTPServer((address, 0), _Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield address, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def doh_responses(api: str) -> int:
    """The DoH queries the node has answered (status 200), by its metrics (workers write them every second)."""
    metrics = str(http(api, "GET", "/metrics")[1])
    found = re.search(r'^bns_doh_responses_total\{status="200"\} (\d+)', metrics, re.MULTILINE)
    return int(found.group(1)) if found else 0


# A public DoH server of tests/fixtures/encrypted-dns.txt.gz (the `lists` fixture) whose domain is not on Chromium's
# HSTS preload list: the browser asks for http:// there, and shows the page. (dns.google, dns.quad9.net and
# doh.mullvad.net are on it: the browser would go to https:// on the page address, where nothing answers.)
BYPASS = "dns.nextdns.io"


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(shutil.which("certutil") is None, reason="certutil is not installed (Debian: libnss3-tools)")
def test_chromium_with_secure_dns_to_a_devices_template_is_filtered_paused_and_alerted_as_that_device(
    tmp_path, lists, shared_redis, redis_prefix
):
    """Issue 20's browser: Chromium set by managed policy to secure DNS only, with the DoH template (its client id
    in the path) the API gives a subscriber's phone, trusting the test CA through NSS and told no address but
    the DoH server's. It gets the block page for a listed name and reaches a site bns resolves; its reach for a
    public DoH server is blocked and alerted as the phone's; paused from the API with the site's token, it
    resolves nothing within a second. The phone has no address in its site: only its client id tells bns whose
    the queries are."""
    authority = Authority(tmp_path / "ca")
    pair = authority.issue()
    page, pages_port = page_address()
    # Upstream, every name is NXDOMAIN but those given a loopback address: the browser goes nowhere else.
    script = Script(ttl=300, mode="nxdomain")
    config = tmp_path / "bns.toml"
    config.write_text(
        f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"\n'
        f'[lists]\npath = "{lists}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[policy]\nblock_page = ["{page}"]\n[pages]\nport = {pages_port}\n'
        f'[tls]\ndoh_listen = ["127.0.0.1:0"]\ncertificate = "{pair.certificate}"\nkey = "{pair.key}"\n'
        f'name = "{NAME}"\n[admin]\ntokens = ["{ADMIN}"]\n[activity]\nhand_over_seconds = 0.5\n'
    )
    home = tmp_path / "home"
    trust(authority.path, home)
    with (
        web_site() as (site_address, site_port),
        ScriptedUpstream(script=script) as upstream,
        node(
            "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2",
            token=ADMIN,
        ) as (process, _dns_port, api),
    ):  # fmt: skip
        assert api is not None
        doh = int(re.search(r"doh 127\.0\.0\.1:(\d+)", process.log).group(1))  # type: ignore[union-attr]
        # The node answers blocks NXDOMAIN, and so pauses (a pause takes the node's answer mode); the phone's own
        # rules answer its blocks with the block page. The page judges by the address the browser comes from
        # (127.0.0.1, in no site: the global default, which blocks drugs and encrypted DNS too), so it cannot tell
        # a roaming phone's pause: with the node's `answer = "page"`, the paused browser got "Nothing to show".
        phone = {"name": "Phone", "policy": {"block": ["drugs", "encrypted-dns"], "answer": "page"}}
        document = {"name": "Roaming", "networks": [], "mode": "device", "devices": {"phone": phone}}
        assert http(api, "PUT", "/v1/sites/roaming", document)[0] == 200
        token = http(api, "POST", "/v1/sites/roaming/tokens", {"days": 1})[1]["token"]  # type: ignore[index]
        status, issued = http(api, "POST", "/v1/sites/roaming/devices/phone/client-id", token=token)
        assert status == 200, issued
        client_id = issued["client_id"]  # type: ignore[index]
        template = issued["doh_template"]  # type: ignore[index]
        assert template == f"https://{NAME}/dns-query/{client_id}"

        # Each worker takes the id for the phone's from its first query on (until the store has said, the global
        # default answers): new connections, which the kernel spreads over both, until every one is the phone's.
        context = ssl.create_default_context(cafile=str(authority.path))
        warm_up = 0

        def as_the_phone() -> bool:
            nonlocal warm_up
            warm_up += 1
            query = dns.message.make_query("drug.example", "A")
            url = f"https://{NAME}:{doh}/dns-query/{client_id}"
            return answer_addresses(dns.query.https(query, url, bootstrap_address="127.0.0.1", verify=context)) == [
                page
            ]

        eventually(lambda: all(as_the_phone() for _ in range(8)), 5)

        def reachable(name: str) -> str:
            script.modes[name], script.addresses[name] = "answer", site_address
            return f"http://{name}:{site_port}/"

        policies = {
            "DnsOverHttpsMode": "secure",  # DoH only: no fallback to the system's resolver
            # The phone's template as the API gave it, with this test's port (without `{?dns}`, Chromium POSTs).
            "DnsOverHttpsTemplates": template.replace(f"https://{NAME}/", f"https://{NAME}:{doh}/"),
        }
        opened: list[str] = []

        async def browse() -> dict[str, object]:
            seen: dict[str, object] = {}
            # Only the DoH server's own name is mapped: the browser asks bns for every other one, over DoH.
            async with Browser({NAME: "127.0.0.1"}, tmp_path / "chromium", home) as browser:

                async def visit(url: str) -> str | None:
                    opened.append(url)
                    return await browser.open(url)

                seen["block error"] = await visit(f"http://drug.example:{pages_port}/")
                seen["block"] = await browser.evaluate("document.body.innerText")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                await browser.screenshot(ARTIFACTS / "secure-dns-block-page.png")
                seen["site error"] = await visit(reachable("open.example"))
                seen["site"] = await browser.evaluate("document.body.innerText")
                seen["bypass error"] = await visit(f"http://{BYPASS}:{pages_port}/dns-query")
                seen["bypass"] = await browser.evaluate("document.body.innerText")

                paused = time.monotonic()
                assert (
                    http(api, "POST", "/v1/sites/roaming/devices/phone/pause", {"minutes": 30}, token=token)[0] == 200
                )
                while (error := await visit(reachable(f"new-{uuid.uuid4().hex[:6]}.example"))) is None:
                    assert time.monotonic() - paused < 1.0, "the paused phone's browser still resolves new names"
                seen["paused after"], seen["paused error"] = time.monotonic() - paused, error
            return seen

        with managed_policies(policies):
            seen = asyncio.run(browse())
        assert seen["block error"] is None and "drug.example is blocked on this network" in str(seen["block"])
        assert "Drugs: Sale, production and promotion of illegal drugs" in str(seen["block"]), seen["block"]
        assert (seen["site error"], seen["site"]) == (None, "reached through bns")
        assert seen["bypass error"] is None and f"{BYPASS} is blocked" in str(seen["bypass"]), seen["bypass"]
        assert "Encrypted DNS: Public DNS-over-HTTPS" in str(seen["bypass"]), seen["bypass"]
        assert seen["paused error"] == "net::ERR_NAME_NOT_RESOLVED"
        print(f"paused: the browser resolved nothing {seen['paused after']:.2f} s after the API call")
        # Asked by the browser alone, and only of bns (over DoH): its upstream saw the site's name, never BYPASS.
        assert "open.example" in upstream.names_seen() and BYPASS not in upstream.names_seen()
        eventually(lambda: doh_responses(api) >= warm_up + len(opened), 3)  # an A query at least per page opened

        def alerted() -> bool:  # once per device and domain, named as first asked: A, AAAA or (not port 80) HTTPS
            alerts = http(api, "GET", "/v1/sites/roaming/alerts", token=token)[1]["alerts"]  # type: ignore[index]
            return any(
                (alert["device"], alert["reason"]) == ("device:phone", "bypass")
                and re.fullmatch(rf"(_{pages_port}\._https\.)?{re.escape(BYPASS)}", alert["name"])
                for alert in alerts
            )

        eventually(alerted, 5)
        listed = http(api, "GET", "/v1/sites/roaming/devices", token=token)[1]["devices"]  # type: ignore[index]
        assert {entry["key"]: entry["device"] for entry in listed} == {"device:phone": "phone"}, listed
        # the id is the phone's credential from anywhere: neither an alert nor the device list shows it
        assert client_id not in json.dumps(listed) and client_id not in json.dumps(
            http(api, "GET", "/v1/sites/roaming/alerts", token=token)[1]
        )
