"""Site tokens: a subscriber's credential for the admin API, good for one site's own routes until it expires.

`site.<base64url(JSON {site, expires})>.<base64url(HMAC-SHA256)>`, signed with the key that signs the pages'
continue tokens (`pages.secret`, else the key every node shares through Redis), under a label of its own so
that neither kind of token can pass for the other. Any node of the fleet checks one without the store. An
operator token makes them (`POST /v1/sites/{site}/tokens`); one is withdrawn by letting it expire, or all at
once by changing `pages.secret`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

from resolver.shared.store.page_tokens import Secret

PREFIX = "site."
MAX_DAYS = 366
_LABEL = b"bns site token\x00"
_MAX_LENGTH = 1024


class SiteTokens:
    def __init__(self, secret: Secret, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    async def issue(self, site: str, days: float) -> tuple[str, float]:
        """A token for `site`, and when it expires. Raises StoreUnavailable while the shared key is out of reach."""
        expires = round(self._clock() + days * 86400)
        payload = base64.urlsafe_b64encode(json.dumps({"site": site, "expires": expires}).encode())
        return f"{PREFIX}{payload.decode()}.{await self._mac(payload)}", expires

    async def site_of(self, token: str) -> str | None:
        """The site a sound, unexpired site token is for; None for anything else."""
        if not token.startswith(PREFIX) or len(token) > _MAX_LENGTH:
            return None
        payload, _, mac = token[len(PREFIX) :].encode("utf-8", "replace").partition(b".")
        if not payload or not hmac.compare_digest(mac, (await self._mac(payload)).encode()):
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload))
            site, expires = claims["site"], float(claims["expires"])
        except (ValueError, TypeError, KeyError):
            return None
        return site if isinstance(site, str) and self._clock() < expires else None

    async def _mac(self, payload: bytes) -> str:
        digest = hmac.new(await self._secret.key(), _LABEL + payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode()
