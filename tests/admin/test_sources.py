"""List sources and compile jobs in-process: a stopping node does not wait for a compile to finish."""

from __future__ import annotations

import asyncio
import time

import pytest

from blocklists.catalog import load_catalog
from resolver.admin.sources import Sources
from resolver.shared.store.publications import LocalPublications
from resolver.shared.store.shelves import LocalShelf

pytestmark = pytest.mark.integration
CATALOG = load_catalog()


def test_stopping_gives_up_a_running_compile_at_its_next_progress_report(tmp_path):
    roots = tmp_path / "lists"
    roots.mkdir()
    big = roots / "big.txt"
    big.write_text("".join(f"name{number}.example\n" for number in range(600_000)))
    sources = Sources(
        LocalShelf(tmp_path / "sources"),
        CATALOG,
        LocalPublications(CATALOG, tmp_path / "served.bns", tmp_path / "versions"),
        (str(roots),),
        tmp_path / "compiles",
    )

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
