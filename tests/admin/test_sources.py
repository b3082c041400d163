"""List sources and compile jobs in-process: a stopping node does not wait for a compile to finish; what is read
of a source is bounded, and what the API says of one shows nothing of the server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from blocklists.catalog import load_catalog
from blocklists.errors import SourceError
from resolver.admin.sources import Sources
from resolver.shared.policy.model import PolicyError
from resolver.shared.store.publications import LocalPublications
from resolver.shared.store.shelves import LocalShelf
from tests.blocklists.test_formats import gzip_of

pytestmark = pytest.mark.integration
CATALOG = load_catalog()


def sources_under(tmp_path: Path, max_bytes: int = 1 << 30) -> tuple[Sources, Path]:
    roots = tmp_path / "lists"
    roots.mkdir()
    sources = Sources(
        LocalShelf(tmp_path / "sources"),
        CATALOG,
        LocalPublications(CATALOG, tmp_path / "served.bns", tmp_path / "versions"),
        (str(roots),),
        tmp_path / "compiles",
        max_bytes,
    )
    return sources, roots


def test_stopping_gives_up_a_running_compile_at_its_next_progress_report(tmp_path):
    sources, roots = sources_under(tmp_path)
    big = roots / "big.txt"
    big.write_text("".join(f"name{number}.example\n" for number in range(600_000)))

    async def compile_then_stop() -> tuple[str, str, float]:
        await sources.add_path("drugs", str(big))
        job = sources.start_compile(publish=True)
        while job.count == 0 and job.state == "running":  # under way: it has reported progress
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await sources.stop()
        return job.state, job.error, time.monotonic() - started

    state, error, waited = asyncio.run(compile_then_stop())
    assert state == "failed" and "stopped" in error
    assert waited < 5
    assert not (tmp_path / "served.bns").exists()  # nothing half-published
    assert list((tmp_path / "compiles").iterdir()) == []  # its scratch files are gone


def test_an_upload_is_read_no_further_than_its_bounds(tmp_path):
    """Issue 18: a 408 KB gzip upload decompressing to 400 MB without a newline held the admin process at
    1.25 GB for 14 s before its 400."""
    sources, _roots = sources_under(tmp_path, max_bytes=1 << 20)
    bomb, many = tmp_path / "bomb.gz", tmp_path / "many.gz"
    bomb.write_bytes(gzip_of(b"a" * (1 << 20), 400))
    many.write_bytes(gzip_of(b"a.example\n" * 100_000, 10))
    started = time.monotonic()
    with pytest.raises(SourceError) as long_line:
        asyncio.run(sources.add_upload("drugs", "bomb.gz", bomb))
    with pytest.raises(SourceError) as too_large:
        asyncio.run(sources.add_upload("drugs", "many.gz", many))
    assert time.monotonic() - started < 2
    assert str(long_line.value) == "the upload: line 1 is longer than 4096 characters: not a list"
    assert str(too_large.value) == "the upload: decompresses to more than 1048576 bytes (admin.max_upload)"
    assert asyncio.run(sources.list()) == []


def test_what_the_api_says_of_a_file_on_the_server_shows_neither_its_lines_nor_the_layout(tmp_path, caplog):
    """Issue 18: errors echoed server paths, where a link led, and the first line of a non-list file under
    admin.source_roots. They name the argument and the setting; the node's log says more."""
    sources, roots = sources_under(tmp_path)
    secret = roots / "app.conf"
    secret.write_text("password = hunter2-the-secret\n")
    outside = tmp_path / "private" / "list.txt"
    outside.parent.mkdir()
    outside.write_text("example.com\n")
    (roots / "escape.txt").symlink_to(outside)
    refusals = {}
    for name, path in (
        ("not a list", secret),
        ("outside", outside),
        ("link out", roots / "escape.txt"),
        ("missing", roots / "missing.txt"),
    ):
        with pytest.raises(PolicyError) as refused:
            asyncio.run(sources.add_path("drugs", str(path)))
        refusals[name] = (refused.value.field, refused.value.reason)
    assert refusals == {
        "not a list": ("path", "no usable domain in it as plain: 1 lines, 1 rejected, 0 skipped"),
        "outside": ("path", "not under admin.source_roots"),
        "link out": ("path", "not under admin.source_roots"),
        "missing": ("path", "not a file under admin.source_roots"),
    }
    assert "hunter2" in caplog.text  # the operator finds the detail in the node's log

    # A path source that turns into something else after it was added fails its compile the same way.
    listed = roots / "list.txt"
    listed.write_text("first.example\n")
    entry = asyncio.run(sources.add_path("drugs", str(listed)))
    listed.write_text("password = hunter2-the-secret\n")

    async def compiled() -> str:
        job = sources.start_compile(publish=False)
        while job.state == "running":
            await asyncio.sleep(0.01)
        return job.error

    error = asyncio.run(compiled())
    assert error == f"source {entry.id}: no usable domain in it as plain: 1 lines, 1 rejected, 0 skipped"
