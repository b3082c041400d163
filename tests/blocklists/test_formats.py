"""List formats on the real fixtures and on hostile lines; name normalisation; the catalogue."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from blocklists.catalog import load_catalog
from blocklists.errors import CatalogError, SourceError
from blocklists.formats import MAX_BYTES, MAX_LINE, Entry, SourceReport, UnusableSource, detect_format, read_source
from blocklists.names import BadName, LocalName, normalize, reverse, unreverse, wire_to_key
from tests.conftest import FIXTURES

pytestmark = pytest.mark.unit
FORMATS_DIR = FIXTURES / "formats"
with gzip.open(FIXTURES / "urlhaus-filter__domains.txt.gz", "rt") as _names:
    URLHAUS = set(_names.read().split())


def read(path: Path, source_format: str | None = None) -> tuple[list[Entry], SourceReport]:
    report = SourceReport(str(path))
    return list(read_source(path, report, source_format)), report


def write(tmp_path: Path, text: str, name: str = "list.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestNames:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("Example.COM", "example.com"),
            ("www.example.com.", "www.example.com"),
            ("*.ads.example", "ads.example"),
            (".example.org", "example.org"),
            ("bücher.de", "xn--bcher-kva.de"),
            ("_dmarc.example.com", "_dmarc.example.com"),
            ("  spaced.example  ", "spaced.example"),
        ],
    )
    def test_normalize(self, raw, expected):
        assert normalize(raw) == expected

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            ("1.2.3.4", "an IP address"),
            ("::1", "IPv6"),
            ("com", "no dot"),
            ("a..b", "empty label"),
            ("a" * 64 + ".com", "longer than 63"),
            (("a" * 60 + ".") * 5 + "com", "longer than 253"),
            ("exa mple.com", "not allowed"),
            ("ex%ample.com", "not allowed"),
            ("a.b.123", "numeric top-level"),
            ("", "empty"),
        ],
    )
    def test_bad_names_say_why(self, raw, reason):
        with pytest.raises(BadName, match=reason):
            normalize(raw)

    def test_localhost_is_a_local_name(self):
        with pytest.raises(LocalName):
            normalize("localhost")

    def test_reverse_and_wire_keys(self):
        assert reverse("www.example.com") == "com.example.www."
        assert unreverse("com.example.www.") == "www.example.com"
        assert wire_to_key(b"\x03www\x07example\x03com\x00") == "com.example.www."
        assert wire_to_key(b"\x00") == "."


class TestFixtures:
    @pytest.mark.parametrize(
        "name",
        [
            "urlhaus-filter.hosts.txt",
            "urlhaus-filter.rpz.zone",
            "urlhaus-filter.bind.conf",
            "urlhaus-filter.unbound.conf",
        ],
    )
    def test_one_snapshot_in_four_syntaxes_gives_the_same_2689_names(self, name):
        entries, report = read(FORMATS_DIR / name)
        assert {entry.name for entry in entries} == URLHAUS
        assert len(URLHAUS) == 2689
        assert report.rejected_count == 0

    @pytest.mark.parametrize(
        ("name", "expected_format"),
        [
            ("urlhaus-filter.hosts.txt", "hosts"),
            ("urlhaus-filter.rpz.zone", "rpz"),
            ("urlhaus-filter.bind.conf", "bind"),
            ("urlhaus-filter.unbound.conf", "unbound"),
            ("blocklistproject-drugs.adguard.txt", "adblock"),
            ("blocklistproject-drugs.dnsmasq.conf", "dnsmasq"),
            ("blocklistproject-drugs.hosts.txt", "hosts"),
            ("urlhaus-filter.wildcard.head.txt", "wildcard"),
        ],
    )
    def test_format_is_detected(self, name, expected_format):
        _, report = read(FORMATS_DIR / name)
        assert report.format == expected_format

    def test_the_drugs_list_in_three_syntaxes_agrees(self):
        names = [
            {e.name for e in read(FORMATS_DIR / f"blocklistproject-drugs.{suffix}")[0]}
            for suffix in ("adguard.txt", "dnsmasq.conf", "hosts.txt")
        ]
        assert names[0] == names[1] == names[2]
        assert len(names[0]) > 4900

    def test_wildcard_ip_entries_are_rejected_with_line_numbers(self):
        entries, report = read(FORMATS_DIR / "urlhaus-filter.wildcard.head.txt")
        assert entries and all(entry.name in URLHAUS for entry in entries)
        assert report.rejected["an IP address, not a name"] > 0
        number, reason, text = report.samples[0]
        assert reason == "an IP address, not a name" and text.startswith("*.") and number > 1

    def test_hosts_with_several_names_and_local_boilerplate(self, tmp_path):
        path = write(
            tmp_path,
            "127.0.0.1 localhost\n::1 ip6-localhost ip6-loopback\n"
            "0.0.0.0 a.example b.example # trailing comment\n# comment\n\n:: c.example\n",
        )
        entries, report = read(path)
        assert [e.name for e in entries] == ["a.example", "b.example", "c.example"]
        assert report.skipped["local name"] == 2 and report.format == "hosts"


class TestHostileLines:
    def test_adblock_rules(self, tmp_path):
        text = "\n".join(
            [
                "[Adblock Plus 2.0]",
                "! comment",
                "# also a comment",
                "||ads.example^",
                "||tracker.example^$important",
                "@@||good.ads.example^",
                "||*.wild.example^",
                "example.com##.banner",
                "||example.com/path^",
                "/ad[0-9]+/",
                "||third.example^$third-party",
                "plain.example",
                "||1.2.3.4^",
                "||bad..name^",
            ]
        )
        entries, report = read(write(tmp_path, text), "adblock")
        assert entries == [
            Entry("ads.example"),
            Entry("tracker.example"),
            Entry("good.ads.example", allow=True),
            Entry("wild.example"),
            Entry("plain.example"),
        ]
        assert report.skipped == {
            "cosmetic rule": 1,
            "path rule (a URL, not a domain)": 1,
            "regular expression rule": 1,
            "rule with modifiers a DNS filter cannot apply": 1,
        }
        assert [sample[0] for sample in report.samples] == [13, 14]

    def test_rpz_actions_wildcards_and_origin(self, tmp_path):
        text = "\n".join(
            [
                "$TTL 60",
                "$ORIGIN rpz.example.",
                "@ SOA ns.example. admin.example. (",
                " 1 3600 600 86400 60 )",
                " NS ns.example.",
                "blocked.example CNAME .",
                "*.wild.example CNAME .",
                "nodata.example CNAME *.",
                "ok.example CNAME rpz-passthru.",
                "abs.example.rpz.example. CNAME .",
                "32.1.2.0.192.rpz-ip CNAME .",
                "dropped.example 300 IN CNAME rpz-drop.",
                "local.example A 127.0.0.1",
            ]
        )
        entries, report = read(write(tmp_path, text, "zone.rpz"))
        assert report.format == "rpz"
        assert entries == [
            Entry("blocked.example"),
            Entry("wild.example"),
            Entry("nodata.example"),
            Entry("ok.example", allow=True),
            Entry("abs.example"),
            Entry("dropped.example"),
            Entry("local.example"),
        ]
        assert report.skipped == {"RPZ IP or name-server trigger": 1}

    def test_dnsmasq_rules(self, tmp_path):
        text = (
            "address=/ads.example/0.0.0.0\naddress=/a.example/b.example/\nlocal=/c.example/\n"
            "server=/d.example/\nserver=/corp.example/10.0.0.1\nno-resolv\naddress=/#/0.0.0.0\n"
        )
        entries, report = read(write(tmp_path, text), "dnsmasq")
        assert [e.name for e in entries] == ["ads.example", "a.example", "b.example", "c.example", "d.example"]
        assert report.skipped["forwarding rule (server=/name/address), not a block"] == 1
        assert report.rejected_count == 1

    def test_unbound_rules(self, tmp_path):
        text = (
            'server:\nlocal-zone: "bad.example" always_nxdomain\nlocal-zone: "good.example" transparent\n'
            'local-data: "x.example A 1.2.3.4"\nlocal-zone: broken\n'
        )
        entries, report = read(write(tmp_path, text), "unbound")
        assert entries == [Entry("bad.example"), Entry("good.example", allow=True)]
        assert report.rejected_count == 1 and report.skipped

    def test_binary_garbage_and_bad_utf8_are_rejected_not_fatal(self, tmp_path):
        path = tmp_path / "mixed.txt"
        path.write_bytes(b"good.example\n\xff\xfe\x00bad\nanother.example\n" + b"\x00" * 10 + b"\n")
        entries, report = read(path, "plain")
        assert [e.name for e in entries] == ["good.example", "another.example"]
        assert report.rejected_count == 2

    def test_a_source_with_nothing_usable_is_an_error_naming_it(self, tmp_path):
        path = write(tmp_path, "# only comments\n1.2.3.4\nnot a domain\n")
        with pytest.raises(SourceError, match=r"list.txt: no usable domain.*line 2: an IP address"):
            read(path)

    def test_unreadable_source(self, tmp_path):
        with pytest.raises(SourceError, match="cannot read"):
            read(tmp_path / "missing.txt")

    def test_truncated_gzip_is_an_error(self, tmp_path):
        data = gzip.compress(b"a.example\n" * 1000)
        path = tmp_path / "cut.txt.gz"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(SourceError, match="cannot read"):
            read(path)

    def test_detect_prefers_plain_for_plain_lists(self):
        assert detect_format(["a.example\n", "b.example\n"]) == "plain"
        assert detect_format([]) == "plain"


def gzip_of(chunk: bytes, times: int) -> bytes:
    """`chunk` repeated `times` times, gzipped a chunk at a time (never the whole in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    return b"".join(packer.compress(chunk) for _ in range(times)) + packer.flush()


class TestBounds:
    """A hostile source costs at most the bounds (issue 18): the attack was a 408 KB upload decompressing to
    400 MB without a newline, held whole as one line (1.25 GB for 14 s)."""

    def test_a_line_without_end_stops_the_reading_at_the_bound(self, tmp_path):
        path = tmp_path / "bomb.txt.gz"
        path.write_bytes(gzip_of(b"a" * (1 << 20), 400))  # 400 MB of one line, in 400 KB
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(UnusableSource, match=f"bomb.txt.gz: line 1 is longer than {MAX_LINE} characters"):
                read(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert time.monotonic() - started < 1 and peak < 2**20

    def test_a_source_decompressing_past_the_bound_stops_there(self, tmp_path):
        path = tmp_path / "many.txt.gz"
        path.write_bytes(gzip_of(b"a.example\n" * 100_000, 100))  # 100 MB of lines
        report = SourceReport("the upload")
        with pytest.raises(
            UnusableSource, match=r"the upload: decompresses to more than 1048576 bytes \(admin.max_upload\)"
        ):
            list(read_source(path, report, max_bytes=1 << 20, setting="admin.max_upload"))
        assert report.lines < 110_000  # it stopped at the bound (1 MB), not at the end of the file
        assert MAX_BYTES > 100 * 2**20  # the bound of `bns lists compile` is above what real lists decompress to

    def test_lines_up_to_the_bound_are_read_with_any_line_ending(self, tmp_path):
        longest = "x" * (MAX_LINE - len(".example")) + ".example"
        path = tmp_path / "edge.txt"
        path.write_bytes(f"a.example\r\n{longest}\rb.example".encode())
        entries, report = read(path, "plain")
        assert [e.name for e in entries] == ["a.example", "b.example"]  # the long one is not a name, but a line
        assert report.lines == 3 and report.rejected_count == 1


class TestCatalog:
    def test_packaged_catalogue(self):
        catalog = load_catalog()
        assert {c.id for c in catalog if c.action == "block"} == {
            "criminal-skills",
            "drugs",
            "hacking",
            "hate",
            "pornography",
            "self-harm-suicide",
            "violence-gore",
            "weapons",
            "encrypted-dns",  # public DoH/DoT servers: a way out of the filter, closed by default
        }
        assert {c.id for c in catalog if c.action == "warn"} == {"malware", "phishing"}
        assert len({c.bit for c in catalog}) == len(catalog.categories)
        assert catalog.ids(catalog.mask(["drugs", "malware"])) == ["drugs", "malware"]

    @pytest.mark.parametrize(
        ("entry", "message"),
        [
            ('id = "x"\nbit = 64\ntitle = "X"\ndescription = ""\naction = "block"', "bit: 64 is outside 0..63"),
            ('id = "x"\nbit = 61\ntitle = "X"\ndescription = ""\naction = "block"', "bit: 61 is reserved"),
            ('id = "x"\nbit = 1\ntitle = "X"\ndescription = ""\naction = "hide"', "action: 'hide'"),
            ('id = "X Y"\nbit = 1\ntitle = "X"\ndescription = ""\naction = "block"', "id: use lowercase"),
            ('id = "x"\nbit = 1\ntitle = "X"\naction = "block"', "description: missing"),
            ('id = "x"\nbit = 1\ntitle = "X"\ndescription = ""\naction = "block"\ncolour = 1', "unknown field colour"),
        ],
    )
    def test_bad_catalogue_entries(self, tmp_path, entry, message):
        path = write(tmp_path, f"format = 1\n[[category]]\n{entry}\n", "categories.toml")
        with pytest.raises(CatalogError, match=message):
            load_catalog(path)

    def test_duplicate_bits(self, tmp_path):
        one = 'bit = 3\ntitle = "T"\ndescription = ""\naction = "block"'
        path = write(
            tmp_path, f'format = 1\n[[category]]\nid = "a"\n{one}\n[[category]]\nid = "b"\n{one}\n', "categories.toml"
        )
        with pytest.raises(CatalogError, match="bit: 3 is already used by a"):
            load_catalog(path)

    def test_an_operators_own_categories_extend_the_packaged_ones_on_bits_of_their_own(self, tmp_path):
        ads = '[[category]]\nid = "ads"\nbit = BIT\ntitle = "Ads"\ndescription = "Ad servers"\naction = "block"\n'
        path = write(tmp_path, 'format = 1\nextends = "packaged"\n' + ads.replace("BIT", "32"), "own.toml")
        catalog = load_catalog(path)
        assert catalog.by_id["ads"].bit == 32 and catalog.by_id["drugs"].bit == load_catalog().by_id["drugs"].bit
        assert len(catalog.categories) == len(load_catalog().categories) + 1
        taken = write(tmp_path, 'format = 1\nextends = "packaged"\n' + ads.replace("BIT", "1"), "taken.toml")
        with pytest.raises(CatalogError, match="bit: 1 is already used by drugs"):
            load_catalog(taken)
        other = write(tmp_path, 'format = 1\nextends = "mine"\n' + ads.replace("BIT", "32"), "other.toml")
        with pytest.raises(CatalogError, match='extends: the only catalogue to extend is "packaged"'):
            load_catalog(other)


class TestReviewedEdgeCases:
    """Cases a review of the parsers found wrong; each once over-blocked, under-blocked or misread."""

    def test_a_byte_order_mark_does_not_eat_the_first_line(self, tmp_path):
        path = tmp_path / "bom.hosts"
        path.write_bytes("\ufeff0.0.0.0 first.example\n0.0.0.0 second.example\n".encode())
        entries, report = read(path)
        assert [e.name for e in entries] == ["first.example", "second.example"] and report.rejected_count == 0

    def test_an_easylist_style_list_is_adblock_and_cosmetic_rules_never_block(self, tmp_path):
        lines = [f"||ads{i}.example^" for i in range(30)] + [f"site{i}.example##.banner" for i in range(40)]
        entries, report = read(write(tmp_path, "\n".join(lines)))
        assert report.format == "adblock"
        assert {e.name for e in entries} == {f"ads{i}.example" for i in range(30)}
        assert report.skipped["cosmetic rule"] == 40
        plain_entries, _ = read(write(tmp_path, "site.example##.banner\nok.example\n", "p.txt"), "plain")
        assert [e.name for e in plain_entries] == ["ok.example"]

    def test_rpz_dump_with_absolute_owners_and_ttl_units(self, tmp_path):
        text = "\n".join(
            [
                "rpz.example. 3600 IN SOA ns.rpz.example. admin.rpz.example. 1 3600 600 86400 60",
                "rpz.example. 3600 IN NS ns.rpz.example.",
                "bad.com.rpz.example. 300 IN CNAME .",
                "pass.com.rpz.example. 1h IN CNAME rpz-passthru.",
                "slow.com.rpz.example. 1h30m in cname .",
            ]
        )
        entries, report = read(write(tmp_path, text, "dump.zone"))
        assert report.format == "rpz"
        assert entries == [Entry("bad.com"), Entry("pass.com", allow=True), Entry("slow.com")]

    def test_rpz_in_lowercase_is_detected(self, tmp_path):
        entries, report = read(write(tmp_path, "bad.com cname .\nworse.com cname .\n", "lower.zone"))
        assert report.format == "rpz" and [e.name for e in entries] == ["bad.com", "worse.com"]

    def test_dnsmasq_hash_is_syntax_not_a_comment(self, tmp_path):
        text = "# a comment\nserver=/c.example/#\naddress=/d.example/#\nlocal=/e.example/\n"
        entries, _ = read(write(tmp_path, text), "dnsmasq")
        assert entries == [Entry("c.example", allow=True), Entry("d.example"), Entry("e.example")]

    def test_bind_block_comments_zone_types_and_multi_line_statements(self, tmp_path):
        text = "\n".join(
            [
                'zone "blocked.example" { type master; file "null.zone"; };',
                "/* a comment block",
                'zone "commented.example" { type master; file "null.zone"; };',
                "*/",
                'zone "forwarded.example" { type forward; forwarders { 192.0.2.1; }; };',
                'zone "spread.example" {',
                "    type primary;",
                '    file "null.zone";',
                "};",
                'options { directory "/var/cache/bind"; };',
            ]
        )
        entries, report = read(write(tmp_path, text, "named.conf"), "bind")
        assert [e.name for e in entries] == ["blocked.example", "spread.example"]
        assert report.skipped == {"zone of type forward": 1, "BIND statement that is not a zone": 1}

    def test_unbound_nodefault_is_not_a_block(self, tmp_path):
        entries, report = read(
            write(tmp_path, 'local-zone: "example.org" nodefault\nlocal-zone: "bad.example" deny\n'), "unbound"
        )
        assert entries == [Entry("bad.example")] and report.skipped["local-zone type nodefault"] == 1

    def test_local_names_are_never_listed(self, tmp_path):
        path = write(tmp_path, "127.0.0.1 localhost.localdomain localhost\n0.0.0.0 real.example\n", "h.txt")
        entries, report = read(path)
        assert [e.name for e in entries] == ["real.example"] and report.skipped["local name"] == 1

    def test_idn_is_idna_2008(self):
        assert normalize("faß.de") == "xn--fa-hia.de"  # not fass.de, somebody else's domain
        assert normalize("ς.gr") == "xn--3xa.gr"

    def test_a_dot_inside_a_wire_label_is_decided_as_its_closest_representable_parent(self):
        # `porn.com` as one label under example: never the key of porn.com.example, nor of nothing at all
        assert wire_to_key(b"\x08porn.com\x07example\x00") == "example."
        assert wire_to_key(b"\x01x\x03a.b\x07malware\x07example\x00") == "example.malware."
        assert wire_to_key(b"\x01.\x03a.b\x00") == "."
