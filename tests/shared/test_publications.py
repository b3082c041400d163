"""Publishing lists without Redis (resolver/shared/store/publications.py): versions kept in the node's cache
directory, installed where the workers look."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists
from resolver.shared.store.publications import LocalPublications

pytestmark = pytest.mark.integration
CATALOG = load_catalog()


def artifact(path: Path, name: str) -> Path:
    source = path.with_suffix(".txt")
    source.write_text(f"{name}\n")
    compile_lists([Source(source, "drugs")], path, CATALOG)
    return path


def test_a_publish_keeps_the_operators_own_list_as_a_version_to_roll_back_to(tmp_path):
    """Issue 19: `bns lists push` on a node without Redis overwrote the admin's own lists.path; the list it had
    served, never published, was lost and could not be rolled back to."""
    own = artifact(tmp_path / "own.bns", "own.example")
    original, written = own.read_bytes(), own.stat().st_mtime
    publications = LocalPublications(CATALOG, own, tmp_path / "cache" / "versions")
    pushed = asyncio.run(publications.publish(artifact(tmp_path / "pushed.bns", "pushed.example")))
    versions, current = asyncio.run(publications.versions())
    kept = versions[0]
    assert [entry.version for entry in versions] == [kept.version, pushed.version] and current == pushed.version
    assert kept.published_at == written  # when the operator wrote it
    asyncio.run(publications.rollback(kept.version))
    assert own.read_bytes() == original and asyncio.run(publications.versions())[1] == kept.version
    again = asyncio.run(publications.publish(tmp_path / "pushed.bns"))  # a published list is kept once
    assert [entry.version for entry in asyncio.run(publications.versions())[0]] == [kept.version, again.version]


def test_a_file_that_is_no_list_is_replaced_with_a_warning(tmp_path, caplog):
    own = tmp_path / "own.bns"
    own.write_bytes(b"not a list")
    publications = LocalPublications(CATALOG, own, tmp_path / "cache" / "versions")
    pushed = asyncio.run(publications.publish(artifact(tmp_path / "pushed.bns", "pushed.example")))
    assert [entry.version for entry in asyncio.run(publications.versions())[0]] == [pushed.version]
    assert f"{own} is replaced without being kept as a version" in caplog.text
