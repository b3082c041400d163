"""The admin API in this process, on real loopback sockets over the embedded store: what it tells whom (failed
authentication slowed and logged, a webhook's secret, errors that show nothing of the server)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from blocklists.catalog import load_catalog
from resolver.admin.auth_failures import BURST, MAX_SOURCES, REFILL, AuthFailures
from resolver.shared.store.file_policies import FileStore
from tests.shared.test_store_faults import API_TOKEN, api_over

pytestmark = pytest.mark.integration
READ_TOKEN = "api-read-token-for-tests-01"
ATTACKER, OPERATOR = "127.0.0.3", "127.0.0.4"  # two sources on loopback
SECRET = "the-webhook-secret-0001"
SITE = {
    "networks": ["192.0.2.0/24"],
    "mode": "device",
    "webhook": {"url": "https://hooks.example/bns", "secret": SECRET},
}


class Client:
    """Requests to the API from one source address."""

    def __init__(self, base: str, source: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))

    async def call(
        self, method: str, path: str, token: str | None = API_TOKEN, body: Any = None, data: bytes | None = None
    ) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.base + path, headers=headers, json=body, data=data) as response:
            return response.status, await response.json(), response.headers


@asynccontextmanager
async def serving(
    tmp_path: Path, tls: dict[str, Any] | None = None, **admin: Any
) -> AsyncIterator[tuple[Client, Client]]:
    """The API over a fresh embedded store: a client from the operator's address and one from another.
    `admin`: admin settings other than the tokens the tests use."""
    settings = {"read_tokens": [READ_TOKEN], **admin}
    api = api_over(FileStore(tmp_path / "policies.json", load_catalog()), tmp_path, tls, **settings)
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url(""))
    operator, attacker = Client(base, OPERATOR), Client(base, ATTACKER)
    try:
        yield operator, attacker
    finally:
        await operator.session.close()
        await attacker.session.close()
        await server.close()


def test_wrong_tokens_are_slowed_per_source_and_logged_without_the_token(tmp_path, caplog):
    """Issue 18: 5,000 wrong tokens in 2.7 s were neither slowed nor logged."""
    guesses = [f"guess-{number:04d}-0000000000000000" for number in range(40)]
    guesses += [f"site.forged{number}.signature" for number in range(10)]  # failed site tokens count too

    async def attack() -> tuple[list[int], Any, Any, int]:
        async with serving(tmp_path) as (operator, attacker):
            answers = await asyncio.gather(*(attacker.call("GET", "/v1/sites", token) for token in guesses))
            statuses = [status for status, _body, _headers in answers]
            refused = next(answer for answer in answers if answer[0] == 429)
            own = await operator.call("GET", "/v1/sites")
            right_from_attacker = await attacker.call("GET", "/v1/sites")
            return statuses, refused, right_from_attacker, own[0]

    with caplog.at_level(logging.WARNING, logger="resolver.admin.auth_failures"):
        statuses, refused, right_from_attacker, operator_status = asyncio.run(attack())
    assert sorted(statuses) == [401] * BURST + [429] * (len(guesses) - BURST)
    _status, body, headers = refused
    assert body["error"]["status"] == 429 and 0 < int(headers["Retry-After"]) <= REFILL
    assert right_from_attacker[0] == 429  # checking it would answer the guess
    assert operator_status == 200  # never slowed by another source's failures
    lines = [record.getMessage() for record in caplog.records]
    assert 1 <= len(lines) <= 2 and ATTACKER in lines[0] and "GET /v1/sites" in lines[0]
    assert not any(guess[:8] in line for guess in guesses for line in lines)


def test_a_subscribers_signed_token_is_not_locked_out_by_another_behind_the_same_address(tmp_path):
    """Behind a proxy or a CGNAT pool every client has one address: a stranger's wrong tokens must not lock out
    a subscriber whose token is soundly signed (it is no guess: its HMAC needs the key)."""

    async def share_an_address() -> tuple[int, int, int]:
        async with serving(tmp_path) as (operator, shared):
            assert (await operator.call("PUT", "/v1/sites/home", body=SITE))[0] == 200
            issued = (await operator.call("POST", "/v1/sites/home/tokens", body={"days": 1}))[1]
            for number in range(BURST):
                await shared.call("GET", "/v1/sites", f"guess-{number:04d}-0000000000000000")
            locked = (await shared.call("GET", "/v1/sites", "guess-9999-0000000000000000"))[0]
            subscriber = (await shared.call("GET", "/v1/sites/home/alerts", issued["token"]))[0]
            forged = (await shared.call("GET", "/v1/sites/home/alerts", issued["token"][:-4] + "AAAA"))[0]
            return locked, subscriber, forged

    assert asyncio.run(share_an_address()) == (429, 200, 429)


def test_a_source_is_forgiven_in_time_and_many_sources_cost_bounded_memory():
    now = [0.0]
    failures = AuthFailures(clock=lambda: now[0])
    for _ in range(BURST):
        assert failures.wait(ATTACKER) == 0
        failures.failed(ATTACKER, "GET /v1/sites")
    assert failures.wait(ATTACKER) == REFILL
    now[0] += REFILL
    assert failures.wait(ATTACKER) == 0  # one more guess, then wait again
    failures.failed(ATTACKER, "GET /v1/sites")
    assert failures.wait(ATTACKER) > 0
    for number in range(2 * MAX_SOURCES):
        failures.failed(f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}", "GET /v1/sites")
    assert len(failures) == MAX_SOURCES
    assert failures.wait("2001:db8::1") == failures.wait("2001:db8::2") == 0
    for _ in range(BURST):
        failures.failed("2001:db8::1", "GET /v1/sites")
    assert failures.wait("2001:db8::ffff") > 0  # an IPv6 source is its /64
    assert failures.wait("::ffff:192.0.2.1") == 0  # an IPv4 client of a dual-stack socket: its own address


def test_a_webhooks_secret_is_shown_to_admin_tokens_only_and_a_site_token_cannot_set_one(tmp_path):
    """Issue 18: GET /v1/sites/{site} showed `webhook.secret` to a site token and to read-only tokens."""

    async def look() -> dict[str, Any]:
        async with serving(tmp_path) as (operator, _other):
            assert (await operator.call("PUT", "/v1/sites/home", body=SITE))[0] == 200
            _status, issued, _headers = await operator.call("POST", "/v1/sites/home/tokens", body={"days": 1})
            site_token = issued["token"]
            seen = {
                who: (await operator.call("GET", "/v1/sites/home", token))[1]["webhook"]
                for who, token in (("admin", API_TOKEN), ("read", READ_TOKEN), ("site", site_token))
            }
            written = (await operator.call("PUT", "/v1/sites/home/devices/tv", site_token, {"name": "TV"}))[1]
            attempts = {
                "put site": await operator.call("PUT", "/v1/sites/home", site_token, SITE),
                "patch site": await operator.call("PATCH", "/v1/sites/home", site_token, {"webhook": None}),
                "device": await operator.call("PUT", "/v1/sites/home/devices/tv", site_token, {"webhook": None}),
                "group": await operator.call("PUT", "/v1/sites/home/groups/kids", site_token, {"webhook": None}),
            }
            kept = (await operator.call("GET", "/v1/sites/home"))[1]["webhook"]
            return {
                "seen": seen,
                "written": written["webhook"],
                "attempts": {
                    what: (status, body["error"].get("field")) for what, (status, body, _h) in attempts.items()
                },
                "kept": kept,
            }

    looked = asyncio.run(look())
    hidden = {"url": "https://hooks.example/…"}  # its path may be a credential too (Slack, Discord)
    assert looked["seen"] == {"admin": SITE["webhook"], "read": hidden, "site": hidden}
    assert looked["written"] == hidden  # a site token's write answers the site without it too
    assert looked["attempts"] == {
        "put site": (403, None),
        "patch site": (403, None),
        "device": (422, "devices.tv.webhook"),
        "group": (422, "groups.kids.webhook"),
    }
    assert looked["kept"] == SITE["webhook"]


def test_a_device_gets_a_new_unguessable_client_id_from_its_subscriber_and_no_one_else(tmp_path):
    """POST …/devices/{device}/client-id: 26 lowercase base32 characters, replacing the device's client ids, with
    where to put it; a site token may make one for its own site's devices only."""

    async def renew() -> dict[str, Any]:
        async with serving(tmp_path, {"name": "dns.example.net"}) as (operator, _other):
            for site in ("home", "other"):
                assert (await operator.call("PUT", f"/v1/sites/{site}", body={"mode": "device"}))[0] == 200
            await operator.call("PUT", "/v1/sites/home/devices/phone", body={"client_ids": ["old-id", "older-id"]})
            await operator.call("PUT", "/v1/sites/other/devices/tv", body={})
            site_token = (await operator.call("POST", "/v1/sites/home/tokens", body={"days": 1}))[1]["token"]
            made = [
                (await operator.call("POST", "/v1/sites/home/devices/phone/client-id", site_token))[1] for _ in "ab"
            ]
            stored = (await operator.call("GET", "/v1/sites/home"))[1]["devices"]["phone"]["client_ids"]
            return {
                "made": made,
                "stored": stored,
                "other site": (await operator.call("POST", "/v1/sites/other/devices/tv/client-id", site_token))[0],
                "read token": (await operator.call("POST", "/v1/sites/home/devices/phone/client-id", READ_TOKEN))[0],
                "no device": (await operator.call("POST", "/v1/sites/home/devices/nothing/client-id"))[0],
            }

    renewed = asyncio.run(renew())
    first, second = renewed["made"]
    assert re.fullmatch(r"[a-z2-7]{26}", first["client_id"]) and first["client_id"] != second["client_id"]
    assert renewed["stored"] == [second["client_id"]]  # the old ids (and the first new one) no longer work
    assert second["private_dns"] == f"{second['client_id']}.dns.example.net"
    assert second["doh_template"] == f"https://dns.example.net/dns-query/{second['client_id']}"
    assert (renewed["other site"], renewed["read token"], renewed["no device"]) == (403, 403, 404)


def test_a_refused_artifact_is_named_by_the_argument_not_by_the_servers_files(tmp_path):
    """Issue 18: the publish route's errors named the temporary file the upload was kept in."""

    async def publish() -> tuple[int, str]:
        async with serving(tmp_path) as (operator, _other):
            status, body, _headers = await operator.call("POST", "/v1/lists", data=b"not an artifact at all")
            return status, body["error"]["message"]

    status, message = asyncio.run(publish())
    assert (status, message) == (400, "the artifact: not a list artifact (no BNSLIST magic)")
    assert str(tmp_path) not in message


async def _cli_answer(api: str, token: str | None) -> tuple[int | None, str]:
    """`bns site show` against `api` (with `token`, else none at all): its exit code and what it said."""
    environment = {key: value for key, value in os.environ.items() if key not in ("BNS_TOKEN", "BNS_API")}
    command = [sys.executable, "-m", "resolver", "site", "show", "--api", api, *(["--token", token] if token else [])]
    process = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE, env=environment)
    _out, err = await process.communicate()
    return process.returncode, err.decode()


def test_a_401_says_what_to_do_next(tmp_path):
    """Issue 19, defect 7: a 401 said `a valid bearer token is required` and nothing more, even from a node with
    no token configured at all, which no client can do anything about."""

    async def ask(directory: Path, **admin: Any) -> tuple[dict[str, Any], list[tuple[int | None, str]]]:
        directory.mkdir()
        async with serving(directory, **admin) as (operator, _other):
            _status, body, _headers = await operator.call("GET", "/v1/sites", token=None)
            said = [await _cli_answer(operator.base, token) for token in (None, "not-this-nodes-token-0001")]
            return body["error"], said

    error, (without, wrong) = asyncio.run(ask(tmp_path / "with-tokens"))
    assert "hint" not in error  # the client can fix this one itself: the command line says how
    assert without[0] == 4 and "401: a valid bearer token is required" in without[1], without
    assert "give a token of the node with --token TOKEN or $BNS_TOKEN" in without[1]
    assert "the token given (--token or $BNS_TOKEN) is not one the node at http://127.0.0.1:" in wrong[1], wrong
    assert "Traceback" not in without[1] + wrong[1]

    error, said = asyncio.run(ask(tmp_path / "without", tokens=[], read_tokens=[]))
    assert error["status"] == 401 and "admin.tokens" in error["hint"] and "$BNS_ADMIN_TOKENS" in error["hint"]
    for code, stderr in said:
        assert code == 4 and f"what to do: {error['hint']}" in stderr, stderr
