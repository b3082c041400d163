"""Where the pages keep what the fleet must share: the key that signs continue tokens, and the tokens already used
(each accepted once: Redis SET NX, or this node's memory without Redis)."""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from resolver.shared.errors import StoreUnavailable
from resolver.shared.store.redis import RedisConnection


class UsedTokens(ABC):
    """Remembers the tokens already accepted, until they expire, so that each opens a pass once."""

    @abstractmethod
    async def claim(self, nonce: str, expires: float) -> bool:
        """True the first time a nonce is claimed, False after. Raises StoreUnavailable."""

    @abstractmethod
    async def release(self, nonce: str) -> None:
        """Forget a claim whose pass could not be written, so that the user can press the button again."""


class LocalUsedTokens(UsedTokens):
    """One node without Redis: its admin process is the only one that accepts tokens."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._used: dict[str, float] = {}
        self._clock = clock

    async def claim(self, nonce: str, expires: float) -> bool:
        now = self._clock()
        self._used = {other: end for other, end in self._used.items() if end > now}
        if nonce in self._used:
            return False
        self._used[nonce] = expires
        return True

    async def release(self, nonce: str) -> None:
        self._used.pop(nonce, None)


class RedisUsedTokens(UsedTokens):
    """Every node shares Redis: SET NX with the token's expiry, so a token is accepted once in the fleet."""

    def __init__(self, connection: RedisConnection) -> None:
        self._store = connection

    async def claim(self, nonce: str, expires: float) -> bool:
        return bool(
            await self._store.call(
                self._store.client.set(self._store.key("pages", "used", nonce), "1", nx=True, exat=int(expires) + 1)
            )
        )

    async def release(self, nonce: str) -> None:
        await self._store.call(self._store.client.delete(self._store.key("pages", "used", nonce)))


class Secret:
    """The key that signs tokens: configured, else shared by every node through Redis (made by the first
    node that needs it), else this run's. Fetched when first needed, so that a node starts while Redis is
    down; until it is back, warning pages offer no button."""

    def __init__(self, configured: str, store: RedisConnection | None) -> None:
        self._key = configured.encode() if configured else None
        self._store = store
        if self._key is None and store is None:
            self._key = secrets.token_bytes(32)

    async def key(self) -> bytes:
        """Raises StoreUnavailable while the shared key cannot be read."""
        if self._key is None:
            assert self._store is not None
            key = self._store.key("pages", "secret")
            await self._store.call(self._store.client.set(key, secrets.token_hex(32), nx=True))
            shared = await self._store.call(self._store.client.get(key))
            if not shared:
                raise StoreUnavailable("the shared page key vanished from Redis")
            self._key = shared if isinstance(shared, bytes) else shared.encode()
        return self._key
