"""Names answered here and never forwarded (resolver/worker/local_zones.py): the RFC 6303 reverse zones,
localhost, invalid, test, onion, local and home.arpa by default, each answered as unbound answers it; zones turned
off or added by the configuration; bad zone names refused naming the key; and, on real sockets with a real
upstream that does not answer, the names the issue tried reach it no more."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import shutil
import subprocess

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from bench.upstream import Script, ScriptedUpstream
from resolver.shared.config import reloaded
from resolver.shared.errors import ConfigError
from resolver.shared.special_names import DEFAULT_ZONES
from tests.conftest import ServerThread, answer_addresses, make_config
from tests.worker.test_pipeline import Pipeline, run, write_site

pytestmark = pytest.mark.unit


def reverse(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


async def ask(pipeline: Pipeline, name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.message.from_wire(await pipeline.ask(dns.message.make_query(name, rdtype, use_edns=0).to_wire()))


def outcome(answer: dns.message.Message) -> tuple[str, list[str], str]:
    """(rcode, the answer's records as text, the owner of the SOA in the authority section)."""
    records = sorted(record.to_text() for rrset in answer.answer for record in rrset)
    soa = [rrset.name.to_text().lower() for rrset in answer.authority if rrset.rdtype == dns.rdatatype.SOA]
    return dns.rcode.to_text(answer.rcode()), records, soa[0] if soa else ""


# What the issue tried, and what RFC 6303, 6761, 7686, 6762 and 8375 ask: (name, type) → (rcode, records, SOA)
SERVED = {
    (reverse("192.168.0.1"), "PTR"): ("NXDOMAIN", [], "168.192.in-addr.arpa."),
    (reverse("127.0.0.1"), "PTR"): ("NOERROR", ["localhost."], ""),
    (reverse("127.0.0.2"), "PTR"): ("NXDOMAIN", [], "127.in-addr.arpa."),
    (reverse("::1"), "PTR"): ("NOERROR", ["localhost."], ""),
    (reverse("10.1.2.3"), "PTR"): ("NXDOMAIN", [], "10.in-addr.arpa."),
    (reverse("172.31.0.1"), "PTR"): ("NXDOMAIN", [], "31.172.in-addr.arpa."),
    (reverse("100.64.0.1"), "PTR"): ("NXDOMAIN", [], "64.100.in-addr.arpa."),
    (reverse("169.254.1.1"), "PTR"): ("NXDOMAIN", [], "254.169.in-addr.arpa."),
    (reverse("fe80::1"), "PTR"): ("NXDOMAIN", [], "8.e.f.ip6.arpa."),
    (reverse("febf::1"), "PTR"): ("NXDOMAIN", [], "b.e.f.ip6.arpa."),
    (reverse("fd12:3456::1"), "PTR"): ("NXDOMAIN", [], "d.f.ip6.arpa."),
    (reverse("2001:db8::1"), "PTR"): ("NXDOMAIN", [], "8.b.d.0.1.0.0.2.ip6.arpa."),
    ("localhost", "A"): ("NOERROR", ["127.0.0.1"], ""),
    ("LocalHost.", "AAAA"): ("NOERROR", ["::1"], ""),
    ("www.localhost", "A"): ("NOERROR", ["127.0.0.1"], ""),  # RFC 6761 §6.3: every name under it too
    ("localhost", "MX"): ("NOERROR", [], "localhost."),  # NODATA
    ("10.in-addr.arpa", "SOA"): ("NOERROR", ["localhost. nobody.invalid. 1 3600 1200 604800 10800"], ""),
    ("10.in-addr.arpa", "NS"): ("NOERROR", ["localhost."], ""),
    ("10.in-addr.arpa", "TXT"): ("NOERROR", [], "10.in-addr.arpa."),
    ("foo.home.arpa", "A"): ("NXDOMAIN", [], "home.arpa."),
    ("x.invalid", "A"): ("NXDOMAIN", [], "invalid."),
    ("printer.local", "A"): ("NXDOMAIN", [], "local."),
    ("a.test", "AAAA"): ("NXDOMAIN", [], "test."),
    ("duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion", "A"): ("NXDOMAIN", [], "onion."),
}
# Beside them and not under them: forwarded as any other name.
FORWARDED = [
    reverse("192.169.0.1"),
    reverse("172.15.0.1"),
    reverse("172.32.0.1"),
    reverse("100.63.0.1"),
    reverse("100.128.0.1"),
    reverse("8.8.8.8"),
    reverse("fec0::1"),
    reverse("2001:db9::1"),
    "localhostx",
    "local.example.com",
    "home.arpa.example",
    "xtest",
]


# The operator's own names (local.records).
RECORDS = [
    "printer.office.example A 192.0.2.20",
    "NAS.office.example 300 AAAA fd00::20",
    "nas.office.example A 192.168.1.20",
    "intranet.office.example CNAME nas.office.example.",
    "wiki.office.example CNAME intranet.office.example",
    "away.office.example CNAME www.example.com.",
    'office.example TXT "v=spf1 -all"',
    "_ipp._tcp.office.example SRV 0 0 631 printer.office.example.",
    "office.example MX 10 mail.office.example.",
    "20.2.0.192.in-addr.arpa PTR front-desk.office.example.",
    "cam.porn.example A 192.0.2.66",
    "public.office.example A 8.8.8.8",  # the Internet's address: no PTR made for it
    "printer.lan.home.arpa A 192.168.1.30",
]


def test_the_special_use_names_are_answered_here_as_unbound_answers_them_and_no_other(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        for (name, rdtype), expected in SERVED.items():
            answer = await ask(pipeline, name, rdtype)
            assert outcome(answer) == expected, (name, rdtype)
            assert answer.question[0].name.to_text().rstrip(".") == name.rstrip(".")  # the client's spelling
            assert answer.flags & dns.flags.RA and not answer.flags & dns.flags.AA
        assert pipeline.forwarder.asked == []
        for name in FORWARDED:
            assert (await ask(pipeline, name, "PTR")).rcode() == dns.rcode.NOERROR
        assert pipeline.forwarder.asked == FORWARDED
        counts = pipeline.resolver.local_zones.counts()
        assert counts["localhost"] == 4 and counts["10.in-addr.arpa"] == 4 and sum(counts.values()) == len(SERVED)

    run(lists, tmp_path, work)


def test_a_zone_is_turned_off_added_or_cut_out_of_another_and_resolver_arpa_stays(lists, tmp_path):
    local = {"not_served": ["16.172.in-addr.arpa", "home.arpa", "1.168.192.in-addr.arpa"], "zones": ["lab.example"]}

    async def work(pipeline: Pipeline) -> None:
        for name in (reverse("172.16.0.1"), "foo.home.arpa", reverse("192.168.1.7")):
            assert (await ask(pipeline, name, "PTR")).rcode() == dns.rcode.NOERROR
        assert outcome(await ask(pipeline, reverse("192.168.2.7"), "PTR")) == ("NXDOMAIN", [], "168.192.in-addr.arpa.")
        assert outcome(await ask(pipeline, "printer.LAB.example")) == ("NXDOMAIN", [], "lab.example.")
        assert outcome(await ask(pipeline, "lab.example", "NS")) == ("NOERROR", ["localhost."], "")
        assert pipeline.forwarder.asked == [reverse("172.16.0.1"), "foo.home.arpa", reverse("192.168.1.7")]

    run(lists, tmp_path, work, sections={"local": local})

    async def without_defaults(pipeline: Pipeline) -> None:
        assert (await ask(pipeline, reverse("192.168.0.1"), "PTR")).rcode() == dns.rcode.NOERROR
        assert (await ask(pipeline, "localhost")).rcode() == dns.rcode.NOERROR
        assert outcome(await ask(pipeline, "x.resolver.arpa", "TXT")) == ("NOERROR", [], "resolver.arpa.")
        assert pipeline.forwarder.asked == [reverse("192.168.0.1"), "localhost"]

    run(lists, tmp_path, without_defaults, sections={"local": {"defaults": False}})


@pytest.mark.parametrize(
    ("local", "refused"),
    [
        ({"zones": ["."]}, "local.zones: the root cannot be a local zone"),
        ({"zones": ["a..b"]}, "local.zones: 'a..b': label 2"),
        ({"zones": "lab.example"}, "local.zones: must be a list of zone names"),
        ({"not_served": ["example.com"]}, "local.not_served: example.com is not a zone answered here, nor under one"),
        ({"defaults": False, "not_served": ["home.arpa"]}, "(local.defaults is off)"),
    ],
)
def test_a_bad_zone_is_refused_naming_the_key(local, refused):
    with pytest.raises(ConfigError, match=refused.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        make_config(["127.0.0.1:9"], local=local)


def test_the_defaults_are_each_a_zone_once():
    # names; IPv4 reverse zones but 172.16/12's and 100.64/10's; those two; IPv6 reverse zones
    assert len(set(DEFAULT_ZONES)) == len(DEFAULT_ZONES) == 6 + 9 + 16 + 64 + 8


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")
def test_what_the_issue_tried_and_the_operators_names_never_reach_an_upstream_that_does_not_answer(lists):
    tried = [
        (reverse("192.168.0.1"), "PTR", "NXDOMAIN"),
        (reverse("127.0.0.1"), "PTR", "NOERROR"),
        ("localhost", "A", "NOERROR"),
        ("foo.home.arpa", "A", "NXDOMAIN"),
        ("x.invalid", "A", "NXDOMAIN"),
        ("printer.local", "AAAA", "NXDOMAIN"),
    ]
    with (
        ScriptedUpstream(script=Script(mode="drop")) as upstream,
        ServerThread(make_config([upstream.address], lists={"path": str(lists)}, local={"records": RECORDS})) as server,
    ):
        for name, rdtype, rcode in tried:
            for transport in ("+notcp", "+tcp"):
                dig = subprocess.run(
                    ["dig", "-p", str(server.port), "@127.0.0.1", name, rdtype, transport, "+tries=1", "+time=1"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert f"status: {rcode}" in dig.stdout, (name, transport, dig.stdout)
        short = ["dig", "-p", str(server.port), "@127.0.0.1", "+short", "+tries=1", "+time=1"]
        record = subprocess.run([*short, "printer.office.example"], capture_output=True, text=True, check=False)
        assert record.stdout.split() == ["192.0.2.20"]
        pointer = subprocess.run([*short, "-x", "192.168.1.20"], capture_output=True, text=True, check=False)
        assert pointer.stdout.split() == ["nas.office.example."]
        assert upstream.names_seen() == []


def test_the_operators_records_are_answered_here_with_their_ptrs_and_cname_chains(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        expected = {
            ("printer.office.example", "A"): ("NOERROR", ["192.0.2.20"], ""),
            ("Nas.Office.Example", "AAAA"): ("NOERROR", ["fd00::20"], ""),
            ("nas.office.example", "A"): ("NOERROR", ["192.168.1.20"], ""),
            ("nas.office.example", "MX"): ("NOERROR", [], ""),  # NODATA
            ("wiki.office.example", "A"): (
                "NOERROR",
                ["192.168.1.20", "intranet.office.example.", "nas.office.example."],
                "",
            ),
            ("wiki.office.example", "CNAME"): ("NOERROR", ["intranet.office.example."], ""),
            ("away.office.example", "A"): ("NOERROR", ["www.example.com."], ""),  # the client follows it out
            ("office.example", "TXT"): ("NOERROR", ['"v=spf1 -all"'], ""),
            ("office.example", "MX"): ("NOERROR", ["10 mail.office.example."], ""),
            ("_ipp._tcp.office.example", "SRV"): ("NOERROR", ["0 0 631 printer.office.example."], ""),
            # PTRs: written, made from an A (the first name of an address), made from an AAAA
            (reverse("192.0.2.20"), "PTR"): ("NOERROR", ["front-desk.office.example."], ""),
            (reverse("192.168.1.20"), "PTR"): ("NOERROR", ["nas.office.example."], ""),
            (reverse("fd00::20"), "PTR"): ("NOERROR", ["nas.office.example."], ""),
            # the rest of a served reverse zone is still NXDOMAIN, but the names above a record exist (RFC 8020)
            (reverse("192.168.1.21"), "PTR"): ("NXDOMAIN", [], "168.192.in-addr.arpa."),
            ("1.168.192.in-addr.arpa", "PTR"): ("NOERROR", [], "168.192.in-addr.arpa."),
            ("lan.home.arpa", "A"): ("NOERROR", [], "home.arpa."),
            ("printer.lan.home.arpa", "A"): ("NOERROR", ["192.168.1.30"], ""),
            ("printer.lan.home.arpa", "TXT"): ("NOERROR", [], "home.arpa."),  # NODATA with the zone's SOA
            ("0.0.127.in-addr.arpa", "PTR"): ("NOERROR", [], "127.in-addr.arpa."),  # above 127.0.0.1's PTR
        }
        for (name, rdtype), outcome_expected in expected.items():
            answer = await ask(pipeline, name, rdtype)
            assert outcome(answer) == outcome_expected, (name, rdtype)
        assert (await ask(pipeline, "nas.office.example", "AAAA")).answer[0].ttl == 300
        assert pipeline.forwarder.asked == []
        # Names beside them are not the operator's: forwarded, and so is a public address's reverse name.
        assert (await ask(pipeline, "other.office.example")).rcode() == dns.rcode.NOERROR
        assert (await ask(pipeline, reverse("8.8.8.8"), "PTR")).rcode() == dns.rcode.NOERROR
        assert pipeline.forwarder.asked == ["other.office.example", reverse("8.8.8.8")]
        # every question above but the four the served zones answer, and the TTL's
        assert pipeline.resolver.local_zones.counts()["local.records"] == len(expected) - 4 + 1

    run(lists, tmp_path, work, sections={"local": {"records": RECORDS}})


def test_the_operators_records_are_still_filtered_by_the_devices_policy(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        policy = {"block": ["pornography"], "deny": ["nas.office.example"]}
        await write_site(pipeline, {"networks": ["127.0.0.0/8"], "policy": policy})
        assert outcome(await ask(pipeline, "printer.office.example")) == ("NOERROR", ["192.0.2.20"], "")
        for blocked in ("nas.office.example", "cam.porn.example"):
            answer = await ask(pipeline, blocked)
            assert not answer.answer, blocked  # not the record's address
            assert [option.otype for option in answer.options] == [dns.edns.OptionType.EDE], blocked

    run(lists, tmp_path, work, sections={"local": {"records": RECORDS}})


@pytest.mark.parametrize(
    ("records", "refused"),
    [
        (
            ["printer.office.example A 192.0.2.300"],
            r"local\.records: line 1 \('printer\.office\.example A 192\.0\.2\.300'\)",
        ),
        (["printer.office.example HINFO a b"], "line 1 .*type HINFO is not one of A, AAAA"),
        (["printer.office.example A"], 'line 1 .*write "name \\[ttl\\] type data"'),
        (["a.example 99999999 A 192.0.2.1"], "line 1 .*TTL 99999999 is above 604800"),
        (["a.example A 192.0.2.1", "a.example CNAME b.example."], "line 1 .*a CNAME must be its name's only record"),
        (["a.example CNAME b.example.", "b.example CNAME a.example."], "line 1 .*its CNAME chain loops"),
        (["bad..name A 192.0.2.1"], "line 1 .*label 2"),
        ("a.example A 192.0.2.1", "local.records: must be a list of lines"),
    ],
)
def test_a_bad_record_is_refused_naming_its_line(records, refused):
    with pytest.raises(ConfigError, match=refused):
        make_config(["127.0.0.1:9"], local={"records": records})


def forward_counts(server: ServerThread) -> dict[str, dict[str, int]]:
    assert server.worker is not None
    zones = server.worker.resolver.local_zones
    return server.call(lambda: zones.forward_counts(asyncio.get_running_loop().time()))  # type: ignore[no-any-return]


@pytest.mark.integration
def test_a_forwarded_zone_goes_to_its_own_servers_after_the_policy_and_fails_alone(lists):
    with (
        ScriptedUpstream(script=Script(ttl=60, ad=True)) as upstream,
        ScriptedUpstream(script=Script(ttl=60, ad=True, modes={"down.corp.example": "drop"})) as corp,
    ):
        forward = {
            "corp.example": [corp.address],
            "16.172.in-addr.arpa": [corp.address],
            "porn.example": [corp.address],
            "ip6.arpa": [corp.address],  # above served zones (fd00::/8's…): they are its servers' too
        }
        config = make_config(
            [upstream.address],
            lists={"path": str(lists)},
            policy={"block": ["pornography"]},
            local={"forward": forward},
            upstream={"trust_ad": True},
        )
        with ServerThread(config) as server:
            intranet = server.ask("Intranet.Corp.Example", want_dnssec=True)
            assert (
                intranet.rcode() == dns.rcode.NOERROR and not intranet.flags & dns.flags.AD
            )  # a LAN's AD: not trusted
            assert server.ask("www.example.net", want_dnssec=True).flags & dns.flags.AD  # upstream.servers': trusted
            assert server.ask(reverse("fd00::1"), "PTR").rcode() == dns.rcode.NOERROR
            assert server.ask(reverse("172.16.0.5"), "PTR").rcode() == dns.rcode.NOERROR  # a served zone, taken over
            assert server.ask(reverse("172.17.0.5"), "PTR").rcode() == dns.rcode.NXDOMAIN  # still served here
            assert server.ask("www.example.com").rcode() == dns.rcode.NOERROR
            blocked = server.ask("cams.porn.example", use_edns=0)  # filtered first: not asked of the zone's servers
            assert not blocked.answer and blocked.options
            # The zone's server does not answer one name: SERVFAIL for it alone, the rest still answered.
            assert server.ask("down.corp.example", timeout=5).rcode() == dns.rcode.SERVFAIL
            assert forward_counts(server)["corp.example"]["down"] == 1  # its one server, marked down
            assert server.ask("wiki.corp.example").rcode() == dns.rcode.NOERROR
            assert server.ask("www.example.org").rcode() == dns.rcode.NOERROR
            counts = forward_counts(server)
        seen_by_corp = corp.names_seen()
        assert seen_by_corp[0] == "intranet.corp.example"  # without 0x20's mixed case: a LAN's DNS may not echo it
        assert set(seen_by_corp) == {
            "intranet.corp.example",
            reverse("fd00::1"),
            reverse("172.16.0.5"),
            "down.corp.example",
            "wiki.corp.example",
        }
        assert {name.lower() for name in upstream.names_seen()} == {
            "www.example.net",
            "www.example.com",
            "www.example.org",
        }
        assert counts["corp.example"]["replies"] == 2 and counts["16.172.in-addr.arpa"]["replies"] == 1
        assert counts["corp.example"]["down"] == 0  # answering again


@pytest.mark.parametrize(
    ("forward", "refused"),
    [
        ({"corp.example": []}, "local.forward: corp.example: must name at least one address"),
        ({"corp.example": ["0.0.0.0"]}, "local.forward: corp.example: 0.0.0.0:53 is not a server's address"),
        ({"corp.example": ["224.0.0.251:5353"]}, "is not a server's address"),
        ({"corp.example": ["printer"]}, "local.forward: corp.example: "),
        (["corp.example=10.0.0.53"], "local.forward: must be a table of zone = \\[server addresses\\]"),
        ({"corp.example": ["10.0.0.53"], "Corp.Example.": ["10.0.0.54"]}, "local.forward: Corp.Example.: given twice"),
        ({"corp.example": ["127.0.0.1:5300"]}, "local.forward: corp.example: 127.0.0.1:5300 is this server's own"),
    ],
)
def test_a_bad_forward_is_refused_naming_the_key(forward, refused):
    with pytest.raises(ConfigError, match=refused):
        make_config(["127.0.0.1:9"], local={"forward": forward}, server={"listen": ["127.0.0.1:5300"]})


@pytest.mark.integration
def test_sighup_applies_a_change_of_zones_records_and_forwards_and_refuses_a_bad_one(lists):
    with ScriptedUpstream(script=Script(ttl=60)) as upstream, ScriptedUpstream(script=Script(ttl=60)) as corp:
        before = make_config([upstream.address], lists={"path": str(lists)})
        with ServerThread(before) as server:
            assert answer_addresses(server.ask("printer.office.example")) != ["10.1.2.3"]  # the upstream's
            assert server.ask("lab.corp.example").rcode() == dns.rcode.NOERROR
            assert server.ask(reverse("192.168.0.1"), "PTR").rcode() == dns.rcode.NXDOMAIN
            local = {
                "defaults": False,
                "records": ["printer.office.example A 10.1.2.3"],
                "forward": {"corp.example": [corp.address]},
            }
            after, applied, restart = reloaded(
                before, make_config([upstream.address], lists={"path": str(lists)}, local=local)
            )
            assert sorted(applied) == ["local.defaults", "local.forward", "local.records"] and restart == []
            server.call(server.worker.reload, after)
            assert answer_addresses(server.ask("printer.office.example")) == ["10.1.2.3"]  # cached before: no more
            assert server.ask(reverse("10.1.2.3"), "PTR").answer[0][0].to_text() == "printer.office.example."
            assert server.ask("lab.corp.example").rcode() == dns.rcode.NOERROR
            assert server.ask(reverse("192.168.0.1"), "PTR").rcode() == dns.rcode.NOERROR  # forwarded now
        assert [name.lower() for name in corp.names_seen()] == ["lab.corp.example"]
        assert reverse("192.168.0.1") in upstream.names_seen()
        # A bad zone in the file SIGHUP reads is refused, the running configuration kept (supervisor's reload).
        bad = dataclasses.replace(before, local=dataclasses.replace(before.local, not_served=("example.com",)))
        with pytest.raises(ConfigError, match=r"local\.not_served: example\.com is not a zone answered here"):
            reloaded(before, bad)


@pytest.mark.logs("local records: those of the admin API are not served with local.records")
def test_records_of_the_api_that_clash_with_the_configs_leave_the_configs_served(lists):
    config = make_config(
        ["127.0.0.1:9"], lists={"path": str(lists)}, local={"records": ["a.corp.example. CNAME b.corp.example."]}
    )
    with ServerThread(config) as server:
        resolver = server.worker.resolver
        server.call(resolver.use_shared_records, ("a.corp.example. A 10.0.0.1",))  # a CNAME beside an A
        answer = server.ask("a.corp.example")
        assert [rrset.rdtype for rrset in answer.answer] == [dns.rdatatype.CNAME]
        server.call(resolver.use_shared_records, ("c.corp.example. A 10.0.0.3",))
        assert answer_addresses(server.ask("c.corp.example")) == ["10.0.0.3"]
        assert [rrset.rdtype for rrset in server.ask("a.corp.example").answer] == [dns.rdatatype.CNAME]
