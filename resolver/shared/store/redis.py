"""How this package reaches Redis: the URL forms it accepts, the clients it builds, the errors it expects.

`store.redis` takes a plain URL (`redis://host:port/db`, `rediss://` for TLS, `unix:///path?db=0`) or a
Sentinel URL, so that a deployment survives the loss of its primary:

    sentinel://[[user]:password@]host:port[,host:port…]/service[/db][?sentinel_password=…]

With Sentinel, every new connection asks the sentinels for the current primary, and a connection still
talking to a demoted one is dropped on its first READONLY reply (redis-py's Sentinel support), so a
failover costs the callers one failed call each, which they treat like any outage.

Every failure of Redis itself (refused, reset, timed out, loading, read-only, no primary) is a
`redis.exceptions.RedisError` or an `OSError`: `STORE_ERRORS` is the one list callers catch.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

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
                raise ValueError(f"{url!r}: port {port_text!r} is not a number")
            port = int(port_text)
        if not host:
            raise ValueError(f"{url!r}: expected sentinel://host:port[,host:port…]/service[/db]")
        sentinels.append((host, port))
    path = [part for part in parsed.path.split("/") if part]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{url!r}: the path must be /service or /service/db (the name the sentinels monitor)")
    query = urllib.parse.parse_qs(parsed.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"{url!r}: unknown parameter {sorted(unknown)[0]!r} (known: sentinel_password)")
    return SentinelTarget(tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, username, password,
                          query.get("sentinel_password", [None])[0])


def check_redis_url(url: str) -> str:
    """`url` if this package can use it; ValueError naming what is wrong (for the config's `store.redis`)."""
    if not url:
        return url
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in _SENTINEL_SCHEMES:
        parse_sentinel_url(url)
    elif scheme not in _PLAIN_SCHEMES:
        raise ValueError(f"{url!r}: expected redis://, rediss://, unix:// or sentinel:// "
                         f"(sentinel://host:26379,host:26379/service)")
    return url


def is_sentinel(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in _SENTINEL_SCHEMES


def connect(url: str, timeout: float, retries: int = 1, **options: Any) -> redis.Redis:
    """A client for `url`. `retries`: calls repeated at once on a fresh connection after a connection error
    (after a restart of Redis every pooled connection is dead; 0 where a repeat must not happen unseen)."""
    settings: dict[str, Any] = {
        "socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), retries),
        "retry_on_error": [ConnectionError, TimeoutError] if retries else [], **options,
    }
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **settings)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout,
                         "password": target.sentinel_password},
        username=target.username, password=target.password, db=target.db, **settings,
    )
    return sentinel.master_for(target.service)


def describe(url: str) -> str:
    """The URL without its password, for log lines and errors."""
    parsed = urllib.parse.urlsplit(url)
    if "@" not in parsed.netloc:
        return url
    return urllib.parse.urlunsplit(parsed._replace(netloc="…@" + parsed.netloc.rpartition("@")[2]))
