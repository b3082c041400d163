"""The node's admin process, beside the DNS workers: the admin API, the block and warning pages, and keeping
the published lists here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop
from aiohttp import web

from resolver.admin.api import Api, tokens_from
from resolver.admin.why import Explainer
from resolver.config import Config
from resolver.lists import cache_dir_of, served_path
from resolver.metrics import Metrics
from resolver.pages import LocalUsedTokens, Pages, RedisUsedTokens, Secret, UsedTokens
from resolver.policy.service import PolicyService
from resolver.policy.store import RedisStore, Store, StoreUnavailable, open_store
from resolver.publishing import LocalPublications, Publications, RedisPublications
from resolver.sources import LocalShelf, RedisShelf, Sources

if TYPE_CHECKING:
    from resolver.server import HttpSockets

log = logging.getLogger(__name__)

_STORE_CHECK = 2.0


def publications_for(config: Config, store: Store | None, catalog: Any) -> Publications:
    """Redis when the policies are there (every node shares it), else this node's own directory."""
    served, _required = served_path(config.lists)
    cache_dir = cache_dir_of(config.lists)
    if isinstance(store, RedisStore):
        return RedisPublications(catalog, served, store, cache_dir / "fetched")
    return LocalPublications(catalog, served, cache_dir / "versions")


class AdminNode:
    def __init__(self, config: Config, http: HttpSockets, metrics_dir: Path, verified_lists: Path | None = None
                 ) -> None:
        from resolver.server import load_policy_and_lists  # noqa: PLC0415  (server imports this module)

        self.config = config
        self.http = http
        self.catalog, maker, self.lists = load_policy_and_lists(config, verified_lists)
        settings = config.store
        self.store = open_store(settings, self.catalog)
        self.publications = publications_for(config, self.store, self.catalog)
        self.store_up: int = -1 if self.store is None else 1
        metrics = Metrics(metrics_dir, lambda: {"store_up": self.store_up})
        self.explainer = Explainer(self.store, maker, self.catalog, self.lists)
        cache_dir = cache_dir_of(config.lists)
        shelf = RedisShelf(self.store) if isinstance(self.store, RedisStore) else LocalShelf(cache_dir / "sources")
        self.sources = Sources(shelf, self.catalog, self.publications, config.admin.source_roots,
                               cache_dir / "compiles")
        self.api = Api(tokens_from(config.admin), self.catalog, self.store, self.publications, self.sources,
                       self.explainer, metrics, config.admin.max_upload, cache_dir / "uploads")
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.lists.watch()), loop.create_task(self.publications.follow()),
                       loop.create_task(self._check_store())]
        if self.http.admin is not None:
            await self._serve(self.api.app(), [self.http.admin])
        if self.http.pages:
            await self._serve(self._pages().app(), self.http.pages)

    def _pages(self) -> Pages:
        redis = self.store if isinstance(self.store, RedisStore) else None
        used: UsedTokens = RedisUsedTokens(redis) if redis is not None else LocalUsedTokens()
        service = PolicyService(self.store) if self.store is not None else None
        return Pages(self.explainer, service, Secret(self.config.pages, redis), used, self.config.pages,
                     self.catalog, self.config.policy.blocked_ttl)

    async def _serve(self, app: web.Application, sockets: list[Any]) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        self._runners.append(runner)

    async def _check_store(self) -> None:
        if self.store is None:
            return
        while True:
            try:
                await self.store.check()
                self.store_up = 1
            except StoreUnavailable:
                self.store_up = 0
            await asyncio.sleep(_STORE_CHECK)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        await self.sources.stop()  # else the compiler's thread would hold the process until it finished
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.store is not None:
            await self.store.close()


async def _run_until_signalled(config: Config, http: HttpSockets, metrics_dir: Path,
                               verified_lists: Path | None) -> int:
    node = AdminNode(config, http, metrics_dir, verified_lists)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    await stop.wait()
    await node.stop()
    return 0


def run_admin(config: Config, http: HttpSockets, metrics_dir: Path, verified_lists: Path | None = None) -> int:
    return uvloop.run(_run_until_signalled(config, http, metrics_dir, verified_lists))
