"""Shared fixtures: a scripted upstream and an in-process worker, both on real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
import uvloop

from bench.redis_processes import RedisServer, SentinelDeployment
from bench.upstream import Script, ScriptedUpstream
from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists
from resolver.shared.config import Config, load_config
from resolver.shared.sockets import bind_sockets
from resolver.shared.store.redis import RedisConnection
from resolver.shared.store.redis_policies import RedisStore
from resolver.worker.process import Worker

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole-process tests (e2e) are the slow ones: marked `slow` (`-m "not slow"` leaves them out) and run
    after the rest, so a plain `pytest` reports a broken unit or integration test within a minute."""
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture(autouse=True)
def no_unexpected_error_logged(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A test fails when bns's code, run in its process (an in-process worker, the API, a store), logs an ERROR
    or a traceback the test does not expect (`@pytest.mark.logs(regex, ...)`): a defect a fallback hides (a
    client resolved by its stand-in because resolving it raised) must not pass. Whole nodes are checked by
    their own log (tests/e2e/test_process.py)."""
    yield
    marker = request.node.get_closest_marker("logs")
    expected = marker.args if marker is not None else ()
    for record in caplog.get_records("call"):
        if record.name.split(".")[0] not in ("resolver", "blocklists") or record.levelno < logging.ERROR:
            continue
        message = record.getMessage()
        if not any(re.search(pattern, message) for pattern in expected):
            raise AssertionError(f"logged what the test does not expect: {record.levelname} {record.name}: {message}")


def make_config(upstreams: list[str], **sections: dict[str, Any]) -> Config:
    """A config for tests: loopback port 0, short timeouts, the given upstreams; `sections` override."""
    overrides: dict[str, dict[str, Any]] = {
        "server": {"listen": ["127.0.0.1:0"], "workers": 1, "tcp_idle_timeout": 5.0, "drain_timeout": 2.0},
        "upstream": {"servers": upstreams, "timeout": 0.25, "deadline": 1.0, "down_for": 30.0},
        "store": {"file": ""},
    }
    for section, keys in sections.items():
        overrides.setdefault(section, {}).update(keys)
    return load_config(None, overrides)


class ServerThread:
    """One Worker on its own uvloop loop in a thread: the whole query path on real sockets, in-process."""

    def __init__(self, config: Config, wall_clock: Any = None) -> None:
        self.config = config
        self.wall_clock = wall_clock
        self.sockets = bind_sockets(config, 1)[0]
        self.port = self.sockets.udp[0].getsockname()[1]
        # the DoT and DoH listeners', when the config has them (tls.dot_listen, tls.doh_listen)
        self.dot_port = self.sockets.dot[0].getsockname()[1] if self.sockets.dot else 0
        self.doh_port = self.sockets.doh[0].getsockname()[1] if self.sockets.doh else 0
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bns-worker", daemon=True)

    def _run(self) -> None:
        uvloop.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.worker = Worker(self.config, self.sockets)
        if self.wall_clock is not None:
            self.worker.resolver._wall_clock = self.wall_clock
        await self.worker.start()
        self._ready.set()
        await self._stop.wait()
        await self.worker.stop()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "worker did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.sockets.close()

    def call(self, function: Any, *args: Any) -> Any:
        """Run `function(*args)` on the worker's loop and return its result (for inspecting state)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(_call(function, *args), self.loop).result(5)

    def ask(
        self, name: str, rdtype: str = "A", *, tcp: bool = False, timeout: float = 3.0, **make_query: Any
    ) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, **make_query)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(query, "127.0.0.1", port=self.port, timeout=timeout)


async def _call(function: Any, *args: Any) -> Any:
    return function(*args)


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream(script=Script(ttl=300)) as server:
        yield server


@pytest.fixture
def server(upstream: ScriptedUpstream) -> Iterator[ServerThread]:
    with ServerThread(make_config([upstream.address])) as running:
        yield running


def answer_addresses(response: dns.message.Message) -> list[str]:
    return [item.address for rrset in response.answer for item in rrset if rrset.rdtype in (1, 28)]


def rdtype(name: str) -> int:
    return dns.rdatatype.from_text(name)


def _redis_or_skip() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("BNS_REQUIRE_REDIS"):
            pytest.fail("redis-server is required here (BNS_REQUIRE_REDIS is set) but is not installed")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server); CI installs it")


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by key prefix (see `redis_prefix`)."""
    _redis_or_skip()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test alone, which it may kill, freeze and start again."""
    _redis_or_skip()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sentinel_deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    _redis_or_skip()
    if shutil.which("redis-sentinel") is None:
        if os.environ.get("BNS_REQUIRE_REDIS"):
            pytest.fail("redis-sentinel is required here (BNS_REQUIRE_REDIS is set) but is not installed")
        pytest.skip("redis-sentinel is not installed (Debian: apt-get install redis-sentinel); CI installs it")
    deployment = SentinelDeployment(tmp_path / "sentinel")
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def redis_policy_store(url: str, prefix: str) -> RedisStore:
    """The policy store a node would open on this Redis (closing it closes its connection)."""
    return RedisStore(RedisConnection(url, prefix), load_catalog())


@pytest.fixture
def redis_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="module")
def lists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled list with one name per category the policy tests use, and the sample of public encrypted DNS
    servers (encrypted-dns: dns.google, cloudflare-dns.com…)."""
    directory = tmp_path_factory.mktemp("policy-lists")
    out = directory / "lists.bns"
    sources = [Source(FIXTURES / "encrypted-dns.txt.gz", "encrypted-dns")]
    for category, names in (
        ("pornography", "porn.example\n"),
        ("drugs", "drug.example\n"),
        ("malware", "malware.example\n"),
    ):
        path = directory / f"{category}.txt"
        path.write_text(names)
        sources.append(Source(path, category))
    compile_lists(sources, out, load_catalog())
    return out


def eventually(check: Callable[[], object], within: float) -> float:
    """Seconds until `check()` is true, polled; fails the test after `within` seconds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"not within {within} s"
        time.sleep(0.02)
    return time.monotonic() - started
