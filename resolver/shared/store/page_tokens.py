"""Where the pages keep what the fleet must share: the key that signs continue tokens (and site tokens), and the
tokens already used (each accepted once: Redis SET NX, or this node's memory without Redis)."""

from __future__ import annotations

import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from resolver.shared.errors import StoreUnavailable
from resolver.shared.store.redis import RedisConnection

log = logging.getLogger(__name__)


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
    node that needs it), else kept in a file of the node (`kept`: made once, 0600), else this run's. Fetched
    when first needed, so that a node starts while Redis is down; until it is back, warning pages offer no
    button."""

    def __init__(self, configured: str, store: RedisConnection | None, kept: Path | None = None) -> None:
        self._key = configured.encode() if configured else None
        self._store = store
        self._kept = kept
        # Why a token signed now would die at the next restart (this run's key); None: it would not.
        self.fleeting: str | None = None
        if self._key is None and store is None and kept is None:
            self._key, self.fleeting = secrets.token_bytes(32), "the key that signs it is this run's"

    async def key(self) -> bytes:
        """Raises StoreUnavailable while the shared key cannot be read."""
        if self._key is None and self._kept is not None:
            self._key = self._keep(self._kept)
        if self._key is None:
            assert self._store is not None
            key = self._store.key("pages", "secret")
            await self._store.call(self._store.client.set(key, secrets.token_hex(32), nx=True))
            shared = await self._store.call(self._store.client.get(key))
            if not shared:
                raise StoreUnavailable("the shared page key vanished from Redis")
            self._key = shared if isinstance(shared, bytes) else shared.encode()
        return self._key

    def _keep(self, path: Path) -> bytes:
        """The key in `path`, made there first if there is none; this run's key (and `fleeting` saying so)
        if it can be neither read nor made."""
        try:
            try:
                key = path.read_bytes()
            except FileNotFoundError:
                key = _make_key(path)
                log.warning(
                    "pages: made the key that signs site tokens and continue tokens, kept in %s "
                    "(pages.secret is empty and there is no store.redis); tokens outlive restarts while it "
                    "stays: back it up with the policy file, or set pages.secret",
                    path,
                )
            if len(key) != _KEY_BYTES:
                raise ValueError(f"{path} holds {len(key)} bytes, not a key of {_KEY_BYTES}")
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning(
                "pages: cannot keep the key that signs tokens in %s (%s): site tokens are refused, and "
                "continue tokens die at a restart; set pages.secret, or fix that file",
                path,
                reason,
            )
            self.fleeting = "the key that signs it could not be kept on this node (its log says why)"
            return secrets.token_bytes(_KEY_BYTES)
        return key


_KEY_BYTES = 32


def _make_key(path: Path) -> bytes:
    """A new key, written to `path` whole or not at all (0600), unless another process made one there
    first: then that one."""
    key = secrets.token_bytes(_KEY_BYTES)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, path)  # unlike a rename, never replaces a key another process made meanwhile
    except FileExistsError:
        return path.read_bytes()
    finally:
        temporary.unlink(missing_ok=True)
    return key
