"""The block and warning pages of a whole `bns serve` node (real Redis, real DNS and HTTP clients, headless
Chromium): what they show, and "continue anyway", which opens one name for one device and nothing else."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import random
import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPConnection
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import pytest

from resolver.shared.page_pool import slot
from tests.conftest import eventually
from tests.e2e.chromium import Browser, chromium_binary
from tests.e2e.test_admin import ADMIN, http
from tests.e2e.test_process import bns, node

pytestmark = pytest.mark.e2e
PHISH, BOTH, DRUGS, FINE = "phish.example", "both.example", "drugs.example", "fine.example"
LAPTOP, PHONE, STRANGER = "127.0.0.1", "127.0.0.2", "127.0.0.3"  # the phone and stranger: other sources
MALWARE = "malware.example"
SITE = {
    "name": "Home",
    "networks": ["127.0.0.0/8"],
    "mode": "device",
    "timezone": "Asia/Tokyo",
    "devices": {"laptop": {"name": "Laptop", "addresses": [LAPTOP]}, "phone": {"name": "Phone", "addresses": [PHONE]}},
}


def page_address() -> tuple[str, int]:
    """A loopback address of its own for the pages, and a free port on it."""
    address = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    with socket.socket() as probe:
        probe.bind((address, 0))
        return address, probe.getsockname()[1]


@contextmanager
def page_node(
    tmp_path: Path,
    upstream,
    store: str,
    put_site: bool = True,
    lists: str = "",
    pages: str = "",
    identity: str = "",
) -> Iterator[tuple[int, str, str, int]]:
    """A node whose warnings and blocks answer with the page address: (DNS port, API, page address, port).
    `pages` and `identity`: more keys of those sections."""
    tsv = tmp_path / "names.tsv"
    tsv.write_text(f"{PHISH}\tphishing\n{BOTH}\tphishing,drugs\n{DRUGS}\tdrugs\n{MALWARE}\tmalware\n")
    artifact = tmp_path / "lists.bns"
    compiled = subprocess.run(
        bns("lists", "compile", "--out", str(artifact), "--tsv", str(tsv)), capture_output=True, text=True, timeout=60
    )
    assert compiled.returncode == 0, compiled.stderr
    address, port = page_address()
    config = tmp_path / "bns.toml"
    config.write_text(
        f'{store}\n[lists]\npath = "{artifact}"\ncache_dir = "{tmp_path / "cache"}"\n{lists}\n'
        f'[policy]\nanswer = "page"\nblock_page = ["{address}"]\nwarning_page = ["{address}"]\n'
        f'[pages]\nport = {port}\npass_minutes = 30\n{pages}\n[admin]\ntokens = ["{ADMIN}"]\n'
        f"[identity]\n{identity}\n[activity]\nhand_over_seconds = 0.5\n"
    )
    with node(
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.address,
        "--workers",
        "2",
        token=ADMIN,
    ) as (
        _process,
        dns_port,
        api,
    ):
        assert api is not None
        if put_site:
            assert http(api, "PUT", "/v1/sites/home", SITE)[0] == 200
        yield dns_port, api, address, port


def resolve(dns_port: int, name: str, source: str = LAPTOP, mac: str | None = None) -> tuple[list[str], str | None]:
    """The A addresses answered to `source` (a router adding `mac`), and the EDE text if any."""
    options = [dns.edns.GenericOption(65001, bytes.fromhex(mac.replace(":", "")))] if mac else []
    response = dns.query.udp(
        dns.message.make_query(name, "A", use_edns=0, options=options),
        "127.0.0.1",
        port=dns_port,
        timeout=3,
        source=source,
    )
    addresses = [item.address for rrset in response.answer for item in rrset if hasattr(item, "address")]
    texts = [option.text for option in response.options if option.otype == dns.edns.OptionType.EDE]
    return addresses, texts[0] if texts else None


def fetch(
    address: str, port: int, name: str, source: str = LAPTOP, token: str | None = None, **headers: str
) -> tuple[int, str]:
    """GET the page for `name` (or POST its continue form with `token`) from `source`, as a browser would."""
    connection = HTTPConnection(address, port, timeout=10, source_address=(source, 0))
    try:
        if token is None:
            connection.request("GET", "/some/path?q=1", headers={"Host": name})
        else:
            connection.request(
                "POST",
                "/.well-known/bns/continue",
                body=f"token={token}",
                headers={
                    "Host": name,
                    "Content-Type": "application/x-www-form-urlencoded",
                    **{key.replace("_", "-"): value for key, value in headers.items()},
                },
            )
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def headers_of(address: str, port: int, name: str) -> tuple[dict[str, str], str]:
    """The headers and the text of the page for `name`."""
    connection = HTTPConnection(address, port, timeout=10, source_address=(LAPTOP, 0))
    try:
        connection.request("GET", "/", headers={"Host": name})
        response = connection.getresponse()
        return dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def token_in(page: str) -> str:
    found = re.search(r'name="token" value="([^"]+)"', page)
    assert found, "the page has no continue button"
    return found.group(1)


def every_answer(dns_port: int, name: str, source: str, check, tries: int = 12, mac: str | None = None) -> bool:
    return all(check(resolve(dns_port, name, source, mac)) for _ in range(tries))


@pytest.fixture
def store(shared_redis, redis_prefix) -> str:
    return f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"'


def test_continue_anyway_opens_the_name_for_that_device_only(tmp_path, upstream, store):
    with page_node(tmp_path, upstream, store) as (dns_port, api, address, port):
        assert resolve(dns_port, PHISH) == ([address], "Web Protect: phishing")
        status, page = fetch(address, port, PHISH)
        assert status == 403 and "Warning" in page and "Phishing" in page and "Continue anyway" in page
        token = token_in(page)

        # A script on some page posting the button's token (DNS rebinding) is refused; the token stays good.
        status, page = fetch(address, port, PHISH, token=token, Sec_Fetch_Mode="cors")
        assert status == 403 and "must be pressed by you" in page
        # Nor a form on another site's page, however valid its token (issue 18).
        for foreign in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec_Fetch_Site": "cross-site"}):
            status, page = fetch(address, port, PHISH, token=token, Sec_Fetch_Mode="navigate", **foreign)
            assert status == 403 and "not on another site" in page
        own = {"Origin": f"http://{PHISH}", "Sec_Fetch_Site": "same-origin", "Sec_Fetch_Mode": "navigate"}  # its Host
        status, page = fetch(address, port, PHISH, token=token, **own)
        assert status == 200 and "is open on this device" in page and "JST" in page  # the site's clock
        took = eventually(lambda: every_answer(dns_port, PHISH, LAPTOP, lambda answer: answer[1] is None), 2)
        assert took < 1.5
        addresses, _ = resolve(dns_port, "www." + PHISH)
        assert addresses and addresses != [address]  # a pass covers the subdomains
        assert every_answer(dns_port, PHISH, PHONE, lambda answer: answer == ([address], "Web Protect: phishing"))
        status, why = http(api, "POST", "/v1/why", {"name": PHISH, "address": LAPTOP})
        assert status == 200 and why["rule"] == "continue" and why["device"] == "laptop"

        # The same button again does nothing more; nor does a forged one.
        status, page = fetch(address, port, PHISH, token=token)
        assert status == 403 and "used already" in page
        payload, _, mac = token.partition(".")
        status, page = fetch(address, port, PHISH, token=f"{payload}.{mac[::-1]}")
        assert status == 403 and "not made by this network" in page

        # A button made for the laptop opens nothing for the phone, nor for another name.
        _status, phone_page = fetch(address, port, PHISH, source=PHONE)
        phone_token = token_in(phone_page)
        status, page = fetch(address, port, PHISH, source=LAPTOP, token=phone_token)
        assert status == 403 and "another site or device" in page
        status, page = fetch(address, port, "other.example", source=PHONE, token=phone_token)
        assert status == 403
        assert every_answer(dns_port, PHISH, PHONE, lambda answer: answer[1] == "Web Protect: phishing", tries=4)
        document = http(api, "GET", "/v1/sites/home")[1]
        assert list(document["devices"]["laptop"]["passes"]) == [PHISH]
        assert document["devices"]["phone"]["passes"] == {}


# Devices behind a customer's router: the DNS queries come from the router's address with each device's MAC,
# and so do the browsers' requests (NAT), from the same address. On loopback the kernel gives a connection to
# any 127.x address the source 127.0.0.1, so the router is 127.0.0.1, as Chromium's requests will be.
ROUTER = "127.0.0.1"
ALPHA_MAC, BETA_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
BEHIND_ROUTER = {
    "name": "Flat",
    "networks": ["127.0.0.0/8"],
    "mode": "device",
    "devices": {"alpha": {"name": "Alpha", "macs": [ALPHA_MAC]}, "beta": {"name": "Beta", "macs": [BETA_MAC]}},
}


def device_pool() -> str:
    """A /29 of loopback addresses of its own for the devices' warning pages."""
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{8 * random.randint(0, 31)}/29"


@contextmanager
def router_node(tmp_path: Path, upstream, store: str) -> Iterator[tuple[int, str, str, int, list[str]]]:
    """A page node with a pool of device page addresses, a trusted router and the BEHIND_ROUTER site: (DNS port,
    API, shared page address, port, the pool's addresses)."""
    pool = device_pool()
    with page_node(
        tmp_path,
        upstream,
        store,
        put_site=False,
        pages=f'device_networks = ["{pool}"]',
        identity=f'trusted_networks = ["{ROUTER}/32"]',
    ) as (dns_port, api, address, port):
        assert http(api, "PUT", "/v1/sites/flat", BEHIND_ROUTER)[0] == 200
        yield dns_port, api, address, port, [str(host) for host in ipaddress.ip_network(pool)]


def offer_in(token: str) -> dict:
    payload = token.partition(".")[0]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_devices_behind_one_router_each_continue_for_themselves_only(tmp_path, upstream, store):
    # The two devices' addresses for this name differ (the slot is a hash of site, device and name).
    assert slot("flat", "alpha", MALWARE, 8) != slot("flat", "beta", MALWARE, 8)
    with router_node(tmp_path, upstream, store) as (dns_port, api, address, port, pool):
        alpha_answer = resolve(dns_port, MALWARE, ROUTER, ALPHA_MAC)
        beta_answer = resolve(dns_port, MALWARE, ROUTER, BETA_MAC)
        assert alpha_answer == ([pool[slot("flat", "alpha", MALWARE, 8)]], "Web Protect: malware")
        assert beta_answer == ([pool[slot("flat", "beta", MALWARE, 8)]], "Web Protect: malware")
        alpha_page, beta_page = alpha_answer[0][0], beta_answer[0][0]

        # Each page address, asked from the router's address, shows the warning with its own device's button.
        tokens = {}
        for device, page_at in (("alpha", alpha_page), ("beta", beta_page)):
            status, page = fetch(page_at, port, MALWARE, source=ROUTER)
            assert status == 403 and "Malware" in page and "Continue anyway" in page
            tokens[device] = token_in(page)
            assert offer_in(tokens[device])["device"] == device and offer_in(tokens[device])["site"] == "flat"
        # The shared page address, from the router, cannot say whose it is: no button, as before.
        status, page = fetch(address, port, MALWARE, source=ROUTER)
        assert status == 403 and 'name="token"' not in page and "not known" in page
        # A pool address for a name no device of the site was sent there for: the warning, no button.
        other = next(a for a in pool if a not in (alpha_page, beta_page))
        status, page = fetch(other, port, MALWARE, source=ROUTER)
        assert status == 403 and 'name="token"' not in page and "cannot tell which of its devices" in page

        # Alpha's button posted through beta's address (or beta's through alpha's) opens nothing.
        status, page = fetch(beta_page, port, MALWARE, source=ROUTER, token=tokens["alpha"])
        assert status == 403 and "another site or device" in page
        status, page = fetch(alpha_page, port, MALWARE, source=ROUTER, token=tokens["beta"])
        assert status == 403 and "another site or device" in page

        # Alpha's button on alpha's address opens the name for alpha, and for alpha only.
        status, page = fetch(alpha_page, port, MALWARE, source=ROUTER, token=tokens["alpha"])
        assert status == 200 and "is open on this device" in page
        eventually(lambda: every_answer(dns_port, MALWARE, ROUTER, lambda a: a[1] is None, mac=ALPHA_MAC), 2)
        opened = resolve(dns_port, MALWARE, ROUTER, ALPHA_MAC)[0]
        assert len(opened) == 1 and opened[0].startswith("192.0.2.")  # the scripted upstream's answer
        assert every_answer(dns_port, MALWARE, ROUTER, lambda a: a == beta_answer, tries=4, mac=BETA_MAC)
        status, page = fetch(beta_page, port, MALWARE, source=ROUTER)
        assert status == 403 and "Continue anyway" in page  # beta is still warned, and may still continue
        status, page = fetch(alpha_page, port, MALWARE, source=ROUTER)
        assert status == 404  # nothing to warn alpha about any more
        document = http(api, "GET", "/v1/sites/flat")[1]
        assert list(document["devices"]["alpha"]["passes"]) == [MALWARE]
        assert document["devices"]["beta"]["passes"] == {}


def test_the_laptop_warned_at_a_malware_name_raises_an_alert_and_shows_in_its_activity(tmp_path, upstream, store):
    with page_node(tmp_path, upstream, store) as (dns_port, api, address, _port):
        assert resolve(dns_port, MALWARE) == ([address], "Web Protect: malware")  # stopped: the warning page
        device = f"ip:{LAPTOP}"

        def alerted() -> bool:
            alerts = http(api, "GET", "/v1/sites/home/alerts")[1]["alerts"]  # type: ignore[index]
            return [(alert["device"], alert["name"], alert["reason"]) for alert in alerts] == [
                (device, MALWARE, "malware")
            ]

        eventually(alerted, 20)  # a worker hands its alerts over every 5 s
        activity = http(api, "GET", f"/v1/sites/home/activity?device={device}&hours=1")[1]
        (hour,) = activity["hours"]  # type: ignore[index]
        assert (hour["warned"], hour["categories"]) == (1, {"malware": 1})
        assert activity["top_blocked"] == [{"name": MALWARE, "verdict": "warned", "count": 1}]  # type: ignore[index]
        listed = {entry["key"]: entry for entry in http(api, "GET", "/v1/sites/home/devices")[1]["devices"]}  # type: ignore[index]
        assert (listed[device]["device"], listed[device]["warned"]) == ("laptop", 1)


def test_the_pages_say_what_was_blocked_and_nothing_about_other_names(tmp_path, upstream, store):
    with page_node(tmp_path, upstream, store) as (dns_port, api, address, port):
        assert resolve(dns_port, DRUGS) == ([address], "blocked: drugs")  # the default blocks drugs: the page
        status, page = fetch(address, port, DRUGS)
        assert status == 403 and "Blocked" in page and "Drugs" in page and "Continue anyway" not in page

        # Phishing and drugs: the block wins, so there is no button to press.
        status, page = fetch(address, port, BOTH)
        assert status == 403 and "Blocked" in page and "Continue anyway" not in page

        # Every page forbids what it does not use (issue 18): its one style and script, allowed by hash.
        for name in (DRUGS, PHISH, FINE):
            headers, page = headers_of(address, port, name)
            policy = headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
            assert "form-action 'self'" in policy and "base-uri 'none'" in policy
            referrer = "same-origin" if name == PHISH else "no-referrer"  # the button's POST must show its origin
            assert (headers["X-Content-Type-Options"], headers["Referrer-Policy"]) == ("nosniff", referrer)
            inline = re.findall(r"<(style|script)>(.*?)</\1>", page, re.S)
            assert {kind for kind, _text in inline} == ({"style", "script"} if name == PHISH else {"style"})
            for kind, text in inline:
                digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
                assert f"{kind}-src 'sha256-{digest}'" in policy
            assert "javascript:" not in page and not re.search(r"<[^>]*\son[a-z]+\s*=", page)  # no handlers

        # A name this client may reach, or none at all: a page that names nothing.
        for host in (FINE, "127.0.0.1", "bad..name"):
            status, page = fetch(address, port, host)
            assert status == 404 and FINE not in page and "Drugs" not in page and "Phishing" not in page

        # A device the network does not know sees the warning but cannot continue.
        status, page = fetch(address, port, PHISH, source=STRANGER)
        assert status == 403 and "Warning" in page and 'name="token"' not in page and "not known" in page

        # A paused device: everything is blocked, and the page says why.
        assert http(api, "POST", "/v1/sites/home/devices/phone/pause", {"minutes": 5})[0] == 200
        eventually(lambda: resolve(dns_port, FINE, PHONE) == ([address], "paused"), 2)
        status, page = fetch(address, port, FINE, source=PHONE)
        assert status == 403 and "paused for this device" in page and "Continue anyway" not in page


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_warning_page_in_chromium_with_its_button(tmp_path, upstream, store):
    with page_node(tmp_path, upstream, store) as (dns_port, _api, address, port):
        answered, _ = resolve(dns_port, PHISH)
        assert answered == [address]

        async def browse() -> tuple[str, str, list[int], list[int]]:
            # The browser goes where our DNS answer sent it: the page address.
            async with Browser({PHISH: answered[0]}, tmp_path / "chromium") as browser:
                await browser.open(f"http://{PHISH}:{port}/login")
                await browser.press("#back")  # its script, allowed by the page's policy, goes back
                await browser.wait_for("location.href === 'about:blank'")
                await browser.open(f"http://{PHISH}:{port}/login")
                warning_text = await browser.evaluate("document.body.innerText")
                button_at = await browser.evaluate(
                    "(() => { const r = document.querySelector('#continue').getBoundingClientRect();"
                    " return [Math.round(r.x + 8), Math.round(r.y + r.height / 2)]; })()"
                )
                warning_png = await browser.screenshot(tmp_path / "warning.png")
                await browser.click("#continue")
                opened_text = await browser.evaluate("document.body.innerText")
                await browser.screenshot(tmp_path / "opened.png")
                background = await browser.pixel(warning_png, 5, 5)
                button = await browser.pixel(warning_png, *button_at)
                return warning_text, opened_text, background, button

        warning_text, opened_text, background, button = asyncio.run(browse())
        assert "phish.example is known to be dangerous" in warning_text and "Continue anyway" in warning_text
        assert "phish.example is open on this device" in opened_text
        # The screenshot shows the warning's colour around the card and the dark button on it.
        assert background[:3] == [0xF6, 0xD7, 0xD2]
        assert max(button[:3]) < 0x40
        eventually(lambda: every_answer(dns_port, PHISH, LAPTOP, lambda answer: answer[1] is None), 2)
        assert every_answer(dns_port, PHISH, PHONE, lambda answer: answer[0] == [address], tries=4)


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")
def test_a_device_behind_a_router_continues_in_chromium_on_its_own_page_address(tmp_path, upstream, store):
    with router_node(tmp_path, upstream, store) as (dns_port, _api, _address, port, pool):
        answered, _ = resolve(dns_port, MALWARE, ROUTER, ALPHA_MAC)
        beta_answer = resolve(dns_port, MALWARE, ROUTER, BETA_MAC)
        assert answered[0] in pool and beta_answer[0][0] in pool and answered != beta_answer[0]

        async def browse() -> tuple[str, str]:
            # Alpha's browser goes where alpha's DNS answer sent it; it connects from 127.0.0.1, the router.
            async with Browser({MALWARE: answered[0]}, tmp_path / "chromium") as browser:
                await browser.open(f"http://{MALWARE}:{port}/download")
                warning_text = await browser.evaluate("document.body.innerText")
                await browser.click("#continue")
                return warning_text, await browser.evaluate("document.body.innerText")

        warning_text, opened_text = asyncio.run(browse())
        assert "malware.example is known to be dangerous" in warning_text and "Continue anyway" in warning_text
        assert "malware.example is open on this device" in opened_text
        eventually(lambda: every_answer(dns_port, MALWARE, ROUTER, lambda a: a[1] is None, mac=ALPHA_MAC), 2)
        assert every_answer(dns_port, MALWARE, ROUTER, lambda a: a == beta_answer, tries=4, mac=BETA_MAC)


def test_with_redis_down_the_node_starts_and_the_page_says_try_again(tmp_path, upstream):
    with socket.socket() as probe:  # a port nobody listens on: Redis is down from the start
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    with page_node(
        tmp_path,
        upstream,
        f'[store]\nredis = "redis://127.0.0.1:{dead}/0"',
        put_site=False,
        lists="ready_timeout = 2",  # it serves its list once Redis has not answered for this long
    ) as (
        dns_port,
        _api,
        address,
        port,
    ):
        assert resolve(dns_port, PHISH) == ([address], "Web Protect: phishing")  # the default policy
        status, page = fetch(address, port, PHISH)
        assert status == 503 and "Try again" in page and PHISH not in page


def test_a_page_address_this_machine_does_not_have_fails_start_up(tmp_path):
    config = tmp_path / "bns.toml"
    config.write_text('[policy]\nwarning_page = ["192.0.2.44"]\n[pages]\nport = 8080\n[store]\nfile = ""\n')
    result = subprocess.run(
        bns("serve", "--config", str(config), "--listen", "127.0.0.1:0", "--admin-listen", ""),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "policy.warning_page: 192.0.2.44 is not an address of this machine" in result.stderr
    assert "pages.serve = false" in result.stderr
    config.write_text(config.read_text().replace("port = 8080", "port = 8080\nserve = false"))  # shown elsewhere
    with node("--config", str(config), "--listen", "127.0.0.1:0", "--admin-listen", "") as (_process, port, _api):
        assert port > 0


def test_device_page_networks_this_machine_does_not_have_or_too_large_fail_start_up(tmp_path):
    address, port = page_address()
    config = tmp_path / "bns.toml"
    for networks, code, message in (
        ("192.0.2.0/30", 1, "pages.device_networks: 192.0.2.0 is not an address of this machine"),
        ("127.77.0.0/23", 2, "pages.device_networks: 127.77.0.0/23 has 512 addresses; at most 256"),
    ):
        config.write_text(
            f'[policy]\nwarning_page = ["{address}"]\n[pages]\nport = {port}\ndevice_networks = ["{networks}"]\n'
            '[store]\nfile = ""\n'
        )
        result = subprocess.run(
            bns("serve", "--config", str(config), "--listen", "127.0.0.1:0", "--admin-listen", ""),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == code and message in result.stderr, result.stderr
