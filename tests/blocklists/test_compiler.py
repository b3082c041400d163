"""The compiler, the artifact and the matcher: round trip, determinism, refusal of bad files, boundaries."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocklists.artifact import open_artifact, verify_file, write_artifact
from blocklists.catalog import load_catalog
from blocklists.compiler import Source, compile_lists, sources_from_dir
from blocklists.errors import ArtifactError, SourceError
from blocklists.matcher import Matcher
from tests.conftest import FIXTURES

pytestmark = pytest.mark.unit
CATALOG = load_catalog()
_LISTABLE = re.compile(rb"[a-z0-9_-]{1,63}")  # what a label of a listed name may hold (blocklists.names)


def bits(*categories: str) -> int:
    return CATALOG.mask(list(categories))


def compile_texts(tmp_path: Path, run_size: int = 1000, **lists: str) -> Path:
    """Compile {category: list text} (category `tsv` for a TSV) into tmp_path/lists.bns."""
    sources = []
    for category, text in lists.items():
        path = tmp_path / f"{category}.src"
        path.write_text(text)
        sources.append(Source(path) if category == "tsv" else Source(path, category.replace("_", "-")))
    out = tmp_path / "lists.bns"
    compile_lists(sources, out, CATALOG, run_size=run_size)
    return out


@pytest.fixture
def matcher(tmp_path) -> Matcher:
    out = compile_texts(
        tmp_path,
        pornography="example.com\nadult.example\n",
        malware="www.example.com\nevil.example\n",
        drugs="||shop.example^\n@@||ok.shop.example^\n",
        tsv="both.example\tdrugs,hate\nweapons.example\tweapons\n",
    )
    return Matcher(open_artifact(out))


class TestMatcher:
    def test_listed_name_covers_its_subdomains(self, matcher):
        assert matcher.match("example.com").bits == bits("pornography")
        assert matcher.match("a.b.example.com") == (bits("pornography"), "example.com", False)

    def test_categories_of_every_listed_suffix_join(self, matcher):
        match = matcher.match("login.www.example.com")
        assert match.bits == bits("pornography", "malware")
        assert match.listed == "www.example.com"  # the longest listed suffix

    @pytest.mark.parametrize(
        "name",
        ["ample.com", "xexample.com", "example.co", "com", "example.com.evil", "notevil.example", "evil.example.org"],
    )
    def test_only_label_boundaries_match(self, matcher, name):
        assert matcher.match(name).bits == 0

    def test_an_allow_entry_clears_only_its_own_lists_category(self, tmp_path):
        out = compile_texts(
            tmp_path, malware="@@||example.com^\n||evil.example.com^\n", pornography="porn.example.com\n"
        )
        matcher = Matcher(open_artifact(out))
        assert matcher.match("porn.example.com") == (bits("pornography"), "porn.example.com", False)
        assert matcher.match("evil.example.com").allowed  # malware, cleared by the malware list's own @@
        other = tmp_path / "other"
        other.mkdir()
        both = compile_texts(other, malware="@@||example.com^\nsite.example.com\n", drugs="site.example.com\n")
        assert Matcher(open_artifact(both)).match("site.example.com").bits == bits("drugs")

    def test_allow_entries_win_over_their_parents(self, matcher):
        assert matcher.match("shop.example").bits == bits("drugs")
        assert matcher.match("ok.shop.example") == (0, "ok.shop.example", True)
        assert matcher.match("deep.ok.shop.example").allowed

    def test_tsv_lines_carry_several_categories(self, matcher):
        assert matcher.match("both.example").bits == bits("drugs", "hate")

    def test_case_trailing_dot_and_wire_form(self, matcher):
        assert matcher.match("WWW.EXAMPLE.COM.").bits == bits("pornography", "malware")
        assert matcher.bits_of_wire(b"\x04evil\x07example\x00") == bits("malware")
        assert matcher.bits_of_wire(b"\x00") == 0

    def test_names_that_cannot_be_listed_match_nothing(self, matcher):
        assert matcher.match("").bits == 0
        assert matcher.match("1.2.3.4").bits == 0
        assert matcher.bits_of_wire(b"\x03\xff\xfe\xfd\x07example\x00") == 0

    def test_a_name_the_lists_cannot_hold_is_decided_by_its_closest_parent_they_can(self, matcher):
        """Malware with its own name server must not talk through the filter with a label holding a dot."""
        assert matcher.bits_of_wire(b"\x03a.b\x04evil\x07example\x00") == bits("malware")
        assert matcher.bits_of_wire(b"\x01x\x03a.b\x04evil\x07example\x00") == bits("malware")
        assert matcher.match_wire(b"\x03\xff.\x00\x04evil\x07example\x00").listed == "evil.example"

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the matcher is immutable
    @given(
        below=st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=4),
        parent=st.sampled_from(["evil.example", "www.example.com", "shop.example", "ok.shop.example", "x.none"]),
    )
    def test_a_name_with_any_bytes_is_decided_as_its_closest_parent_the_lists_can_hold(self, matcher, below, parent):
        labels = [label.lower() for label in below] + [label.encode() for label in parent.split(".")]
        plain = len(labels)  # the labels from here up are all plain: the closest representable parent
        while plain and _LISTABLE.fullmatch(labels[plain - 1]):
            plain -= 1
        closest = b"".join(bytes([len(label)]) + label for label in labels[plain:]) + b"\x00"
        wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
        assert matcher.match_wire(wire) == matcher.match_wire(closest)

    def test_empty_matcher(self):
        assert Matcher(None).match("example.com").bits == 0
        assert Matcher(None).bits_of_wire(b"\x07example\x03com\x00") == 0


class TestCompiler:
    def test_runs_spilled_to_disk_give_the_same_artifact_as_one_run(self, tmp_path, monkeypatch):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        names = "\n".join(f"n{index}.example" for index in range(2500, 0, -1))
        spilled = compile_texts(tmp_path, run_size=300, malware=names, phishing="n7.example\n").read_bytes()
        in_memory = compile_texts(tmp_path, run_size=10_000_000, malware=names, phishing="n7.example\n")
        assert in_memory.read_bytes() == spilled  # deterministic, whatever the run size
        matcher = Matcher(open_artifact(in_memory))
        assert matcher.match("n7.example").bits == bits("malware", "phishing")
        assert matcher.artifact.names == 2500

    def test_header_counts_and_sources(self, tmp_path):
        out = compile_texts(tmp_path, hate="a.example\nb.example\n", weapons="b.example\n")
        header = open_artifact(out).header
        assert header["names"] == 2
        assert header["categories"]["hate"] == {"bit": CATALOG.by_id["hate"].bit, "count": 2}
        assert header["categories"]["weapons"]["count"] == 1
        assert {s["category"] for s in header["sources"]} == {"hate", "weapons"}
        assert all(len(s["sha256"]) == 64 for s in header["sources"])

    def test_unknown_tsv_category_is_an_error_unless_skipped(self, tmp_path):
        path = tmp_path / "all.tsv"
        path.write_text("a.example\tdrugs\nb.example\tgambling\n")
        with pytest.raises(SourceError, match="line 2: category 'gambling' is not in the catalogue"):
            compile_lists([Source(path)], tmp_path / "x.bns", CATALOG)
        report = compile_lists([Source(path)], tmp_path / "x.bns", CATALOG, skip_unknown=True)
        assert report.names == 1

    def test_source_dir(self, tmp_path):
        (tmp_path / "drugs.txt").write_text("d.example\n")
        with gzip.open(tmp_path / "hate.txt.gz", "wt") as out:
            out.write("h.example\n")
        (tmp_path / "README.md").write_text("ignored")
        assert [s.category for s in sources_from_dir(tmp_path, CATALOG)] == ["drugs", "hate"]
        (tmp_path / "gambling.txt").write_text("g.example\n")
        with pytest.raises(SourceError, match="'gambling' is not a category"):
            sources_from_dir(tmp_path, CATALOG)

    def test_a_failed_compile_leaves_the_old_artifact(self, tmp_path):
        out = compile_texts(tmp_path, hate="a.example\n")
        before = out.read_bytes()
        bad = tmp_path / "bad.txt"
        bad.write_text("1.2.3.4\n")
        with pytest.raises(SourceError):
            compile_lists([Source(bad, "hate")], out, CATALOG)
        assert out.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    @pytest.mark.skipif(not (FIXTURES / "hate.txt.gz").exists(), reason="fixture missing")
    def test_real_category_files(self, tmp_path):
        sources = [Source(FIXTURES / f"{c}.txt.gz", c) for c in ("hate", "weapons", "violence-gore")]
        report = compile_lists(sources, tmp_path / "real.bns", CATALOG)
        assert report.per_category["hate"] == 267 and report.per_category["weapons"] == 35
        assert report.per_category["violence-gore"] == 377


class TestArtifactRefusal:
    @pytest.fixture
    def artifact(self, tmp_path) -> Path:
        return compile_texts(tmp_path, hate="a.example\nb.example\n")

    def test_truncated(self, artifact):
        artifact.write_bytes(artifact.read_bytes()[:-10])
        with pytest.raises(ArtifactError, match="truncated"):
            open_artifact(artifact)

    def test_flipped_byte_in_the_body(self, artifact):
        data = bytearray(artifact.read_bytes())
        data[-5] ^= 0xFF
        artifact.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="checksum mismatch"):
            open_artifact(artifact)

    def test_other_format_version(self, artifact):
        data = bytearray(artifact.read_bytes())
        struct.pack_into("<I", data, 8, 99)
        artifact.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="format version 99"):
            open_artifact(artifact)

    def test_not_an_artifact(self, tmp_path):
        for content, message in ((b"", "empty"), (b"hello world, not a list", "no BNSLIST magic")):
            path = tmp_path / "x.bns"
            path.write_bytes(content)
            with pytest.raises(ArtifactError, match=message):
                open_artifact(path)

    def test_header_lying_about_sections(self, artifact):
        data = artifact.read_bytes()
        length = struct.unpack_from("<I", data, 12)[0]
        header = json.loads(data[16 : 16 + length])
        header["sections"]["trie"][1] += 10**9
        encoded = json.dumps(header).encode().ljust(length)[:length]
        artifact.write_bytes(data[:16] + encoded + data[16 + length :])
        with pytest.raises(ArtifactError):
            open_artifact(artifact)

    def test_missing_file(self, tmp_path):
        with pytest.raises(ArtifactError, match="cannot read"):
            open_artifact(tmp_path / "absent.bns")

    @pytest.mark.parametrize(
        ("header", "message"),
        [
            ("5", "header : not an object"),
            ('"text"', "header : not an object"),
            ('{"sections": []}', "header sections: missing or not a dict"),
            ("[" * 5000 + "]" * 5000, "header is not valid JSON"),
        ],
    )
    def test_a_header_of_the_wrong_shape_is_refused_not_crashing(self, tmp_path, header, message):
        path = tmp_path / "odd.bns"
        encoded = header.encode()
        path.write_bytes(struct.pack("<8sII", b"BNSLIST\x00", 2, len(encoded)) + encoded)
        with pytest.raises(ArtifactError, match=re.escape(message)):
            open_artifact(path)
        with pytest.raises(ArtifactError, match=re.escape(message)):
            verify_file(path)

    def test_an_index_pointing_past_the_table_is_refused(self, tmp_path):
        from array import array

        import marisa_trie

        trie = marisa_trie.Trie(["com.example."])
        header = {"built": "x", "names": 1, "allows": 0, "categories": {}, "sources": [], "index_type": "H"}
        path = tmp_path / "bad-index.bns"
        write_artifact(
            path,
            header,
            {"trie": trie.tobytes(), "index": array("H", [7]).tobytes(), "table": array("Q", [1, 0]).tobytes()},
        )
        with pytest.raises(ArtifactError, match="index points past the end of the table"):
            open_artifact(path)
