"""Continue tokens: signed, expiring, single use; the pages' secret."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from resolver.config import PagesSettings
from resolver.pages import ContinueTokens, LocalUsedTokens, Offer, TokenRefused, pages_secret

pytestmark = pytest.mark.unit
OFFER = Offer("home", "laptop", "phish.example", 2000.0, 1600.0, "n0nce")
TOKENS = ContinueTokens(b"k" * 32)


def test_a_signed_offer_verifies_until_it_expires():
    token = TOKENS.sign(OFFER)
    assert TOKENS.verify(token, 1000.0) == OFFER
    with pytest.raises(TokenRefused, match="expired"):
        TOKENS.verify(token, 1600.0)


def test_another_key_or_a_changed_offer_is_refused():
    token = TOKENS.sign(OFFER)
    with pytest.raises(TokenRefused, match="not made by this network"):
        ContinueTokens(b"other-key" * 4).verify(token, 1000.0)
    payload, _, mac = token.partition(".")
    changed = json.loads(base64.urlsafe_b64decode(payload))
    changed["device"] = "phone"
    forged = base64.urlsafe_b64encode(json.dumps(changed, separators=(",", ":")).encode()).decode()
    for bad in (f"{forged}.{mac}", payload, f"{payload}.", "", "x" * 5000, f"{payload}.{mac}x"):
        with pytest.raises(TokenRefused):
            TOKENS.verify(bad, 1000.0)


def test_a_token_is_claimed_once_and_forgotten_when_it_expires():
    now = [1000.0]
    used = LocalUsedTokens(lambda: now[0])

    async def claims() -> list[bool]:
        first = await used.claim("a", 1600.0)
        again = await used.claim("a", 1600.0)
        other = await used.claim("b", 1600.0)
        now[0] = 1601.0
        return [first, again, other, await used.claim("c", 2000.0), "a" in used._used]

    assert asyncio.run(claims()) == [True, False, True, True, False]


def test_the_secret_is_configured_or_made():
    configured = asyncio.run(pages_secret(PagesSettings(secret="s" * 16), None, "bns:", {}))
    from_environment = asyncio.run(pages_secret(PagesSettings(), None, "bns:", {"BNS_PAGES_SECRET": "e" * 16}))
    made = {asyncio.run(pages_secret(PagesSettings(), None, "bns:", {})) for _ in range(2)}
    assert configured == b"s" * 16 and from_environment == b"e" * 16 and len(made) == 2
