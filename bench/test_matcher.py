"""Matcher lookups on a realistic mix, beside a Python set of the same names (pytest-benchmark).

    python -m pytest bench/test_matcher.py --benchmark-columns=median,rounds -q

The list: the nine category files of the shared data (1.05 M names), compiled once. The mix: the 100,000
top-site names (real traffic; about 3 % listed) plus 10,000 listed names with a subdomain prepended. One
round looks up every name of the mix; per lookup = round / 110,000. The baseline does the same decision with
a set: it checks every suffix of the name on label boundaries. The set holds the names in memory (about
100 MB for 1 M names); the trie is a 9 MB mapped file shared by every worker.
"""

from __future__ import annotations

import gzip
import random

import pytest

from bench.harness import DEFAULT_DATA, top_site_names
from blocklists.artifact import open_artifact
from blocklists.catalog import load_catalog
from blocklists.compiler import compile_lists, sources_from_dir
from blocklists.matcher import Matcher
from blocklists.names import reverse


@pytest.fixture(scope="module")
def lists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Matcher, set[str], list[str]]:
    directory = DEFAULT_DATA / "blocklists"
    if not directory.is_dir():
        pytest.skip(f"{directory} is not here")
    catalog = load_catalog()
    out = tmp_path_factory.mktemp("lists") / "lists.bns"
    sources = sources_from_dir(directory, catalog)
    compile_lists(sources, out, catalog)
    listed: set[str] = set()
    for source in sources:
        with gzip.open(source.path, "rt") as names:
            listed.update(line.strip() for line in names)
    sample = random.Random(7).sample(sorted(listed), 10_000)
    mix = top_site_names(DEFAULT_DATA, 100_000) + [f"www.{name}" for name in sample]
    random.Random(8).shuffle(mix)
    return Matcher(open_artifact(out)), listed, mix


def _trie_pass(matcher: Matcher, keys: list[str]) -> int:
    match_key = matcher.match_key
    return sum(1 for key in keys if match_key(key).bits)


def _set_pass(listed: set[str], names: list[str]) -> int:
    found = 0
    for name in names:
        labels = name.split(".")
        for start in range(len(labels) - 1):
            if ".".join(labels[start:]) in listed:
                found += 1
                break
    return found


def test_trie_lookup(benchmark, lists):
    matcher, listed, mix = lists
    keys = [reverse(name) for name in mix]
    found = benchmark(_trie_pass, matcher, keys)
    assert found == _set_pass(listed, mix)


def test_set_baseline(benchmark, lists):
    _matcher, listed, mix = lists
    benchmark(_set_pass, listed, mix)


def test_hot_name_dict(benchmark, lists):
    """What the resolver pays for a name it has seen lately: one dict lookup on the wire name."""
    matcher, _listed, mix = lists
    wires = [b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\x00" for name in mix]
    hot = {wire: matcher.bits_of_wire(wire) for wire in wires}
    benchmark(lambda: sum(1 for wire in wires if hot[wire]))
