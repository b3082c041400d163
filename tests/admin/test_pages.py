"""Continue tokens: signed, expiring, single use; the pages' secret."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from resolver.admin.pages import ContinueTokens, Offer, TokenRefused
from resolver.shared.config import load_config
from resolver.shared.store.page_tokens import LocalUsedTokens, Secret

pytestmark = pytest.mark.unit
OFFER = Offer("home", "laptop", "phish.example", 1600.0, "n0nce")
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
    for bad in (f"{forged}.{mac}", payload, f"{payload}.", "", "x" * 5000, f"{payload}.{mac}x", f"{payload}.é", "é.é"):
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
        forgotten = await used.claim("a", 2000.0)
        await used.release("a")
        return [first, again, other, forgotten, await used.claim("a", 2000.0)]

    assert asyncio.run(claims()) == [True, False, True, True, True]


def test_the_secret_is_configured_or_made():
    def signed(secret: Secret) -> str:
        return ContinueTokens(asyncio.run(secret.key())).sign(OFFER)

    configured = signed(Secret(load_config(None, {"pages": {"secret": "s" * 16}}, {}).pages.secret, None))
    from_environment = signed(Secret(load_config(None, None, {"BNS_PAGES_SECRET": "s" * 16}).pages.secret, None))
    made = {signed(Secret(load_config(None, None, {}).pages.secret, None)) for _ in range(2)}
    assert configured == from_environment == ContinueTokens(b"s" * 16).sign(OFFER) and len(made) == 2
