"""List feeds in-process, against a real HTTP server on loopback: each way a download can go wrong leaves the
last good copy in force (the published list still has its names) and says why; what changed is published once,
what did not is asked for with the last validators (304) and publishes nothing; one node of a fleet fetches."""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from blocklists.artifact import open_artifact
from blocklists.catalog import load_catalog
from blocklists.matcher import Matcher
from resolver.admin.feeds import FeedRefused, Feeds
from resolver.admin.metrics import Metrics
from resolver.admin.sources import Sources
from resolver.shared.config import FeedSettings
from resolver.shared.policy.model import PolicyError
from resolver.shared.store.publications import LocalPublications
from resolver.shared.store.redis import RedisConnection
from resolver.shared.store.shelves import LocalShelf, RedisShelf, Shelf
from tests.admin.feed_server import FeedServer, Script, names

pytestmark = pytest.mark.integration
CATALOG = load_catalog()
MAX_BYTES = 64 * 1024
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.close()


def settings(**changes: Any) -> FeedSettings:
    chosen: dict[str, Any] = {
        "check_interval": 3.0,
        "timeout": 1.5,
        "max_bytes": MAX_BYTES,
        "jitter": 0.0,
        "allow": ("127.0.0.0/8",),
    }
    return replace(FeedSettings(), **{**chosen, **changes})


def feeds_over(tmp_path: Path, shelf: Shelf | None = None, clock: Clock | None = None, **changes: Any) -> Feeds:
    sources = Sources(
        shelf or LocalShelf(tmp_path / "sources"),
        CATALOG,
        LocalPublications(CATALOG, tmp_path / "served.bns", tmp_path / "versions"),
        (),
        tmp_path / "compiles",
        1 << 30,
    )
    return Feeds(sources.shelf, sources, settings(**changes), tmp_path / "feeds", clock or Clock())


def served(tmp_path: Path, name: str) -> list[str]:
    """The categories the published list gives `name` (what every worker answers from)."""
    matcher = Matcher(open_artifact(tmp_path / "served.bns"))
    return CATALOG.ids(matcher.match(name).bits)


async def versions(feeds: Feeds) -> int:
    return len((await feeds.sources.publications.versions())[0])


async def one_feed(feeds: Feeds) -> dict[str, Any]:
    (feed,) = await feeds.report()
    return feed


def test_a_feed_is_published_then_asked_for_with_its_validators_and_304_publishes_nothing(tmp_path, feed_server):
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))
    clock = Clock()
    feeds = feeds_over(tmp_path, clock=clock)

    async def run() -> None:
        added = await feeds.add("malware", feed_server.url("/malware.txt"), HOUR, None)
        assert added.kind == "feed" and added.entries == 100 and added.url.endswith("/malware.txt")
        await feeds.look()  # the new copy is built and published
        assert served(tmp_path, "bad7.example") == ["malware"] and await versions(feeds) == 1
        await feeds.look()  # not due: nothing asked
        assert len(feed_server.requests) == 1

        clock.now += HOUR
        await feeds.look()
        request = feed_server.requests[-1]
        assert request.status == 304 and request.headers["If-None-Match"].startswith('"')
        assert request.headers["If-Modified-Since"] == "Tue, 01 Dec 2026 00:00:00 GMT"
        feed = await one_feed(feeds)
        assert feed["not_modified"] == 1 and feed["downloads"] == 1 and feed["error"] == "" and feed["published"]
        assert feed["succeeded_at"] == clock.now and feed["next_at"] == clock.now + HOUR
        assert await versions(feeds) == 1  # nothing changed: nothing published

        # A new body listing the same names (a comment added) is no change either.
        feed_server.scripts["/malware.txt"] = Script(b"# refreshed\n" + names("bad", 100))
        clock.now += HOUR
        await feeds.look()
        feed = await one_feed(feeds)
        assert feed_server.requests[-1].status == 200 and feed["downloads"] == 2
        assert await versions(feeds) == 1

        # The validators survive a restart: a new node over the same shelf asks conditionally.
        clock.now += HOUR
        await feeds_over(tmp_path, clock=clock).look()
        assert feed_server.requests[-1].status == 304

    asyncio.run(run())


def test_a_feed_that_grew_is_published_with_its_new_names(tmp_path, feed_server):
    feed_server.scripts["/phish.txt"] = Script(names("lure", 50), gzip=True)  # Content-Encoding: gzip
    clock = Clock()
    feeds = feeds_over(tmp_path, clock=clock)

    async def run() -> None:
        await feeds.add("phishing", feed_server.url("/phish.txt"), HOUR, None)
        await feeds.look()
        assert served(tmp_path, "lure49.example") == ["phishing"] and served(tmp_path, "lure99.example") == []
        feed_server.scripts["/phish.txt"] = Script(names("lure", 200), gzip=True)
        clock.now += HOUR
        await feeds.look()
        assert served(tmp_path, "lure199.example") == ["phishing"]
        feed = await one_feed(feeds)
        assert feed["entries"] == 200 and feed["published"] and feed["changed_at"] == clock.now
        assert await versions(feeds) == 2

    asyncio.run(run())


BOMB = gzip.compress(b"\n" * (20 * MAX_BYTES))  # small as sent, 20 times feeds.max_bytes once decompressed

FAULTS = {
    "404": (Script(status=404), "HTTP 404"),
    "500": (Script(status=500), "HTTP 500"),
    "hang": (Script(names("bad", 100), hang=3.0), "no whole answer within 1.5 s (feeds.timeout)"),
    "closed mid-body": (Script(names("bad", 2000), cut=True), "the body ended before it was whole"),
    "10x the size cap": (Script(b"x.example\n" * (MAX_BYTES + 1)), "larger than 65536 bytes (feeds.max_bytes)"),
    "10x the size cap, unannounced": (
        Script(b"x.example\n" * (MAX_BYTES + 1), length=False),
        "larger than 65536 bytes (feeds.max_bytes)",
    ),
    "gzip that does not inflate": (
        Script(b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"not deflate data at all" * 10, validators=False),
        "cannot read",
    ),
    "a redirect to no URL": (Script(location="http://[oops/list.txt"), "redirected: url: not a URL"),
    "gzip bomb": (Script(BOMB, validators=False), "decompresses to more than 65536 bytes (feeds.max_bytes)"),
    "shrank by 90 %": (Script(names("bad", 10)), "shrank from 100 to 10 names, more than feeds.max_shrink (50%)"),
    "not a list": (Script(b"<html><body>Service moved</body></html>\n"), "no usable"),
    "redirect to a private address": (
        Script(location="http://10.1.2.3/list.txt"),
        "redirected: url: 10.1.2.3 is not a public address; to reach it, add its network to feeds.allow",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_download_keeps_the_last_good_copy_in_force_and_says_why(tmp_path, feed_server, fault, caplog):
    script, reason = FAULTS[fault]
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))
    clock = Clock()
    feeds = feeds_over(tmp_path, clock=clock)
    metrics = Metrics(tmp_path, dict)
    metrics.sections.append(feeds.metric_lines)

    async def run() -> dict[str, Any]:
        await feeds.add("malware", feed_server.url("/malware.txt"), HOUR, None)
        await feeds.look()
        feed_server.scripts["/malware.txt"] = script
        clock.now += HOUR
        with caplog.at_level(logging.WARNING):
            await feeds.look()
        return await one_feed(feeds)

    feed = asyncio.run(run())
    assert reason in feed["error"], feed["error"]
    assert feed["failing"] == 1 and feed["failures"] == 1 and feed["error_at"] == clock.now
    assert feed["entries"] == 100 and feed["published"]  # the last good copy, still the one published
    assert feed["next_at"] == clock.now + 3.0  # tried again after feeds.check_interval, then less and less often
    assert served(tmp_path, "bad7.example") == ["malware"] and served(tmp_path, "bad99.example") == ["malware"]
    assert asyncio.run(versions(feeds)) == 1
    assert any(reason.split(";")[0] in record.getMessage() for record in caplog.records)
    assert f'bns_feed_failing{{feed="{feed["id"]}"}} 1.0' in metrics.render()


def test_a_shrunken_feed_is_taken_when_forced(tmp_path, feed_server):
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))
    clock = Clock()
    feeds = feeds_over(tmp_path, clock=clock)

    async def run() -> None:
        added = await feeds.add("malware", feed_server.url("/malware.txt"), HOUR, None)
        await feeds.look()
        feed_server.scripts["/malware.txt"] = Script(names("bad", 10))
        clock.now += HOUR
        await feeds.look()
        assert "shrank" in (await one_feed(feeds))["error"]
        asked = await feeds.request_refresh(added.id, force=True)
        assert asked["force"] and asked["next_at"] == 0.0
        await feeds.look()  # due at once, and taken although it shrank
        feed = await one_feed(feeds)
        assert feed["entries"] == 10 and feed["error"] == "" and not feed["force"] and feed["published"]
        assert served(tmp_path, "bad9.example") == ["malware"] and served(tmp_path, "bad99.example") == []
        assert feed_server.requests[-1].headers.get("If-None-Match") is None  # forced: asked for in full

    asyncio.run(run())


def test_failures_are_tried_again_less_and_less_often_and_a_feed_goes_stale_after_three_intervals(
    tmp_path, feed_server, caplog
):
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))
    clock = Clock()
    feeds = feeds_over(tmp_path, clock=clock)
    metrics = Metrics(tmp_path, dict)
    metrics.sections.append(feeds.metric_lines)

    async def run() -> list[float]:
        added = await feeds.add("malware", feed_server.url("/malware.txt"), 60.0, None)
        feed_server.scripts["/malware.txt"] = Script(status=500)
        waits = []
        start = clock.now
        with caplog.at_level(logging.WARNING):
            while clock.now - start < 200:
                clock.now = max(clock.now, (await one_feed(feeds))["next_at"])
                before = clock.now
                await feeds.look()
                waits.append((await one_feed(feeds))["next_at"] - before)
        assert (await one_feed(feeds))["stale"]
        assert f'bns_feed_stale{{feed="{added.id}"}} 1.0' in metrics.render()
        return waits

    waits = asyncio.run(run())
    assert waits[:6] == [3.0, 6.0, 12.0, 24.0, 48.0, 60.0]  # doubled from feeds.check_interval up to the interval
    stale = [record for record in caplog.records if "not refreshed for more than 3" in record.getMessage()]
    assert len(stale) == 1  # said once, when it went stale


def test_a_feed_that_cannot_be_used_is_refused_when_added_and_nothing_is_kept(tmp_path, feed_server):
    feeds = feeds_over(tmp_path)
    feeds_closed = feeds_over(tmp_path / "closed", allow=())

    async def run() -> None:
        with pytest.raises(FeedRefused, match="url: HTTP 404"):
            await feeds.add("malware", feed_server.url("/missing.txt"), None, None)
        with pytest.raises(PolicyError, match="url: must be an http"):
            await feeds.add("malware", "ftp://127.0.0.1/list.txt", None, None)
        with pytest.raises(PolicyError, match="user name or password"):
            await feeds.add("malware", "http://user:secret@127.0.0.1/list.txt", None, None)
        with pytest.raises(PolicyError, match="category"):
            await feeds.add("gambling", feed_server.url("/missing.txt"), None, None)
        with pytest.raises(PolicyError, match="interval"):
            await feeds.add("malware", feed_server.url("/missing.txt"), 0.5, None)
        with pytest.raises(PolicyError, match="format"):
            await feeds.add("malware", feed_server.url("/missing.txt"), None, "csv")
        # Loopback is reached only where feeds.allow says: an address as written, and a name as resolved.
        with pytest.raises(PolicyError, match=r"127\.0\.0\.1 is not a public address.*feeds\.allow"):
            await feeds_closed.add("malware", feed_server.url("/missing.txt"), None, None)
        by_name = feed_server.url("/missing.txt").replace("127.0.0.1", "localhost")
        with pytest.raises(FeedRefused, match=r"localhost resolves to .*not a public address.*feeds\.allow"):
            await feeds_closed.add("malware", by_name, None, None)
        assert await feeds.report() == [] and await feeds.shelf.entries() == []

    asyncio.run(run())
    assert len(feed_server.requests) == 1  # only the allowed 404


def test_an_allowlist_feed_clears_a_name_from_every_category(tmp_path, feed_server):
    feed_server.scripts["/bad.txt"] = Script(names("bad", 20))
    feed_server.scripts["/good.txt"] = Script(b"bad3.example\nexample\n")  # a whole TLD is not taken
    feeds = feeds_over(tmp_path)

    async def run() -> None:
        await feeds.add("malware", feed_server.url("/bad.txt"), HOUR, None)
        await feeds.add("phishing", feed_server.url("/bad.txt"), HOUR, "plain")
        await feeds.add("allow", feed_server.url("/good.txt"), HOUR, None)
        await feeds.look()

    asyncio.run(run())
    assert served(tmp_path, "bad2.example") == ["malware", "phishing"]
    assert served(tmp_path, "bad3.example") == []


def test_one_node_of_a_fleet_fetches_and_another_takes_over_within_a_check_interval(
    tmp_path, feed_server, shared_redis, redis_prefix
):
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))

    async def run() -> None:
        clock = Clock()
        first, second = (
            feeds_over(
                tmp_path / name, RedisShelf(RedisConnection(shared_redis.url, redis_prefix)), clock, check_interval=1.0
            )
            for name in ("a", "b")
        )
        await first.add("malware", feed_server.url("/malware.txt"), 10.0, None)
        await first.look()
        await second.look()
        assert first.leading and not second.leading
        assert served(tmp_path / "a", "bad1.example") == ["malware"]  # the holder built and published it
        assert len(feed_server.requests) == 1  # added; the look found it fresh
        # The holder stops looking (it died): its lease runs out, and the other takes it at its next look.
        await asyncio.sleep(2 / 3 + 0.05)
        feed_server.scripts["/malware.txt"] = Script(names("bad", 120))
        clock.now += 10.0
        await second.look()
        assert second.leading and len(feed_server.requests) == 2  # due: fetched by the node that took over
        assert feed_server.requests[-1].headers["If-None-Match"].startswith('"')  # with the first node's validators
        (feed,) = await second.report()
        assert feed["published"] and feed["entries"] == 120
        assert served(tmp_path / "b", "bad119.example") == ["malware"]
        await first.look()  # back, it finds the lease taken
        assert not first.leading and len(feed_server.requests) == 2

    asyncio.run(run())


def test_settings_reloaded_on_sighup_apply_from_a_look_at_once(tmp_path, feed_server):
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))
    clock = Clock()
    feeds = feeds_over(tmp_path, clock=clock, check_interval=86400.0)

    async def run() -> None:
        await feeds.add("malware", feed_server.url("/malware.txt"), HOUR, None)
        looking = asyncio.ensure_future(feeds.run())
        await asyncio.sleep(0.3)  # the first look found nothing due; the next is eight hours away
        clock.now += HOUR
        feeds.reconfigure(settings(check_interval=3.0))
        await asyncio.sleep(0.5)
        looking.cancel()
        assert [request.status for request in feed_server.requests] == [200, 304]

    asyncio.run(run())


@pytest.mark.parametrize("shelf", ["local", "redis"])
def test_a_feed_removed_while_it_downloads_stays_removed(tmp_path, feed_server, shelf, request):
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))
    clock = Clock()
    kept = None
    if shelf == "redis":
        redis = request.getfixturevalue("shared_redis")
        kept = RedisShelf(RedisConnection(redis.url, request.getfixturevalue("redis_prefix")))
    feeds = feeds_over(tmp_path, kept, clock=clock)

    async def run() -> None:
        added = await feeds.add("malware", feed_server.url("/malware.txt"), HOUR, None)
        feed_server.scripts["/malware.txt"] = Script(names("bad", 150), hang=0.5)
        clock.now += HOUR
        looking = asyncio.ensure_future(feeds.look())
        await asyncio.sleep(0.2)  # the download is under way
        await feeds.sources.remove("malware", added.id)
        await looking
        assert await feeds.shelf.entries() == [] and await feeds.shelf.statuses() == {}

    asyncio.run(run())


def test_a_refresh_asked_for_during_a_download_is_kept_for_the_next_look(tmp_path, feed_server):
    feed_server.scripts["/malware.txt"] = Script(names("bad", 100))
    clock = Clock()
    feeds = feeds_over(tmp_path, clock=clock)

    async def run() -> None:
        added = await feeds.add("malware", feed_server.url("/malware.txt"), HOUR, None)
        feed_server.scripts["/malware.txt"] = Script(names("bad", 10), hang=0.5)
        clock.now += HOUR
        looking = asyncio.ensure_future(feeds.look())
        await asyncio.sleep(0.2)  # the download is under way
        clock.now += 1
        await feeds.request_refresh(added.id, force=True)
        await looking
        feed = await one_feed(feeds)
        assert "shrank" in feed["error"] and feed["force"] and feed["next_at"] == 0.0  # asked for: still due
        await feeds.look()
        assert (await one_feed(feeds))["entries"] == 10  # and forced

    asyncio.run(run())
