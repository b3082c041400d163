"""Fixtures of the integration tests: a compiled list with one name per category the policy tests use."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists

CATALOG = load_catalog()


@pytest.fixture(scope="module")
def lists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("policy-lists")
    out = directory / "lists.bns"
    sources = []
    for category, names in (
        ("pornography", "porn.example\n"),
        ("drugs", "drug.example\n"),
        ("malware", "malware.example\n"),
    ):
        path = directory / f"{category}.txt"
        path.write_text(names)
        sources.append(Source(path, category))
    compile_lists(sources, out, CATALOG)
    return out
