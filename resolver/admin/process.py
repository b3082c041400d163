"""The node's admin process, beside the DNS workers: the admin API, the block and warning pages, and keeping
the published lists here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import uvloop
from aiohttp import web

from resolver.admin.alert_hooks import AlertHooks
from resolver.admin.api import Api, tokens_from
from resolver.admin.feeds import Feeds
from resolver.admin.metrics import Metrics
from resolver.admin.pages import Pages
from resolver.admin.recorder import Recorder
from resolver.admin.site_tokens import SiteTokens
from resolver.admin.sources import Sources
from resolver.admin.why import Explainer
from resolver.shared.config import Config
from resolver.shared.errors import StoreUnavailable
from resolver.shared.lists import cache_dir_of, served_path
from resolver.shared.loading import load_policy_and_lists, policy_maker
from resolver.shared.page_pool import PagePool
from resolver.shared.policy.model import Webhook
from resolver.shared.policy.service import PolicyService
from resolver.shared.run_directory import RunDirectory
from resolver.shared.signals import handle_signals
from resolver.shared.store.backends import open_backends

if TYPE_CHECKING:
    from resolver.shared.sockets import HttpSockets

log = logging.getLogger(__name__)

_STORE_CHECK = 2.0


_NOT_READY_LOG_INTERVAL = 5.0


class AdminNode:
    def __init__(self, config: Config, http: HttpSockets, run: RunDirectory) -> None:

        self.config = config
        self.http = http
        self.run = run
        self.catalog, maker, self.lists = load_policy_and_lists(config)
        self.backends = open_backends(config, self.catalog, self._settled)
        self.store = self.backends.policies
        self.publications = self.backends.publications
        self.lists_settled = False
        self.store_up: int = -1 if self.store is None else 1
        metrics = Metrics(run.path, self._state, config.server.worker_count)
        self.hooks = AlertHooks(metrics, self._webhook_of, config.admin.webhook_allow)
        self.recorder = Recorder(run.activity, self.backends.activity, self.store)
        self.explainer = Explainer(self.store, maker, self.catalog, self.lists)
        cache_dir = cache_dir_of(config.lists)
        self.sources = Sources(
            self.backends.shelf,
            self.catalog,
            self.publications,
            config.admin.source_roots,
            cache_dir / "compiles",
            config.admin.max_upload,
        )
        self.feeds = Feeds(self.backends.shelf, self.sources, config.feeds, cache_dir / "feeds")
        metrics.sections.append(self.feeds.metric_lines)
        self.api = Api(
            tokens_from(config.admin),
            self.catalog,
            self.store,
            self.publications,
            self.sources,
            self.feeds,
            self.explainer,
            metrics,
            config.admin.max_upload,
            config.admin.max_json,
            cache_dir / "uploads",
            SiteTokens(self.backends.secret, self.store),
            self.backends.activity,
            config.tls,
        )
        self.api.local_records = config.local.records
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.publications.watch()
        self._tasks = [
            loop.create_task(task)
            for task in (
                self.lists.watch(),
                self.backends.follow(),
                self.publications.follow(),
                self._check_store(),
                self.feeds.run(),
            )
        ]
        if self.store is not None:
            self._tasks += [loop.create_task(self.hooks.run()), loop.create_task(self.recorder.run())]
        if self.config.store.redis:  # the node follows published lists
            self._tasks.append(loop.create_task(self._settle_without_redis(self.config.lists.ready_timeout)))
        if self.http.admin is not None:
            await self._serve(self.api.app(), [self.http.admin])
        if self.http.pages or self.http.device_pages:
            await self._serve(self._pages().app(), [*self.http.pages, *self.http.device_pages])

    def _state(self) -> dict[str, Any]:
        return {
            "store_up": self.store_up,
            "webhook_delivered": self.hooks.delivered,
            "webhook_dropped": self.hooks.dropped,
            "webhook_refused": self.hooks.refused,
            "activity_lost": self.recorder.lost,
            "devices_evicted": self.recorder.evicted,
        }

    async def _webhook_of(self, site_id: str) -> Webhook | None:
        assert self.store is not None
        site = await self.store.load_site(site_id)
        return site.webhook if site is not None else None

    def _settled(self, version: str | None) -> None:
        """The published list this node must serve is installed (or none is published): the workers may
        answer once they serve it."""
        self.lists_settled = True
        self.run.set_lists_target(version)

    async def _settle_without_redis(self, patience: float) -> None:
        """Redis out of reach since the start: after `patience`, serve the verified list this node holds;
        holding none, keep the workers answering Not Ready (and say so) until Redis tells."""
        await asyncio.sleep(patience)
        while not self.lists_settled:
            held = self.lists.snapshot.matcher.artifact
            if held is not None:
                log.warning(
                    "lists: Redis has not said which list is current within lists.ready_timeout "
                    "(%.0f s); serving the verified list this node holds (version %s) meanwhile",
                    patience,
                    held.version,
                )
                self.run.set_lists_target(held.version)
                return
            log.warning(
                "lists: this node holds no list and Redis cannot say which is current: DNS answers "
                "SERVFAIL (EDE 14 Not Ready) until it can"
            )
            await asyncio.sleep(_NOT_READY_LOG_INTERVAL)

    def reload(self, config: Config) -> None:
        """Apply a configuration reloaded on SIGHUP (only the keys marked live differ from the current one)."""

        old, self.config = self.config, config
        logging.getLogger().setLevel(config.log.level.upper())
        if config.admin != old.admin:
            self.api.use_tokens(tokens_from(config.admin))
        if config.lists != old.lists:
            self.lists.retarget(served_path(config.lists)[0], config.lists.check_interval)
            self.publications.served = served_path(config.lists)[0]
        if config.policy != old.policy:
            self.explainer.maker = policy_maker(config, self.catalog)
        self.api.local_records = config.local.records
        if config.feeds != old.feeds:
            self.feeds.reconfigure(config.feeds)

    def _pages(self) -> Pages:
        service = PolicyService(self.store) if self.store is not None else None
        return Pages(
            self.explainer,
            service,
            self.backends.secret,
            self.backends.used_tokens,
            self.config.pages,
            self.catalog,
            self.config.policy.blocked_ttl,
            pool=PagePool(self.config.pages.device_networks),
        )

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
        await self.backends.close()


async def _run_until_signalled(config: Config, http: HttpSockets, run: RunDirectory) -> int:
    node = AdminNode(config, http, run)
    await node.start()
    stop = handle_signals(lambda: node.reload(run.read_config()))
    await stop.wait()
    await node.stop()
    return 0


def run_admin(config: Config, http: HttpSockets, run: RunDirectory) -> int:
    return uvloop.run(_run_until_signalled(config, http, run))
