"""Site tokens: a subscriber's credential for the admin API, good for one site's own routes until it expires,
its site is deleted or made again, or it is revoked.

`site.<base64url(JSON {site, incarnation, id, expires})>.<base64url(HMAC-SHA256)>`, signed with the key that
signs the pages' continue tokens (`pages.secret`, else the key every node shares through Redis, else the one
the node keeps in its cache directory), under a label of its own so that neither kind of token can pass for the
other. A token that could not outlive a restart (the node could keep no key) is not made. An operator token makes them
(`POST /v1/sites/{site}/tokens`); each is recorded with its site in the policy store (policies.py), and
`DELETE /v1/sites/{site}/tokens/{id}` revokes one by removing its record.

A token is good while its signature holds, it has not expired, its site's incarnation is the one it names
(the site was neither deleted nor made again since) and its record is there. The last two are read from the
store on every request (one read); a token that cannot be checked, the store being out of reach, is refused
(StoreUnavailable, 503), never accepted. A token of the format before incarnations names none: refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from resolver.shared.errors import BnsError, NotFound, StoreUnavailable, TokenUncheckable
from resolver.shared.policy.model import PolicyError
from resolver.shared.store.page_tokens import Secret
from resolver.shared.store.policies import Store, TokenRecords

PREFIX = "site."
MAX_DAYS = 366
DEFAULT_DAYS = 30
_LABEL = b"bns site token\x00"
_MAX_LENGTH = 1024


@dataclass(frozen=True)
class Claims:
    """What a token says."""

    site: str
    incarnation: str
    id: str
    expires: int


class SiteTokens:
    def __init__(self, secret: Secret, store: Store | None, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._store = store
        self._clock = clock

    async def issue(self, site: str, days: object = None) -> tuple[str, Claims]:
        """A token for `site`, good for `days` (None: DEFAULT_DAYS), and what it says. Raises PolicyError
        (days), NotFound (no such site), StoreUnavailable."""
        days = DEFAULT_DAYS if days is None else days
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= MAX_DAYS:
            raise PolicyError("days", f"must be a number of days above 0 and at most {MAX_DAYS}")
        await self._secret.key()
        if self._secret.fleeting is not None:
            raise BnsError(
                f"a site token made now would die at this node's next restart: {self._secret.fleeting}; "
                "set pages.secret (or $BNS_PAGES_SECRET) or store.redis"
            )
        now, token_id = self._clock(), secrets.token_urlsafe(12)
        expires = round(now + days * 86400)
        incarnation = await self._kept().change_site_tokens(
            site, lambda records: {**_live(records, now), token_id: expires}
        )
        claims = Claims(site, incarnation, token_id, expires)
        payload = base64.urlsafe_b64encode(json.dumps(asdict(claims), separators=(",", ":")).encode())
        return f"{PREFIX}{payload.decode()}.{await self._mac(payload)}", claims

    async def revoke(self, site: str, token_id: str) -> None:
        """Remove a live token's record: refused from then on, on every node. Raises NotFound."""
        now = self._clock()

        def without(records: TokenRecords) -> TokenRecords:
            live = _live(records, now)
            if live.pop(token_id, None) is None:
                raise NotFound(f"site {site} has no live token {token_id!r} (revoked, expired or never made)")
            return live

        await self._kept().change_site_tokens(site, without)

    async def live(self, site: str) -> TokenRecords:
        """The site's live tokens: id → when it expires. Raises NotFound."""
        found = await self._kept().site_tokens(site)
        if found is None:
            raise NotFound(f"no site {site!r}")
        return _live(found[1], self._clock())

    async def site_of(self, token: str) -> str | None:
        """The site a good token is for; None for anything else. Raises StoreUnavailable when the token is
        soundly signed and unexpired but the store cannot say whether it is still good."""
        claims = await self._claims(token)
        if claims is None or self._store is None:
            return None
        try:
            found = await self._store.site_tokens(claims.site)
        except StoreUnavailable:  # said without where the store is: the holder may be anyone
            raise TokenUncheckable("the store is out of reach") from None
        if found is None or found[0] != claims.incarnation or claims.id not in found[1]:
            return None
        return claims.site

    async def signed(self, token: str) -> bool:
        """Whether `token` is a soundly signed, unexpired site token (whatever the store says of it now)."""
        return await self._claims(token) is not None

    async def _claims(self, token: str) -> Claims | None:
        """What a soundly signed, unexpired token says; None for anything else."""
        if not token.startswith(PREFIX) or len(token) > _MAX_LENGTH:
            return None
        payload, _, mac = token[len(PREFIX) :].encode("utf-8", "replace").partition(b".")
        try:
            expected = await self._mac(payload)
        except StoreUnavailable:  # the shared key is in Redis: said without where Redis is
            raise TokenUncheckable("the store is out of reach") from None
        if not payload or not hmac.compare_digest(mac, expected.encode()):
            return None
        try:
            claims = Claims(**json.loads(base64.urlsafe_b64decode(payload)))
        except (ValueError, TypeError):
            return None
        sound = all(isinstance(text, str) for text in (claims.site, claims.incarnation, claims.id))
        return claims if sound and isinstance(claims.expires, int) and self._clock() < claims.expires else None

    async def _mac(self, payload: bytes) -> str:
        digest = hmac.new(await self._secret.key(), _LABEL + payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode()

    def _kept(self) -> Store:
        if self._store is None:
            raise BnsError("no policy store is configured (store.redis or store.file): site tokens are kept there")
        return self._store


def _live(records: TokenRecords, now: float) -> TokenRecords:
    """The records of tokens not yet expired: an expired token's record is dropped at the next change."""
    return {token_id: expires for token_id, expires in records.items() if expires > now}
