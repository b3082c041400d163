"""The one way this package reaches Redis: the URLs it accepts, the connection, the errors, the notices, and
every key it uses.

`store.redis` takes a plain URL (`redis://host:port/db`, `rediss://` for TLS, `unix:///path?db=0`) or a
Sentinel URL, so that a deployment survives the loss of its primary:

    sentinel://[[user]:password@]host:port[,host:port…]/service[/db][?sentinel_password=…]

With Sentinel, every new connection asks the sentinels for the current primary, and a connection still
talking to a demoted one is dropped on its first READONLY reply (redis-py's Sentinel support), so a
failover costs the callers one failed call each, which they treat like any outage.

Every failure of Redis itself (refused, reset, timed out, loading, read-only, no primary) is a
`redis.exceptions.RedisError` or an `OSError`; `RedisConnection.call` turns them into StoreUnavailable.

The keys, all under `store.prefix` (default `bns:`):

    policies (redis_policies.py)
    site:{id}               hash    doc = the site's JSON document, version = bumped on every write,
                                    incarnation = made with the site, tokens = its live site tokens
                                    (JSON: id → expiry); all deleted with the site (policies.py)
    sites                   set     every site id
    net                     hash    network (CIDR) → site id, to find a client's site by address
    netlens                 hash    "4/29", "6/56"… → how many networks have that family and prefix length
    cpe                     hash    CPE id → site id
    clientid                hash    a device's client id → site id, to find a DoT or DoH client fleet-wide
    profile:{name}          hash    doc, version
    profiles                set     every profile name
    written:{id}            string  set by each write's transaction, kept ten minutes: was it applied?
    changes                 channel "site <id> <version>", "profile <name> <version>", "networks" (a
                                    network, CPE id or client id changed site)

    published lists (publications.py)
    lists:version:{v}       hash    checksum, size, chunks, names, published_at, counts (JSON)
    lists:chunk:{v}:{n}     string  the artifact's bytes, 4 MB at a time (Redis strings stop at 512 MB)
    lists:history           list    every published version, oldest first
    lists:current           string  the version every node serves
    lists                   channel the new current version

    list sources kept by the API (shelves.py)
    sources                 hash    source id → its entry (JSON)
    sources:data:{id}:{n}   string  an uploaded source's bytes, 4 MB at a time

    pages (page_tokens.py)
    pages:secret            string  the key that signs "continue anyway" tokens, made by the first node
    pages:used:{nonce}      string  a token accepted once, until it expires
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from resolver.shared.errors import StoreUnavailable

STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)
_SENTINEL_SCHEMES = ("sentinel", "redis+sentinel")
_PLAIN_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A Sentinel deployment: where the sentinels are, which service, and how to log in."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """A `sentinel://` URL's parts, or ValueError saying what is wrong with it."""
    parsed = urllib.parse.urlsplit(url)
    userinfo, _, hosts = parsed.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) or None
    sentinels = []
    for item in hosts.split(","):
        host, port = item, _SENTINEL_PORT
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else _SENTINEL_PORT
        elif item.count(":") == 1:
            host, port_text = item.split(":")
            if not port_text.isdigit():
                raise ValueError(f"{describe(url)!r}: port {port_text!r} is not a number")
            port = int(port_text)
        if not host:
            raise ValueError(f"{describe(url)!r}: expected sentinel://host:port[,host:port…]/service[/db]")
        sentinels.append((host, port))
    path = [part for part in parsed.path.split("/") if part]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"{describe(url)!r}: the path must be /service or /service/db (the name the sentinels monitor)"
        )
    query = urllib.parse.parse_qs(parsed.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"{describe(url)!r}: unknown parameter {sorted(unknown)[0]!r} (known: sentinel_password)")
    return SentinelTarget(
        tuple(sentinels),
        path[0],
        int(path[1]) if len(path) == 2 else 0,
        username,
        password,
        query.get("sentinel_password", [None])[0],
    )


def check_redis_url(url: str) -> str:
    """`url` if this package can use it; ValueError naming what is wrong (for the config's `store.redis`)."""
    if not url:
        return url
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in _SENTINEL_SCHEMES:
        parse_sentinel_url(url)
    elif scheme not in _PLAIN_SCHEMES:
        raise ValueError(
            f"{describe(url)!r}: expected redis://, rediss://, unix:// or sentinel:// "
            "(sentinel://host:26379,host:26379/service)"
        )
    return url


def is_sentinel(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in _SENTINEL_SCHEMES


def connect(url: str, timeout: float, retries: int = 1, **options: Any) -> redis.Redis:
    """A client for `url`. `retries`: calls repeated at once on a fresh connection after a connection error
    (after a restart of Redis every pooled connection is dead; 0 where a repeat must not happen unseen)."""
    settings: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), retries),
        "retry_on_error": [ConnectionError, TimeoutError] if retries else [],
        **options,
    }
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **settings)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "password": target.sentinel_password,
        },
        username=target.username,
        password=target.password,
        db=target.db,
        **settings,
    )
    return sentinel.master_for(target.service)


def describe(url: str) -> str:
    """The URL without its credentials (`user:password@`, `?sentinel_password=`), for log lines and errors."""
    parsed = urllib.parse.urlsplit(url)
    if "@" in parsed.netloc:
        parsed = parsed._replace(netloc="…@" + parsed.netloc.rpartition("@")[2])
    if parsed.query:
        parsed = parsed._replace(query="…")
    return urllib.parse.urlunsplit(parsed)


@dataclass(frozen=True)
class Notice:
    """What a subscriber of a channel hears: a `message`, `up` (subscribed; `resumed` after a break, when
    messages may have been missed), or `down` (the subscription broke; `data` says why)."""

    kind: str
    data: str = ""
    resumed: bool = False


Subscriber = Callable[[Notice], Awaitable[None]]
_MAX_BACKOFF = 5.0


class RedisConnection:
    """A process's connection to Redis: one client for calls, and one subscription for every channel a part
    of the process follows, dispatched to its subscriber."""

    def __init__(self, url: str, prefix: str, timeout: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        # One retry on a fresh connection: after a restart of Redis, pooled connections are dead.
        self.client = connect(url, timeout, retries=1)
        # The subscription must never reconnect behind our back: notices published meanwhile would be lost
        # unseen. Without retries, every break reaches `listen`, which tells the subscribers.
        self._subscriber_client = connect(url, timeout, retries=0)
        self._subscribers: dict[str, Subscriber] = {}

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"redis at {describe(self.url)}: {exc or type(exc).__name__}")

    async def call(self, coroutine: Any) -> Any:
        """The result of one call; StoreUnavailable when Redis cannot give it."""
        try:
            return await coroutine
        except STORE_ERRORS as exc:
            raise self.unavailable(exc) from None

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Have `subscriber` hear the notices of `channel` (under the prefix) once `listen` runs. A subscriber
        handles its own failures: one that raises stops the notices of the process."""
        self._subscribers[self.key(channel)] = subscriber

    async def listen(self) -> None:
        """Until cancelled: one subscription to every subscribed channel, each message to its subscriber;
        after a break, reconnect with backoff and tell every subscriber (`down`, then `up`, `resumed`)."""
        if not self._subscribers:
            return
        backoff, resumed = 0.1, False
        while True:
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._subscribers)
                backoff = 0.1
                await self._tell_all(Notice("up", resumed=resumed))
                resumed = True
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        subscriber = self._subscribers.get(message["channel"].decode())
                        if subscriber is not None:
                            await subscriber(Notice("message", message["data"].decode()))
            except STORE_ERRORS as exc:
                await self._tell_all(Notice("down", str(self.unavailable(exc))))
                resumed = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _tell_all(self, notice: Notice) -> None:
        for subscriber in self._subscribers.values():
            await subscriber(notice)

    async def close(self) -> None:
        await self.client.aclose()
        await self._subscriber_client.aclose()
