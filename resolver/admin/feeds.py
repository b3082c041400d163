"""List feeds: sources fetched by URL and kept current by the node that holds the feeds' lease.

A feed is a source (sources.py) whose bytes are the last good copy of a download. Each look (every third of
`feeds.check_interval`) a node takes or keeps the lease (one node of a fleet at a time, through Redis; a node
alone always holds it), and the holder downloads the feeds that are due, `feeds.parallel` at a time, with the
validators of the last download (If-None-Match, If-Modified-Since), kept with the feed's status so that they
survive a restart and a change of holder. A download is kept only when it ends well: HTTP 200 within
`feeds.timeout`, no larger than `feeds.max_bytes` as sent and again as decompressed, read whole (a body cut
short is refused), parsed with a usable line, and not shrinking the feed by more than `feeds.max_shrink` of its
names unless forced. Anything else leaves the last good copy in force and says why in the feed's status. When a
copy changed, the holder compiles every source and publishes the result, which every node then follows; a body
listing the same names as before (a new ETag, the same list) is no change and publishes nothing.

A feed not refreshed for three of its intervals is stale: its status says so, `bns_feed_stale` is 1 and the
node logs a warning once.

A feed's URL is the operator's, and still only reaches what `feeds.allow` lets it (outbound.py); a redirect is
followed only to a URL that passes the same checks, at most five times.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from blocklists.errors import SourceError
from blocklists.formats import FORMATS, SourceReport, UnusableSource, file_digest, read_source
from resolver.admin.metrics import metric_line
from resolver.admin.outbound import TargetRefused, checked_session
from resolver.admin.sources import CompileBusy, Sources
from resolver.shared.config import FeedSettings
from resolver.shared.errors import BnsError, NotFound, StoreUnavailable
from resolver.shared.policy.model import PolicyError, check_outbound_url
from resolver.shared.store.shelves import FeedStatus, Shelf, SourceEntry

log = logging.getLogger(__name__)

_REDIRECTS = 5
_STALE_INTERVALS = 3
_READ = 1 << 16
_USER_AGENT = "bns-feeds"


class FeedRefused(BnsError):
    """A download that is not kept: the feed's last good copy stays, and this says why."""


@dataclass(frozen=True)
class Fetched:
    not_modified: bool
    etag: str
    last_modified: str
    size: int


def check_feed_url(url: object, allow: tuple[str, ...]) -> str:
    """The URL a feed may be fetched from, or PolicyError (`url`) saying what is wrong with it."""
    if not isinstance(url, str) or not url:
        raise PolicyError("url", "missing: the feed's http or https URL")
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:
        raise PolicyError("url", f"not a URL: {exc}") from None
    if scheme not in ("http", "https"):
        raise PolicyError("url", "must be an http:// or https:// URL")
    check_outbound_url(
        url,
        allow,
        "url",
        "feeds.allow",
        "must not carry a user name or password: every reader of the API sees a feed's URL",
    )
    return url


async def download(
    session: aiohttp.ClientSession, url: str, status: FeedStatus, into: Path, settings: FeedSettings
) -> Fetched:
    """Fetch `url` into the file `into`, conditionally on `status`'s validators unless it is forced. Raises
    FeedRefused for anything but a whole 200 or a 304."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "gzip"}
    if not status.force:
        if status.etag:
            headers["If-None-Match"] = status.etag
        if status.last_modified:
            headers["If-Modified-Since"] = status.last_modified
    try:
        check_feed_url(url, settings.allow)  # again: feeds.allow may have narrowed since the feed was added
    except PolicyError as refused:
        raise FeedRefused(refused.reason) from None
    try:
        for _hop in range(_REDIRECTS + 1):
            async with session.get(url, headers=headers, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    try:
                        url = check_feed_url(urljoin(url, response.headers["Location"]), settings.allow)
                    except ValueError as exc:
                        raise FeedRefused(f"redirected: url: not a URL: {exc}") from None
                    except PolicyError as refused:
                        raise FeedRefused(f"redirected: {refused}") from None
                    continue
                return await _receive(response, into, settings.max_bytes)
        raise FeedRefused(f"more than {_REDIRECTS} redirects")
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, TargetRefused):
            raise FeedRefused(str(exc.os_error)) from None
        raise FeedRefused(f"cannot connect: {exc.os_error.strerror or exc.os_error}") from None
    except aiohttp.ClientPayloadError:
        raise FeedRefused("the body ended before it was whole") from None
    except TimeoutError:
        raise FeedRefused(f"no whole answer within {settings.timeout:g} s (feeds.timeout)") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise FeedRefused(f"download failed: {exc or type(exc).__name__}") from None


async def _receive(response: aiohttp.ClientResponse, into: Path, max_bytes: int) -> Fetched:
    etag, modified = response.headers.get("ETag", ""), response.headers.get("Last-Modified", "")
    if response.status == 304:
        return Fetched(True, etag, modified, 0)
    if response.status != 200:
        raise FeedRefused(f"HTTP {response.status} {response.reason or ''}".rstrip())
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", "gzip"):
        raise FeedRefused(f"Content-Encoding {encoding} was not asked for")  # gzip is kept as is, and read so
    too_large = FeedRefused(f"larger than {max_bytes} bytes (feeds.max_bytes)")
    if (response.content_length or 0) > max_bytes:
        raise too_large
    size = 0
    with into.open("wb") as out:
        async for chunk in response.content.iter_chunked(_READ):
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            out.write(chunk)
    if response.content_length is not None and size != response.content_length:
        raise FeedRefused("the body ended before it was whole")
    return Fetched(False, etag, modified, size)


def read_feed(path: Path, expect: str, max_bytes: int) -> tuple[SourceReport, str]:
    """A downloaded copy read whole: what it holds, and a digest of its names (the same names in the same order
    are the same list, whatever the bytes around them). Raises UnusableSource."""
    report = SourceReport("the download")
    names = hashlib.sha256()
    for entry in read_source(path, report, expect or None, max_bytes=max_bytes, setting="feeds.max_bytes"):
        names.update(f"{'@' if entry.allow else ''}{entry.name}\n".encode())
    return report, names.hexdigest()


class Feeds:
    def __init__(
        self,
        shelf: Shelf,
        sources: Sources,
        settings: FeedSettings,
        scratch: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.shelf = shelf
        self.sources = sources
        self.settings = settings
        self.scratch = scratch
        self._clock = clock
        self.node = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.leading = False
        self.known: list[tuple[SourceEntry, FeedStatus]] = []  # as of the last look, for the metrics
        self._stale: set[str] = set()
        self._wake = asyncio.Event()
        self._publish_after = 0.0  # a failed build is tried again once a copy changes, or after this

    # --- the API ----------------------------------------------------------------------------------------------

    async def add(self, category: str, url_text: object, interval: object, expect: object) -> SourceEntry:
        """A feed, downloaded now: one that cannot be fetched or read is refused with the reason."""
        self.sources.check_category(category)
        url = check_feed_url(url_text, self.settings.allow)
        if interval is None:
            interval = self.settings.interval
        if not isinstance(interval, int | float) or isinstance(interval, bool) or not 1 <= interval <= 30 * 86400:
            raise PolicyError("interval", "must be a number of seconds from 1 to 2592000 (30 days)")
        if expect is None:
            expect = ""
        if not isinstance(expect, str) or (expect and expect not in FORMATS):
            raise PolicyError("format", f"must be one of {', '.join(FORMATS)}, or absent to detect it")
        source_id = f"{category}-f{hashlib.sha256(url.encode()).hexdigest()[:12]}"
        name = (urlsplit(url).path.rsplit("/", 1)[-1] or urlsplit(url).hostname or "feed")[:200]
        entry = SourceEntry(
            source_id, category, "feed", name, "", 0, "", "", 0, 0, self._clock(), url, interval, expect
        )
        status = FeedStatus()
        async with self._session() as session:
            entry, status = await self._refresh(session, entry, status)
        if status.error:
            raise FeedRefused(f"url: {status.error}")
        return entry

    async def request_refresh(self, source_id: str, force: bool) -> dict[str, Any]:
        """Ask the lease holder for a download of this feed at its next look (this node's now, if it holds it)."""
        entry = next((e for e in await self.shelf.entries() if e.id == source_id and e.kind == "feed"), None)
        if entry is None:
            raise NotFound(f"no feed {source_id!r}")
        status = (await self.shelf.statuses()).get(source_id, FeedStatus())
        status = replace(status, next_at=0.0, force=status.force or force, requested_at=self._clock())
        await self.shelf.put_status(source_id, status)
        self._wake.set()
        return self.document(entry, status)

    async def report(self) -> list[dict[str, Any]]:
        statuses = await self.shelf.statuses()
        return [
            self.document(entry, statuses.get(entry.id, FeedStatus()))
            for entry in sorted(await self.shelf.entries(), key=lambda entry: (entry.category, entry.added_at))
            if entry.kind == "feed"
        ]

    def document(self, entry: SourceEntry, status: FeedStatus) -> dict[str, Any]:
        return {
            "id": entry.id,
            "category": entry.category,
            "url": entry.url,
            "interval": entry.interval,
            "format": entry.format,
            "entries": entry.entries,
            "bytes": entry.size,
            "age": round(self._age(entry, status), 1),
            "stale": self._is_stale(entry, status),
            **asdict(status),
        }

    def _age(self, entry: SourceEntry, status: FeedStatus) -> float:
        return max(0.0, self._clock() - (status.succeeded_at or entry.added_at))

    def _is_stale(self, entry: SourceEntry, status: FeedStatus) -> bool:
        return self._age(entry, status) > _STALE_INTERVALS * entry.interval

    # --- keeping them current ----------------------------------------------------------------------------------

    def reconfigure(self, settings: FeedSettings) -> None:
        """Settings reloaded on SIGHUP, applied from a look at once (a shorter check interval among them)."""
        self.settings = settings
        self._wake.set()

    def _session(self) -> aiohttp.ClientSession:
        # gzip is kept as sent: the copy is stored smaller, and reading it bounds what it decompresses to
        return checked_session(self.settings.allow, "feeds.allow", self.settings.timeout, auto_decompress=False)

    async def run(self) -> None:
        out_of_reach = False
        while True:
            try:
                await self.look()
                if out_of_reach:
                    log.info("feeds: the store is back; looking after the feeds again")
                out_of_reach = False
            except StoreUnavailable as exc:
                self.leading = False
                if not out_of_reach:  # said once per outage
                    log.warning("feeds: the store is out of reach (%s); no feed is fetched until it is back", exc)
                out_of_reach = True
            except Exception:
                log.exception("feeds: a look failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._every)
            self._wake.clear()

    @property
    def _every(self) -> float:
        return self.settings.check_interval / 3

    async def look(self) -> None:
        """Take or keep the lease; holding it, download the feeds that are due and publish what changed."""
        self.leading = await self.shelf.lead(self.node, 2 * self._every)
        entries = [entry for entry in await self.shelf.entries() if entry.kind == "feed"]
        statuses = await self.shelf.statuses()
        self.known = [(entry, statuses.get(entry.id, FeedStatus())) for entry in entries]
        self._say_stale()
        if not self.leading:
            return
        now = self._clock()
        due = [(entry, status) for entry, status in self.known if status.next_at <= now]
        if not due and all(status.published for _entry, status in self.known):
            return
        keeping = asyncio.ensure_future(self._keep_lease())  # a round and its build may outlast the lease
        try:
            if due:
                bound = asyncio.Semaphore(self.settings.parallel)
                async with self._session() as session:

                    async def one(entry: SourceEntry, status: FeedStatus) -> tuple[SourceEntry, FeedStatus]:
                        async with bound:
                            return await self._refresh(session, entry, status)

                    refreshed = await asyncio.gather(*(one(entry, status) for entry, status in due))
                done = {entry.id: (entry, status) for entry, status in refreshed}
                self.known = [done.get(entry.id, (entry, status)) for entry, status in self.known]
            if self.leading:  # else another node holds the lease now, and publishes
                await self._publish()
        finally:
            keeping.cancel()

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            self.leading = await self.shelf.lead(self.node, 2 * self._every)

    async def _refresh(
        self, session: aiohttp.ClientSession, entry: SourceEntry, status: FeedStatus
    ) -> tuple[SourceEntry, FeedStatus]:
        """One download of a feed, its outcome stored: a new last good copy, or the reason there is none."""
        now = self._clock()
        status = replace(status, checked_at=now)
        self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.scratch, prefix="feed-") as scratch:
            copy = Path(scratch) / "download"
            try:
                fetched = await download(session, entry.url, status, copy, self.settings)
                if fetched.not_modified:
                    status = replace(status, not_modified=status.not_modified + 1)
                else:
                    entry, status = await self._keep(entry, replace(status, downloads=status.downloads + 1), copy)
                status = replace(
                    status,
                    etag=fetched.etag or status.etag,
                    last_modified=fetched.last_modified or status.last_modified,
                    succeeded_at=now,
                    error="",
                    failing=0,
                    force=False,
                    next_at=now + entry.interval * (1 + random.uniform(0, self.settings.jitter)),
                )
            except (FeedRefused, SourceError) as refused:
                reason = refused.reason if isinstance(refused, UnusableSource) else str(refused)
                status = self._failed(entry, status, now, reason)
                log.warning("feed %s (%s): %s; the last good copy stays", entry.id, entry.url, reason)
            except StoreUnavailable:
                raise
            except Exception as exc:  # a defect: said, and the feed tried again later like any failure
                log.exception("feed %s (%s): the download failed unexpectedly", entry.id, entry.url)
                status = self._failed(entry, status, now, f"internal error ({type(exc).__name__}); see the log")
        if entry.sha256 and await self._listed(entry):  # nor a feed being added that failed, nor one removed
            stored = (await self.shelf.statuses()).get(entry.id)
            if stored is not None and stored.requested_at > status.checked_at:  # asked for during the download
                status = replace(status, next_at=0.0, force=stored.force, requested_at=stored.requested_at)
            await self.shelf.put_status(entry.id, status)
        return entry, status

    def _failed(self, entry: SourceEntry, status: FeedStatus, now: float, reason: str) -> FeedStatus:
        """A failed download's status: tried again after feeds.check_interval, then twice as long each time,
        up to the feed's interval."""
        failing = status.failing + 1
        retry = min(entry.interval, self.settings.check_interval * 2 ** min(failing - 1, 30))
        return replace(
            status,
            error=reason,
            error_at=now,
            failing=failing,
            failures=status.failures + 1,
            force=False,
            next_at=now + retry,
        )

    async def _listed(self, entry: SourceEntry) -> bool:
        return any(listed.id == entry.id for listed in await self.shelf.entries())

    async def _keep(self, entry: SourceEntry, status: FeedStatus, copy: Path) -> tuple[SourceEntry, FeedStatus]:
        """A downloaded copy made the feed's last good one, unless it lists the same names or shrank too much."""
        report, content = await asyncio.to_thread(read_feed, copy, entry.expect, self.settings.max_bytes)
        if content == status.content and entry.sha256:
            return entry, status  # the same names: nothing to publish
        if entry.entries and not status.force and report.entries < entry.entries * (1 - self.settings.max_shrink):
            raise FeedRefused(
                f"shrank from {entry.entries} to {report.entries} names, more than feeds.max_shrink "
                f"({self.settings.max_shrink:.0%}); `bns lists feed refresh {entry.id} --force` takes it"
            )
        digest = await asyncio.to_thread(file_digest, copy)
        entry = replace(
            entry,
            size=copy.stat().st_size,
            sha256=digest,
            format=report.format,
            entries=report.entries,
            rejected=report.rejected_count,
        )
        if not await self.shelf.put(entry, copy, replace_only=bool(status.changed_at)):
            raise FeedRefused("removed while it was downloaded")
        log.info("feed %s: a new copy of %d names (%d bytes)", entry.id, entry.entries, entry.size)
        return entry, replace(status, content=content, changed_at=self._clock(), published=False)

    async def _publish(self) -> None:
        """Compile every source and publish the result when a feed's copy is not in a published list yet."""
        if all(status.published for _entry, status in self.known) or self._clock() < self._publish_after:
            return
        try:
            job = await self.sources.build(publish=True)
        except CompileBusy:
            return  # an operator's build is running: try again at the next look
        if job.state != "done":
            self._publish_after = self._clock() + 10 * self.settings.check_interval
            log.warning("feeds: the build of a changed feed failed (%s); trying again later", job.error)
            return
        self._publish_after = 0.0
        statuses = await self.shelf.statuses()
        for entry in await self.shelf.entries():  # a copy kept meanwhile (elsewhere) waits for the next build
            status = statuses.get(entry.id)
            if status is not None and not status.published and job.digests.get(entry.id) == entry.sha256:
                await self.shelf.put_status(entry.id, replace(status, published=True))
        log.info("feeds: published version %s (%d names)", job.version, job.names)

    def _say_stale(self) -> None:
        stale = {entry.id for entry, status in self.known if self._is_stale(entry, status)}
        for source_id in stale - self._stale:
            log.warning("feed %s: not refreshed for more than %d of its intervals", source_id, _STALE_INTERVALS)
        self._stale = stale

    def metric_lines(self) -> list[str]:
        """Each feed's health as this node last saw it (every node reads the fleet's)."""
        lines = [
            "# HELP bns_feeds_leading Whether this node holds the feeds' lease and fetches them",
            "# TYPE bns_feeds_leading gauge",
            metric_line("bns_feeds_leading", int(self.leading)),
        ]
        gauges: list[tuple[str, str, Callable[[SourceEntry, FeedStatus], float]]] = [
            ("bns_feed_entries", "Names in the feed's last good copy", lambda e, s: e.entries),
            ("bns_feed_bytes", "Size of the feed's last good copy, as downloaded", lambda e, s: e.size),
            ("bns_feed_age_seconds", "Seconds since the feed's last download that ended well", self._age),
            ("bns_feed_stale", "1 when the feed has not been refreshed for three intervals", self._is_stale),
            ("bns_feed_last_success_timestamp_seconds", "When a download last ended well", lambda e, s: s.succeeded_at),
            ("bns_feed_last_error_timestamp_seconds", "When a download last failed", lambda e, s: s.error_at),
            ("bns_feed_failing", "Downloads failed in a row", lambda e, s: s.failing),
        ]
        for name, about, value in gauges:
            lines += [f"# HELP {name} {about}", f"# TYPE {name} gauge"]
            lines += [metric_line(name, float(value(e, s)), {"feed": e.id}) for e, s in self.known]
        lines += [
            "# HELP bns_feed_downloads_total Downloads of the feed, by result (fleet-wide)",
            "# TYPE bns_feed_downloads_total counter",
        ]
        for entry, status in self.known:
            for result, count in (
                ("ok", status.downloads),
                ("not_modified", status.not_modified),
                ("failed", status.failures),
            ):
                lines.append(metric_line("bns_feed_downloads_total", count, {"feed": entry.id, "result": result}))
        return lines
