"""HTTP requests this node makes to URLs others gave it (a site's webhook, a list feed): it connects only to the
addresses the operator lets it reach (model.may_post_to: a public address, or one in the setting's networks),
never through a proxy from the environment. A host name is resolved here and only the addresses that pass are
given to the connector, so a name that resolves, or rebinds between two requests, to 127.0.0.1 or a neighbour
reaches nothing."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.abc import AbstractResolver

from resolver.shared.policy.model import may_post_to

if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult  # aiohttp ≥ 3.10; before, a plain dict of the same keys


class TargetRefused(OSError):
    """A host resolves to no address this node may reach."""


class _CheckedResolver(AbstractResolver):
    """A host name resolved, keeping only the addresses this node may reach: the connector connects to one of
    those, with the name still in the Host header and TLS's server name."""

    def __init__(self, allow: tuple[str, ...], setting: str) -> None:
        self._allow = allow
        self._setting = setting
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        kept = [entry for entry in found if may_post_to(entry["host"], self._allow)]
        if not kept:
            addresses = ", ".join(sorted({entry["host"] for entry in found}))
            raise TargetRefused(
                f"{host} resolves to {addresses}, not a public address; to reach it, add its network to {self._setting}"
            )
        return kept

    async def close(self) -> None:
        await self._resolver.close()


def checked_session(allow: tuple[str, ...], setting: str, timeout: float, **options: object) -> aiohttp.ClientSession:
    """A client that connects only to addresses may_post_to lets through with `allow` (the networks of
    `setting`, named in its refusals), with no proxy from the environment."""
    connector = aiohttp.TCPConnector(resolver=_CheckedResolver(allow, setting))
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        trust_env=False,
        **options,  # type: ignore[arg-type]
    )
