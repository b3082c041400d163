"""Redis that comes and goes, under a real worker: restarts, flushed scripts, freezes, lost replies.

Each test reproduces a failure seen in the field on a real redis-server (killed, restarted from its
append-only file, SCRIPT FLUSHed, SIGSTOPped) or behind a proxy that cuts a connection at the worst moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bench.faults import mac
from blocklists.catalog import load_catalog
from resolver.admin.api import Api, tokens_from
from resolver.admin.feeds import Feeds
from resolver.admin.metrics import Metrics
from resolver.admin.site_tokens import SiteTokens
from resolver.admin.sources import Sources
from resolver.admin.why import Explainer
from resolver.shared.errors import StoreUnavailable, WriteUnknown
from resolver.shared.loading import load_policy_and_lists
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.activity import LocalActivity
from resolver.shared.store.page_tokens import Secret
from resolver.shared.store.policies import Store
from resolver.shared.store.publications import LocalPublications
from resolver.shared.store.shelves import LocalShelf
from tests.conftest import ServerThread, eventually, make_config, redis_policy_store
from tests.worker.test_policies import Clock, ask, outcome, write

pytestmark = pytest.mark.integration
CATALOG = load_catalog()
NOON = 1_764_000_000.0

# Two sites in network mode with policies unlike the global default (which blocks pornography): "warm" is
# the one the worker has seen, "cold" one it has not.
WARM = {"networks": ["127.0.0.1/32"], "mode": "network", "policy": {"block": ["drugs"], "web_protect": False}}
COLD = {"networks": ["127.0.1.0/24"], "mode": "network", "policy": {"block": ["drugs"], "web_protect": False}}
PAUSED = {
    "networks": ["127.0.0.0/8"],
    "mode": "device",
    "paused_until": "forever",
    "devices": {"known": {"macs": ["02:00:00:00:00:01"]}},
}


def worker(redis_url: str, prefix: str, lists_path: Path, upstream, cold_wait: float, **store: object) -> ServerThread:
    config = make_config(
        [upstream.address],
        lists={"path": str(lists_path)},
        store={"redis": redis_url, "prefix": prefix, "cold_wait": cold_wait, **store},
        identity={"trusted_networks": ["127.0.0.1/32"]},
    )
    return ServerThread(config, wall_clock=Clock(NOON))


def from_cold_site(server: ServerThread, host: int, name: str) -> dns.message.Message:
    return ask(server, name, source=f"127.0.1.{host}")


def served_within_a_second(server: ServerThread) -> None:
    """New clients get their site's policy again within a second of Redis coming back (the worker tries the
    store again a second after a failure at the latest), and are never refused meanwhile."""
    back = time.monotonic()
    answers = [outcome(from_cold_site(server, 1, "porn.example"))]
    while answers[-1] != "ok" and time.monotonic() - back < 1.0:
        answers.append(outcome(from_cold_site(server, 1, "porn.example")))
    assert answers[-1] == "ok", answers


@pytest.fixture
def two_sites(own_redis, redis_prefix):
    write(own_redis.url, redis_prefix, lambda service: service.put_site("warm", WARM))
    write(own_redis.url, redis_prefix, lambda service: service.put_site("cold", COLD))
    return own_redis.url, redis_prefix


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.exc_info]


@pytest.mark.parametrize("fault", ["restart", "script-flush"])
def test_new_clients_get_their_sites_policy_after_redis_forgets_the_script(
    two_sites, own_redis, lists, upstream, caplog, fault
):
    """A restarted (or SCRIPT FLUSHed) Redis has forgotten the lookup script: it is loaded again, and the
    clients the worker had not seen are served their site's policy, not SERVFAIL, with no traceback."""
    with worker(*two_sites, lists, upstream, cold_wait=1.0) as server:
        assert outcome(ask(server, "porn.example")) == "ok"  # the warm site: the script is loaded
        if fault == "restart":
            own_redis.kill()
            own_redis.start()  # the same data, from its append-only file; no scripts
        else:
            assert own_redis.command("SCRIPT", "FLUSH").startswith(b"+OK")
        served_within_a_second(server)
        for host in range(2, 22):
            assert outcome(from_cold_site(server, host, "porn.example")) == "ok"
            assert outcome(from_cold_site(server, host, "drug.example")) == "blocked: drugs"
    assert not tracebacks(caplog)


def test_an_outage_is_logged_once_and_its_end_once(two_sites, own_redis, lists, upstream, caplog):
    caplog.set_level(logging.INFO, logger="resolver.worker.directory")
    with worker(*two_sites, lists, upstream, cold_wait=0.05) as server:
        assert outcome(ask(server, "porn.example")) == "ok"
        own_redis.kill()
        for host in range(1, 41):
            assert from_cold_site(server, host, "drug.example").rcode() != dns.rcode.SERVFAIL
        own_redis.start()
        served_within_a_second(server)
        for host in range(41, 81):
            assert outcome(from_cold_site(server, host, "drug.example")) == "blocked: drugs"
    messages = [record.getMessage() for record in caplog.records]
    assert sum("policy store unavailable" in message for message in messages) == 1
    assert sum("policy store reachable again" in message for message in messages) == 1
    assert not tracebacks(caplog)


def held_site(server: ServerThread) -> None:
    """One device of the site asks until the worker holds the site: with cold_wait at 10 ms, a loaded machine
    may answer the very first query before the store does (with the best it knows: the default)."""
    eventually(lambda: outcome(ask(server, "allowed.example", "02:00:00:00:00:01")) == "paused", within=5)


@pytest.fixture
def paused_site(own_redis, redis_prefix):
    write(own_redis.url, redis_prefix, lambda service: service.put_site("home", PAUSED))
    return own_redis.url, redis_prefix


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_new_devices_of_a_paused_site_stay_paused_while_redis_lags_or_is_gone(
    paused_site, own_redis, lists, upstream, fault
):
    """The worker holds the site (one device asked before): devices it never saw get the site's policy, a
    pause, when the store is too slow (frozen) or gone (killed); never the global default, which lets
    allowed.example through. New MACs behind the known router, and new addresses of the site's network."""
    with worker(*paused_site, lists, upstream, cold_wait=0.01) as server:
        held_site(server)
        if fault == "frozen":
            own_redis.freeze()
        else:
            own_redis.kill()
        try:
            answers = [outcome(ask(server, "allowed.example", mac(1000 + number))) for number in range(100)]
            answers += [outcome(ask(server, "allowed.example", source=f"127.0.2.{host}")) for host in range(1, 101)]
        finally:
            if fault == "frozen":
                own_redis.thaw()
    assert answers == ["paused"] * 200


def test_cold_policy_servfail_refuses_instead(paused_site, own_redis, lists, upstream):
    with worker(*paused_site, lists, upstream, cold_wait=0.01, cold_policy="servfail") as server:
        held_site(server)
        own_redis.kill()
        response = ask(server, "allowed.example", source="127.0.2.1")  # an address the worker never saw
        assert response.rcode() == dns.rcode.SERVFAIL
        ede = [option for option in response.options if option.otype == dns.edns.OptionType.EDE]
        assert ede and ede[0].code == 14  # Not Ready
        # known devices, and new ones behind a known address, are still answered from memory
        assert outcome(ask(server, "allowed.example", "02:00:00:00:00:01")) == "paused"
        assert outcome(ask(server, "allowed.example", mac(5000))) == "paused"


# --- writes whose reply is lost ------------------------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy in front of Redis that can cut the connection at the next occurrence of a command: after
    passing it on (applied, its reply never arrives) or instead (never applied), and then refuse new
    connections until told."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut: tuple[bytes, bool] | None = None  # (the command, whether it is passed on first)
        self.cut_after_exec: tuple[bytes, bool] | None = None  # becomes `cut` once an EXEC passes
        self.refusing = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream and self.cut_after_exec and b"EXEC\r\n" in data:
                    self.cut, self.cut_after_exec = self.cut_after_exec, None
                elif upstream and self.cut and self.cut[0] in data:
                    (_command, passed_on), self.cut = self.cut, None
                    self.refusing.set()
                    source.shutdown(socket.SHUT_RDWR)  # the client hears nothing more, its reply included
                    if passed_on:
                        sink.sendall(data)
                    else:
                        sink.close()
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def proxy(own_redis) -> Iterator[CuttingProxy]:
    server = CuttingProxy(own_redis.port)
    yield server
    server.close()


EXEC_APPLIED = (b"EXEC\r\n", True)  # the transaction reaches Redis; its reply is lost
EXEC_LOST = (b"EXEC\r\n", False)  # the transaction may have been sent, but never reaches Redis
WATCH_LOST = (b"WATCH\r\n", False)  # the connection dies before anything is queued


async def _pause_through(proxy: CuttingProxy, prefix: str, cut: tuple[bytes, bool], refuse_for: float) -> None:
    store = redis_policy_store(proxy.url, prefix)
    store.confirm_seconds = 1.0
    try:
        await PolicyService(store).set_site_fields("home", {"name": "before"})
        proxy.cut = cut
        loop = asyncio.get_running_loop()
        loop.call_later(refuse_for, proxy.refusing.clear)
        await PolicyService(store).pause("home", ("site", None))
    finally:
        proxy.refusing.clear()
        await store.close()


def _paused(own_redis, prefix: str) -> bool:
    async def read() -> bool:
        store = redis_policy_store(own_redis.url, prefix)
        try:
            document, _version = await PolicyService(store).get_site("home")
            return document.get("paused_until") == "forever"
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_write_whose_reply_was_lost_is_confirmed_when_redis_answers_again(proxy, own_redis, redis_prefix):
    asyncio.run(_pause_through(proxy, redis_prefix, EXEC_APPLIED, refuse_for=0.3))  # succeeds: it was applied
    assert _paused(own_redis, redis_prefix)


def test_a_write_that_never_reached_redis_is_retried_once_redis_answers(proxy, own_redis, redis_prefix):
    asyncio.run(_pause_through(proxy, redis_prefix, EXEC_LOST, refuse_for=0.3))
    assert _paused(own_redis, redis_prefix)


@pytest.mark.parametrize("cut", [EXEC_APPLIED, EXEC_LOST], ids=["applied", "lost"])
def test_a_write_whose_outcome_cannot_be_learnt_says_so(proxy, own_redis, redis_prefix, cut):
    """Sent, and Redis out of reach until after the confirmation window: neither done nor failed."""
    with pytest.raises(WriteUnknown, match="read it back"):
        asyncio.run(_pause_through(proxy, redis_prefix, cut, refuse_for=5.0))
    assert _paused(own_redis, redis_prefix) == cut[1]  # either can be true: "failed" would have been a lie


def test_a_write_reported_failed_was_not_written(proxy, own_redis, redis_prefix):
    with pytest.raises(StoreUnavailable):
        asyncio.run(_pause_through(proxy, redis_prefix, WATCH_LOST, refuse_for=5.0))
    assert not _paused(own_redis, redis_prefix)


def test_an_api_write_that_succeeded_is_not_reported_failed_by_a_read_after_it(
    proxy, own_redis, redis_prefix, tmp_path
):
    """Redis goes away just after a write is applied: the API must not read the site back (and fail on that
    read) to answer; it answers from what the write made."""

    async def run() -> int:
        store = redis_policy_store(proxy.url, redis_prefix)
        api = api_over(store, tmp_path)
        async with TestClient(TestServer(api.app())) as client:
            headers = {"Authorization": f"Bearer {API_TOKEN}"}
            assert (await client.put("/v1/sites/home", json={"name": "home"}, headers=headers)).status == 200
            proxy.cut_after_exec = (b"HMGET", False)  # the next read after the next write dies
            asyncio.get_running_loop().call_later(3.0, proxy.refusing.clear)
            response = await client.post("/v1/sites/home/pause", json={}, headers=headers)
        await store.close()
        return response.status

    assert asyncio.run(run()) == 200
    assert _paused(own_redis, redis_prefix)


API_TOKEN = "store-faults-token-00001"


def api_over(store: Store, scratch: Path, tls: dict[str, Any] | None = None, **admin: Any) -> Api:
    """The admin API of a node over `store`, in this process; `tls`: its [tls] settings; `admin`: more admin
    settings."""
    admin_settings = {"tokens": [API_TOKEN], "max_upload": 1 << 20, **admin}
    config = make_config(["127.0.0.1:9"], admin=admin_settings, tls=tls or {})
    catalog, maker, lists = load_policy_and_lists(config)
    publications = LocalPublications(catalog, scratch / "served.bns", scratch / "versions")
    sources = Sources(
        LocalShelf(scratch / "sources"), catalog, publications, (), scratch / "compiles", config.admin.max_upload
    )
    return Api(
        tokens_from(config.admin),
        catalog,
        store,
        publications,
        sources,
        Feeds(sources.shelf, sources, config.feeds, scratch / "feeds"),
        Explainer(store, maker, catalog, lists),
        Metrics(scratch, dict),
        config.admin.max_upload,
        config.admin.max_json,
        scratch / "uploads",
        SiteTokens(Secret("", None, scratch / "pages.key"), store),
        LocalActivity(config.activity),
        config.tls,
    )


def test_an_api_write_whose_outcome_cannot_be_learnt_is_504_and_the_cli_exits_5(
    proxy, own_redis, redis_prefix, tmp_path
):
    """The store's WriteUnknown as a client sees it: HTTP 504 with outcome "unknown", and exit code 5 from
    the CLI through the API; never "failed"."""

    async def run() -> tuple[int, dict[str, Any], int, bytes]:
        store = redis_policy_store(proxy.url, redis_prefix)
        store.confirm_seconds = 0.5
        api = api_over(store, tmp_path)
        loop = asyncio.get_running_loop()
        async with TestClient(TestServer(api.app())) as client:
            headers = {"Authorization": f"Bearer {API_TOKEN}"}
            assert (await client.put("/v1/sites/home", json={"name": "home"}, headers=headers)).status == 200
            proxy.cut = EXEC_APPLIED  # the write reaches Redis; its reply and every check after it do not
            loop.call_later(2.0, proxy.refusing.clear)
            response = await client.post("/v1/sites/home/pause", json={}, headers=headers)
            status, body = response.status, await response.json()
            await asyncio.sleep(2.2)  # Redis reachable again
            proxy.cut = EXEC_APPLIED
            loop.call_later(2.0, proxy.refusing.clear)
            command = [sys.executable, "-m", "resolver", "site", "unpause", "home", "--api", str(client.make_url(""))]
            cli = await asyncio.create_subprocess_exec(
                *command, "--token", API_TOKEN, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            _out, err = await cli.communicate()
        await store.close()
        return status, body, cli.returncode or 0, err

    status, body, code, err = asyncio.run(run())
    assert status == 504 and body["error"]["outcome"] == "unknown", body
    assert code == 5, err


SCHEDULED = {
    "networks": ["127.0.0.0/8"],
    "mode": "device",
    "default_group": "family",
    "groups": {
        "family": {
            "policy": {  # blocks everything 15:00–17:00 UTC, which holds the workers' clock (NOON is 16:00 UTC)
                "schedules": [
                    {
                        "name": "homework",
                        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                        "from": "15:00",
                        "to": "17:00",
                        "block": "all",
                    }
                ]
            }
        }
    },
    "devices": {"known": {"macs": ["02:00:00:00:00:01"], "group": "family"}},
}


def test_new_devices_of_a_site_in_a_scheduled_block_stay_blocked_while_redis_is_gone(
    own_redis, redis_prefix, lists, upstream
):
    write(own_redis.url, redis_prefix, lambda service: service.put_site("home", SCHEDULED))
    with worker(own_redis.url, redis_prefix, lists, upstream, cold_wait=0.01) as server:
        eventually(
            lambda: outcome(ask(server, "allowed.example", "02:00:00:00:00:01")) == "schedule homework", within=5
        )
        own_redis.kill()
        answers = [outcome(ask(server, "allowed.example", mac(2000 + number))) for number in range(50)]
        answers += [outcome(ask(server, "allowed.example", source=f"127.0.3.{host}")) for host in range(1, 51)]
    assert answers == ["schedule homework"] * 100


def test_a_site_token_the_store_cannot_check_is_refused_with_503_never_passed(own_redis, redis_prefix, tmp_path):
    """A site token is checked against the store on every request: with Redis gone it is a 503 (saying
    nothing of where the store is), even on a route that needs nothing else of the store (alerts)."""

    async def run() -> list[tuple[int, Any]]:
        store = redis_policy_store(own_redis.url, redis_prefix)
        async with TestClient(TestServer(api_over(store, tmp_path).app())) as client:
            admin = {"Authorization": f"Bearer {API_TOKEN}"}
            assert (await client.put("/v1/sites/home", json={}, headers=admin)).status == 200
            issued = await (await client.post("/v1/sites/home/tokens", json={"days": 1}, headers=admin)).json()
            subscriber = {"Authorization": f"Bearer {issued['token']}"}
            answers = []
            for kill in (False, True):
                if kill:
                    own_redis.kill()
                response = await client.get("/v1/sites/home/alerts", headers=subscriber)
                answers.append((response.status, await response.json()))
        await store.close()
        return answers

    (up, up_body), (down, down_body) = asyncio.run(run())
    assert (up, up_body) == (200, {"alerts": []})
    assert down == 503 and "cannot be checked now" in down_body["error"]["message"]
    assert "redis" not in down_body["error"]["message"]
