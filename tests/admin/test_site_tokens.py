"""Site tokens (resolver/admin/site_tokens.py): one site's, until they expire, their site is deleted or made again,
or they are revoked; nothing else passes, and nothing passes that the store cannot vouch for."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from blocklists.catalog import load_catalog
from resolver.admin.pages import ContinueTokens, Offer
from resolver.admin.site_tokens import SiteTokens
from resolver.shared.errors import BnsError, NotFound, StoreUnavailable
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.file_policies import FileStore
from resolver.shared.store.page_tokens import Secret

pytestmark = pytest.mark.unit
KEY = "key-for-tests"


@pytest.fixture
def home(tmp_path: Path) -> tuple[FileStore, PolicyService]:
    store = FileStore(tmp_path / "policies.json", load_catalog())
    service = PolicyService(store)
    asyncio.run(service.put_site("home", {"mode": "device"}))
    return store, service


def payload_of(token: str) -> dict[str, object]:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[1]))


def test_a_token_names_its_site_incarnation_and_id_until_it_expires_and_a_forgery_names_none(home):
    store, _service = home
    now = [1000.0]
    tokens = SiteTokens(Secret(KEY, None), store, clock=lambda: now[0])
    token, claims = asyncio.run(tokens.issue("home", 1))
    incarnation, records = asyncio.run(store.site_tokens("home"))  # type: ignore[misc]
    assert claims.expires == 1000 + 86400 and len(incarnation) >= 22 and records == {claims.id: claims.expires}
    assert payload_of(token) == {"site": "home", "incarnation": incarnation, "id": claims.id, "expires": 87400}
    assert asyncio.run(tokens.site_of(token)) == "home"
    assert asyncio.run(SiteTokens(Secret("another-key", None), store, clock=lambda: now[0]).site_of(token)) is None
    payload, mac = token.removeprefix("site.").split(".")
    assert asyncio.run(tokens.site_of(f"site.{payload[:-2]}AA.{mac}")) is None
    continue_token = ContinueTokens(KEY.encode()).sign(Offer("home", "tablet", "x.example", 2e9, "n"))
    assert asyncio.run(tokens.site_of("site." + continue_token)) is None  # same key, another kind of token
    now[0] = claims.expires
    assert asyncio.run(tokens.site_of(token)) is None


def test_a_token_is_refused_once_its_site_is_deleted_or_made_again(home):
    store, service = home
    tokens = SiteTokens(Secret(KEY, None), store)
    token, _claims = asyncio.run(tokens.issue("home", 1))
    asyncio.run(service.put_site("home", {"mode": "network"}))  # a whole new document: the same site
    assert asyncio.run(tokens.site_of(token)) == "home"
    asyncio.run(service.delete_site("home"))
    assert asyncio.run(tokens.site_of(token)) is None
    asyncio.run(service.put_site("home", {"mode": "device"}))  # another subscriber's site, under the same id
    assert asyncio.run(tokens.site_of(token)) is None
    assert asyncio.run(tokens.live("home")) == {}
    assert asyncio.run(tokens.site_of(asyncio.run(tokens.issue("home", 1))[0])) == "home"


def test_a_revoked_token_is_refused_while_another_of_its_site_passes(home):
    store, _service = home
    now = [1000.0]
    tokens = SiteTokens(Secret(KEY, None), store, clock=lambda: now[0])
    revoked, first = asyncio.run(tokens.issue("home", 1))
    kept, second = asyncio.run(tokens.issue("home", 2))
    asyncio.run(tokens.revoke("home", first.id))
    assert asyncio.run(tokens.site_of(revoked)) is None and asyncio.run(tokens.site_of(kept)) == "home"
    assert asyncio.run(tokens.live("home")) == {second.id: second.expires}
    for site, token_id in (("home", first.id), ("home", "never-made"), ("ghost", second.id)):
        with pytest.raises(NotFound):
            asyncio.run(tokens.revoke(site, token_id))
    now[0] = second.expires  # expired: its record goes at the next change
    _token, third = asyncio.run(tokens.issue("home", 1))
    assert asyncio.run(store.site_tokens("home"))[1] == {third.id: third.expires}  # type: ignore[index]


def test_a_token_of_the_format_before_incarnations_is_refused(home):
    store, _service = home
    tokens = SiteTokens(Secret(KEY, None), store)
    asyncio.run(tokens.issue("home", 1))  # the site has an incarnation and a live token
    payload = base64.urlsafe_b64encode(json.dumps({"site": "home", "expires": 4e9}).encode())
    assert asyncio.run(tokens.site_of(f"site.{payload.decode()}.{asyncio.run(tokens._mac(payload))}")) is None


def test_a_token_the_store_cannot_check_is_refused_not_passed(home):
    store, _service = home
    tokens = SiteTokens(Secret(KEY, None), store)
    token, _claims = asyncio.run(tokens.issue("home", 1))
    store.path.write_text("{not a policy file")
    with pytest.raises(StoreUnavailable) as refused:
        asyncio.run(tokens.site_of(token))
    assert "cannot be checked now" in refused.value.explain() and str(store.path) not in refused.value.explain()
    assert asyncio.run(tokens.site_of("site.forged.mac")) is None  # no store needed to refuse a forgery


def test_without_a_configured_key_or_redis_the_key_is_kept_once_in_a_private_file(home, tmp_path, caplog):
    """Issue 19: a node without Redis and pages.secret signed with a key made per run, so every link died at
    its next restart. The key is made once, 0600, and read back by the next run (a new Secret)."""
    store, _service = home
    kept = tmp_path / "cache" / "pages.key"
    token, _claims = asyncio.run(SiteTokens(Secret("", None, kept), store).issue("home", 1))
    assert kept.stat().st_mode & 0o777 == 0o600 and len(kept.read_bytes()) == 32
    assert "made the key that signs site tokens" in caplog.text and str(kept) in caplog.text
    assert asyncio.run(SiteTokens(Secret("", None, kept), store).site_of(token)) == "home"  # after a restart
    assert not [entry.name for entry in kept.parent.iterdir() if entry.name != "pages.key"]  # no temporary left


def test_a_token_that_could_not_outlive_a_restart_is_not_made_and_the_refusal_says_why(home, tmp_path, caplog):
    store, _service = home
    kept = tmp_path / "pages.key"
    kept.mkdir()  # what stands where the key should be cannot be read as one
    with pytest.raises(BnsError, match=r"would die at this node's next restart.*set pages\.secret") as refused:
        asyncio.run(SiteTokens(Secret("", None, kept), store).issue("home", 1))
    assert str(tmp_path) not in str(refused.value)  # the API says no server path; the log does
    assert f"cannot keep the key that signs tokens in {kept} (Is a directory)" in caplog.text
    assert asyncio.run(store.site_tokens("home"))[1] == {}  # type: ignore[index]  (nothing recorded)
    with pytest.raises(BnsError, match="this run's"):
        asyncio.run(SiteTokens(Secret("", None), store).issue("home", 1))
