"""The listener edge on a real UDP socket: hostile bytes get the right rcode or silence, and never hurt it."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess

import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import answer_addresses

pytestmark = pytest.mark.integration


def exchange(port: int, data: bytes, timeout: float = 0.5) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def header(query_id: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, qd, an, ns, ar)


QUESTION = b"\x07example\x03com\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    "data",
    [b"", b"\x12", header()[:11], header(flags=0x8180) + QUESTION],
    ids=["empty", "one-byte", "eleven-bytes", "a-response"],
)
def test_silence(server, data):
    assert exchange(server.port, data) is None


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (header(qd=0), dns.rcode.FORMERR),
        (header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR),
        (header() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
        (header() + b"\x07exam", dns.rcode.FORMERR),
        (header(flags=0x2000) + QUESTION, dns.rcode.NOTIMP),
        (header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x30", dns.rcode.FORMERR),
    ],
    ids=["qdcount-0", "qdcount-2", "pointer-loop", "cut-name", "update", "lying-opt"],
)
def test_errors_get_their_rcode_and_the_id(server, data, rcode):
    answer = exchange(server.port, data)
    assert answer is not None and answer[:2] == data[:2]
    assert answer[2] & 0x80 and answer[3] & 0x0F == rcode


def test_badvers(server):
    query = dns.message.make_query("example.com", "A", use_edns=1)
    answer = dns.message.from_wire(exchange(server.port, query.to_wire()))
    assert answer.rcode() == dns.rcode.BADVERS and answer.edns == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=300))
def test_random_datagrams_never_break_the_server(server, data):
    reply = exchange(server.port, data, timeout=0.05)
    if reply is not None:
        assert reply[:2] == data[:2] and reply[2] & 0x80


def test_still_answers_after_a_storm_of_garbage(server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(2000):
            sock.sendto(os.urandom(40), ("127.0.0.1", server.port))
    assert answer_addresses(server.ask("still-alive.example"))


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig(server, transport):
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(server.port), transport, "+time=2", "+tries=1", "Dig.Example", "A"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "status: NOERROR" in result.stdout
    assert "Dig.Example.\t" in result.stdout and "192.0.2." in result.stdout


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig is not installed (Debian: knot-dnsutils)")
def test_kdig_with_edns_and_cookie(server):
    result = subprocess.run(
        ["kdig", "@127.0.0.1", "-p", str(server.port), "+cookie", "+nsid", "+time=2", "kdig.example", "AAAA"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "status: NOERROR" in result.stdout and "2001:db8::" in result.stdout
