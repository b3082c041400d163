"""Where the node's shared state lives: Redis (every node of a fleet) or local files (one box)."""

from __future__ import annotations

from pathlib import Path

from blocklists.catalog import Catalog
from resolver.shared.config import StoreSettings
from resolver.shared.store.file_policies import FileStore
from resolver.shared.store.policies import Store
from resolver.shared.store.redis_policies import RedisStore


def open_store(settings: StoreSettings, catalog: Catalog) -> Store | None:
    """The configured store: Redis when a URL is given, else the embedded file, else none."""
    if settings.redis:
        return RedisStore(settings.redis, catalog, settings.prefix, write_replicas=settings.write_replicas)
    if settings.file:
        return FileStore(Path(settings.file), catalog)
    return None
