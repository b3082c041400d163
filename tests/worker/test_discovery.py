"""Designated resolver discovery (RFC 9462, resolver/worker/discovery.py): `_dns.resolver.arpa` SVCB answered
here with this resolver's DoT and DoH endpoints, read back by dnspython and by kdig; NODATA for everything
else under resolver.arpa and for the question itself without DoT or DoH; none of it ever asked upstream."""

from __future__ import annotations

import shutil
import socket
import subprocess
from typing import Any

import dns.message
import dns.rcode
import dns.rdata
import dns.rdatatype
import pytest

from resolver.shared.config import parse_endpoint
from resolver.worker.discovery import designated_records
from tests.conftest import ServerThread, make_config
from tests.worker.test_pipeline import Pipeline, run

pytestmark = pytest.mark.unit
NAME = "dns.example.net"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate and key for NAME: a [tls] section needs them (they are not read here)."""
    directory = tmp_path_factory.mktemp("tls")
    chain, key = directory / "chain.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-days", "2", "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}"),
            *("-keyout", str(key), "-out", str(chain)),
        ],
        check=True,
        capture_output=True,
    )
    return str(chain), str(key)


def tls_section(certificate: tuple[str, str], dot: list[str], doh: list[str], **more: Any) -> dict[str, Any]:
    chain, key = certificate
    return {
        "dot_listen": dot,
        "doh_listen": doh,
        "certificate": chain,
        "key": key,
        "name": NAME,
        **more,
    }


def svcb(text: str) -> bytes:
    """The wire RDATA dnspython makes of an SVCB record in presentation form."""
    return dns.rdata.from_text("IN", "SVCB", text).to_wire()


def test_the_records_are_byte_for_byte_what_dnspython_makes_of_them(certificate):
    tls = make_config(
        ["127.0.0.1:9"],
        tls=tls_section(
            certificate,
            ["192.0.2.53:853", "[2001:db8::53]:853", "192.0.2.54:853"],
            ["0.0.0.0:8443", "[2001:db8::53]:8443"],  # every IPv4 address: no IPv4 hint
            doh_path="/q",
        ),
    ).tls
    assert designated_records(tls) == [
        svcb(f"1 {NAME}. alpn=dot port=853 ipv4hint=192.0.2.53,192.0.2.54 ipv6hint=2001:db8::53"),
        svcb(f'2 {NAME}. alpn="h2,http/1.1" port=8443 ipv6hint=2001:db8::53 dohpath="/q{{?dns}}"'),
    ]
    only_doh = make_config(["127.0.0.1:9"], tls=tls_section(certificate, [], ["[::]:443"])).tls
    assert designated_records(only_doh) == [svcb(f'1 {NAME}. alpn="h2,http/1.1" port=443 dohpath="/dns-query{{?dns}}"')]
    assert designated_records(make_config(["127.0.0.1:9"]).tls) == []


async def ask(pipeline: Pipeline, name: str, rdtype: str) -> dns.message.Message:
    return dns.message.from_wire(await pipeline.ask(dns.message.make_query(name, rdtype, use_edns=0).to_wire()))


def nodata(answer: dns.message.Message) -> bool:
    """NOERROR, no answer, resolver.arpa's SOA in the authority section (RFC 2308)."""
    soa = [rrset for rrset in answer.authority if rrset.rdtype == dns.rdatatype.SOA]
    return (
        answer.rcode() == dns.rcode.NOERROR
        and not answer.answer
        and len(soa) == 1
        and soa[0].name.to_text().lower() == "resolver.arpa."
    )


def test_the_designated_resolvers_are_answered_here_and_everything_else_there_is_nodata(lists, tmp_path, certificate):
    tls = tls_section(certificate, ["127.0.0.1:853"], ["127.0.0.1:443", "[::1]:443"])

    async def work(pipeline: Pipeline) -> None:
        answer = await ask(pipeline, "_DNS.Resolver.Arpa", "SVCB")  # the client's spelling is echoed
        assert answer.rcode() == dns.rcode.NOERROR and answer.question[0].name.to_text() == "_DNS.Resolver.Arpa."
        (records,) = answer.answer
        assert records.rdtype == dns.rdatatype.SVCB and records.ttl == 300
        assert sorted(record.to_text() for record in records) == [
            f'1 {NAME}. alpn="dot" port="853" ipv4hint="127.0.0.1"',
            f'2 {NAME}. alpn="h2,http/1.1" port="443" ipv4hint="127.0.0.1" ipv6hint="::1" dohpath="/dns-query{{?dns}}"',
        ]
        for name, rdtype in (
            ("_dns.resolver.arpa", "A"),
            ("_dns.resolver.arpa", "HTTPS"),
            ("resolver.arpa", "SVCB"),
            ("x._dns.resolver.arpa", "SVCB"),
            ("other.RESOLVER.arpa", "TXT"),
        ):
            assert nodata(await ask(pipeline, name, rdtype)), (name, rdtype)
        assert pipeline.forwarder.asked == []
        # Names that only end in the same letters, or hold `\008resolver` inside a label, are not under it.
        for outside in ("xresolver.arpa", "a\\008resolver.arpa"):
            assert (await ask(pipeline, outside, "TXT")).rcode() == dns.rcode.NOERROR
        assert pipeline.forwarder.asked == ["xresolver.arpa", "a\\008resolver.arpa"]

    run(lists, tmp_path, work, sections={"tls": tls})


def test_without_dot_or_doh_the_designated_resolvers_are_nodata_never_forwarded(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        assert nodata(await ask(pipeline, "_dns.resolver.arpa", "SVCB"))
        assert pipeline.forwarder.asked == []

    run(lists, tmp_path, work)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig is not installed (Debian: knot-dnsutils)")
def test_kdig_reads_the_designated_resolvers(upstream, certificate):
    dot, doh = parse_endpoint(f"127.0.0.1:{free_port()}"), parse_endpoint(f"127.0.0.1:{free_port()}")
    config = make_config([upstream.address], tls=tls_section(certificate, [str(dot)], [str(doh)]))
    with ServerThread(config) as server:
        shown = subprocess.run(
            ["kdig", "@127.0.0.1", "-p", str(server.port), "+time=2", "+short", "_dns.resolver.arpa", "SVCB"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    assert shown.returncode == 0, shown.stderr
    # kdig 3.2 knows dohpath (RFC 9461) by its number only; later ones by its name
    assert sorted(shown.stdout.replace("dohpath=", "key7=").splitlines()) == [
        f"1 {NAME}. alpn=dot port={dot.port} ipv4hint=127.0.0.1",
        f'2 {NAME}. alpn=h2,http/1.1 port={doh.port} ipv4hint=127.0.0.1 key7="/dns-query{{?dns}}"',
    ], shown.stdout
    assert upstream.names_seen() == []
