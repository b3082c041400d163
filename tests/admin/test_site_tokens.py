"""Site tokens (resolver/admin/site_tokens.py): one site's, until they expire, and nothing else passes."""

from __future__ import annotations

import asyncio

import pytest

from resolver.admin.pages import ContinueTokens, Offer
from resolver.admin.site_tokens import SiteTokens
from resolver.shared.store.page_tokens import Secret

pytestmark = pytest.mark.unit


def test_a_token_names_its_site_until_it_expires_and_a_forgery_names_none():
    now = [1000.0]
    tokens = SiteTokens(Secret("key-for-tests", None), clock=lambda: now[0])
    token, expires = asyncio.run(tokens.issue("home", 1))
    assert expires == 1000 + 86400
    assert asyncio.run(tokens.site_of(token)) == "home"
    other_key = SiteTokens(Secret("another-key", None), clock=lambda: now[0])
    assert asyncio.run(other_key.site_of(token)) is None
    payload, mac = token.removeprefix("site.").split(".")
    assert asyncio.run(tokens.site_of(f"site.{payload[:-2]}AA.{mac}")) is None
    continue_token = ContinueTokens(b"key-for-tests").sign(Offer("home", "tablet", "x.example", 2e9, "n"))
    assert asyncio.run(tokens.site_of("site." + continue_token)) is None  # same key, another kind of token
    now[0] = expires
    assert asyncio.run(tokens.site_of(token)) is None
