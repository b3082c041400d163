"""The one place that decides where each kind of state lives: every store of a process, built from its
configuration, on Redis when `store.redis` is set, else local (the embedded policy file and this node's
directories). Nothing else asks which kind a store is."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from blocklists.catalog import Catalog
from resolver.shared.config import Config
from resolver.shared.lists import cache_dir_of, served_path
from resolver.shared.store.activity import Activity, LocalActivity, RedisActivity
from resolver.shared.store.file_policies import FileStore
from resolver.shared.store.page_tokens import LocalUsedTokens, RedisUsedTokens, Secret, UsedTokens
from resolver.shared.store.policies import Store
from resolver.shared.store.publications import LocalPublications, Publications, RedisPublications, Settled
from resolver.shared.store.redis import RedisConnection
from resolver.shared.store.redis_policies import RedisStore
from resolver.shared.store.shelves import LocalShelf, RedisShelf, Shelf


@dataclass
class Backends:
    """The stores of one process. `follow` runs their notices until cancelled (Redis's one subscription, or
    the policy file's polling); `close` lets their connections go."""

    policies: Store | None
    publications: Publications
    shelf: Shelf
    used_tokens: UsedTokens
    secret: Secret
    activity: Activity
    _follow: Callable[[], Awaitable[None]]
    _close: Callable[[], Awaitable[None]]

    async def follow(self) -> None:
        await self._follow()

    async def close(self) -> None:
        await self._close()


def open_backends(config: Config, catalog: Catalog, settled: Settled | None = None) -> Backends:
    """`settled`: told which published list the node must serve, once it has learnt it (the admin process)."""
    served, _required = served_path(config.lists)
    cache = cache_dir_of(config.lists)
    settings = config.store
    if settings.redis:
        redis = RedisConnection(settings.redis, settings.prefix)
        return Backends(
            RedisStore(redis, catalog, settings.write_replicas, config.limits, config.admin.webhook_allow),
            RedisPublications(catalog, served, redis, cache / "fetched", settled),
            RedisShelf(redis),
            RedisUsedTokens(redis),
            Secret(config.pages.secret, redis),
            RedisActivity(redis, config.activity),
            redis.listen,
            redis.close,
        )
    policies = (
        FileStore(Path(settings.file), catalog, limits=config.limits, webhook_allow=config.admin.webhook_allow)
        if settings.file
        else None
    )
    return Backends(
        policies,
        LocalPublications(catalog, served, cache / "versions"),
        LocalShelf(cache / "sources"),
        LocalUsedTokens(),
        Secret(config.pages.secret, None, cache / "pages.key"),
        LocalActivity(config.activity),
        policies.poll if policies is not None else _nothing,
        _nothing,
    )


async def _nothing() -> None:
    return None
