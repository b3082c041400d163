"""DoT and DoH through a real worker on loopback, with real clients (dnspython, kdig, curl, OpenSSL through Python's
ssl, h2 as a client), a test CA (tests/certificates.py) and, for client ids, a real Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx2
import hyperframe.frame
import pytest

from bench.upstream import Script, ScriptedUpstream
from resolver.shared import certificates
from resolver.shared.errors import StartupError
from resolver.shared.policy.service import PolicyService
from resolver.shared.sockets import bind_sockets, claim_ports
from tests.certificates import NAME, Authority, Pair
from tests.conftest import ServerThread, answer_addresses, eventually, make_config, redis_policy_store

pytestmark = pytest.mark.integration

H1, H2 = dns.query.HTTPVersion.H1, dns.query.HTTPVersion.H2


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def pair(authority: Authority) -> Pair:
    return authority.issue()


def tls(pair: Pair, **settings: Any) -> dict[str, Any]:
    return {
        "dot_listen": ["127.0.0.1:0"],
        "doh_listen": ["127.0.0.1:0"],
        "certificate": str(pair.certificate),
        "key": str(pair.key),
        "name": NAME,
        **settings,
    }


def serving(
    upstream: ScriptedUpstream, pair: Pair, lists: Path, tls_settings: dict[str, Any] | None = None, **sections: Any
) -> ServerThread:
    config = make_config(
        [upstream.address],
        lists={"path": str(lists)},
        policy={"block": ["pornography"]},
        tls={**tls(pair), **(tls_settings or {})},
        **sections,
    )
    return ServerThread(config)


def client_context(authority: Authority, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(authority.path))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def over_dot(server: ServerThread, authority: Authority, name: str, server_name: str = NAME, **kwargs: Any):
    query = dns.message.make_query(name, "A", use_edns=0)
    context = client_context(authority)
    if not server_name.endswith(NAME) or "_" in server_name:
        context.check_hostname = False  # a name the certificate does not hold: the server must still be asked
    return dns.query.tls(
        query, "127.0.0.1", port=server.dot_port, ssl_context=context, server_hostname=server_name, timeout=3, **kwargs
    )


def over_doh(
    server: ServerThread,
    authority: Authority,
    name: str,
    path: str = "/dns-query",
    post: bool = True,
    version: dns.query.HTTPVersion = H2,
    host: str = NAME,
):
    query = dns.message.make_query(name, "A", use_edns=0)
    return dns.query.https(
        query,
        f"https://{host}:{server.doh_port}{path}",
        bootstrap_address="127.0.0.1",
        verify=client_context(authority),
        post=post,
        http_version=version,
        timeout=3,
    )


def outcome(response: dns.message.Message) -> str:
    """ "ok", the EDE text of a blocked answer ("blocked: pornography", "paused"), or "refused"."""
    if response.rcode() == dns.rcode.REFUSED:
        return "refused"
    ede = [option for option in response.options if option.otype == dns.edns.OptionType.EDE]
    if response.rcode() == dns.rcode.NOERROR and not ede:
        return "ok"
    assert ede, f"rcode {dns.rcode.to_text(response.rcode())} without an EDE"
    return ede[0].text


def counters(server: ServerThread) -> dict[str, Any]:
    assert server.worker is not None
    return server.call(server.worker.encrypted)


@pytest.fixture
def server(upstream, pair, lists) -> Iterator[ServerThread]:
    with serving(upstream, pair, lists) as running:
        yield running


# --- sockets -----------------------------------------------------------------------------------------------------


def test_dot_and_doh_ports_are_bound_per_worker_and_a_port_another_process_serves_is_refused(pair, tmp_path):
    """As port 53's: one socket per worker on one port (SO_REUSEPORT), and a port another process serves (even
    one that shares) refused at start, naming the setting."""
    with socket.socket() as foreign:
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        taken = foreign.getsockname()[1]
        config = make_config(["127.0.0.1:9"], tls=tls(pair, doh_listen=[f"127.0.0.1:{taken}"]))
        refused = rf"cannot listen on 127\.0\.0\.1:{taken}: .*another process serves tcp.*another tls\.doh_listen"
        with pytest.raises(StartupError, match=refused):
            claim_ports(config, tmp_path)
    sets = bind_sockets(make_config(["127.0.0.1:9"], tls=tls(pair)), 2)
    try:
        assert [len(one.dot) for one in sets] == [1, 1] and [len(one.doh) for one in sets] == [1, 1]
        assert sets[0].dot[0].getsockname() == sets[1].dot[0].getsockname()
        assert sets[0].doh[0].getsockname() == sets[1].doh[0].getsockname()
    finally:
        for one in sets:
            one.close()


# --- real clients ----------------------------------------------------------------------------------------------


def test_dnspython_asks_over_dot_and_over_doh_get_and_post_on_http2_and_http11(server, authority):
    assert answer_addresses(over_dot(server, authority, "example.com"))
    assert outcome(over_dot(server, authority, "porn.example")) == "blocked: pornography"  # the one decision
    for version in (H1, H2):
        for post in (True, False):
            assert answer_addresses(over_doh(server, authority, "example.com", post=post, version=version))
            assert outcome(over_doh(server, authority, "www.porn.example", post=post, version=version)) == (
                "blocked: pornography"
            )
    assert counters(server)["handshakes"] == {"dot": 2, "doh": 8}


KDIG = pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig is not installed (Debian: knot-dnsutils)")
CURL = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (Debian: curl)")


@KDIG
def test_kdig_over_tls_and_https(server, authority):
    common = ["kdig", "@127.0.0.1", f"+tls-ca={authority.path}", f"+tls-hostname={NAME}", "+timeout=3"]
    for transport in (["-p", str(server.dot_port), "+tls"], ["-p", str(server.doh_port), "+https"]):
        for name, expected in (("example.com", "status: NOERROR"), ("porn.example", "status: NXDOMAIN")):
            done = subprocess.run([*common, *transport, name], capture_output=True, text=True, timeout=20)
            assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr
    https = subprocess.run(
        [*common, "-p", str(server.doh_port), "+https-get", "example.com"], capture_output=True, text=True, timeout=20
    )
    assert "HTTP/2-GET" in https.stdout and "status: 200" in https.stdout, https.stdout + https.stderr


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"reached through bns\n")

    def log_message(self, *args: object) -> None:
        pass


@CURL
def test_curl_resolves_through_doh(pair, lists, authority):
    """curl --doh-url: a name bns answers with a loopback address is reached; a blocked one is not resolved."""
    page = http.server.HTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    port = page.server_address[1]
    script = Script(ttl=300, addresses={"site.test.example": "127.0.0.1"})
    try:
        with ScriptedUpstream(script=script) as upstream, serving(upstream, pair, lists) as server:
            doh = f"https://{NAME}:{server.doh_port}/dns-query"

            def curl(name: str) -> subprocess.CompletedProcess[str]:
                command = ["curl", "-s", "--max-time", "5", "--cacert", str(authority.path), "--doh-url", doh]
                command += ["--resolve", f"{NAME}:{server.doh_port}:127.0.0.1", f"http://{name}:{port}/"]
                return subprocess.run(command, capture_output=True, text=True, timeout=20)

            reached = curl("site.test.example")
            assert reached.returncode == 0 and reached.stdout == "reached through bns\n", reached.stderr
            assert curl("porn.example").returncode == 6  # CURLE_COULDNT_RESOLVE_HOST: bns said NXDOMAIN
            assert counters(server)["doh_statuses"]["200"] >= 2
    finally:
        page.shutdown()


def test_the_answer_is_cacheable_privately_for_its_smallest_ttl_and_the_rest_gets_http_statuses(
    server, upstream, authority
):
    upstream.script.modes["gone.example"] = "nxdomain"
    wire = dns.message.make_query("example.com", "A").to_wire()
    encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
    base = f"https://127.0.0.1:{server.doh_port}"
    for http2 in (False, True):
        with httpx2.Client(verify=client_context(authority), http2=http2, http1=not http2) as client:
            answer = client.get(f"{base}/dns-query?dns={encoded}")
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/dns-message"
            ttl = dns.message.from_wire(answer.content).answer[0].ttl
            # private: an answer is the asking device's policy's; a shared cache must not give it to another
            assert answer.headers["cache-control"] == f"private, max-age={ttl}" and 0 < ttl <= 300
            gone = base64.urlsafe_b64encode(dns.message.make_query("gone.example", "A").to_wire()).rstrip(b"=")
            negative = client.get(f"{base}/dns-query?dns={gone.decode()}")  # its SOA: TTL 300, MINIMUM 60
            assert dns.message.from_wire(negative.content).rcode() == dns.rcode.NXDOMAIN
            assert 0 < int(negative.headers["cache-control"].removeprefix("private, max-age=")) <= 60  # RFC 8484 §5.1
            dns_message = {"content-type": "application/dns-message"}
            statuses = [
                client.get(f"{base}/dns-query?dns=not*base64").status_code,
                client.get(f"{base}/dns-query?other=1").status_code,
                client.post(f"{base}/dns-query", content=b"\x00\x01", headers=dns_message).status_code,
                client.get(f"{base}/elsewhere?dns={encoded}").status_code,
                client.put(f"{base}/dns-query", content=wire, headers=dns_message).status_code,
                client.post(f"{base}/dns-query", content=b"x" * 5000, headers=dns_message).status_code,
                client.get(f"{base}/dns-query?dns={'A' * 6000}").status_code,
                client.post(f"{base}/dns-query", content=wire, headers={"content-type": "text/plain"}).status_code,
                client.post(f"{base}/dns-query", content=wire, headers=dns_message).status_code,
            ]
            assert statuses == [400, 400, 400, 404, 405, 413, 413, 415, 200], f"http2={http2}"
    assert counters(server)["doh_statuses"] == {"200": 6, "400": 6, "404": 2, "405": 2, "413": 4, "415": 2}


def dot_exchange(server: ServerThread, authority: Authority, wire: bytes) -> bytes:
    """The answer's bytes, as sent, to one DoT query."""
    raw = socket.create_connection(("127.0.0.1", server.dot_port), timeout=3)
    with client_context(authority).wrap_socket(raw, server_hostname=NAME) as sock:
        sock.sendall(len(wire).to_bytes(2, "big") + wire)
        received = b""
        while len(received) < 2 or len(received) < 2 + int.from_bytes(received[:2], "big"):
            data = sock.recv(65536)
            assert data, "closed before the answer"
            received += data
        return received[2:]


def padding_of(message: dns.message.Message) -> list[dns.edns.Option]:
    return [option for option in message.options if option.otype == dns.edns.OptionType.PADDING]


def test_answers_are_padded_on_dot_and_doh_when_the_query_pads_and_never_on_port_53(server, authority):
    """RFC 8467 §4.1: to a multiple of 468 bytes, cached, forwarded and blocked answers alike."""
    base = f"https://127.0.0.1:{server.doh_port}/dns-query"
    dns_message = {"content-type": "application/dns-message"}
    with httpx2.Client(verify=client_context(authority), http2=True) as client:
        for name in ("example.com", "example.com", "porn.example"):  # forwarded, cached, blocked
            wire = dns.message.make_query(name, "A", use_edns=0, pad=128).to_wire()
            for answer in (
                dot_exchange(server, authority, wire),
                client.post(base, content=wire, headers=dns_message).content,
            ):
                assert len(answer) % 468 == 0, (name, len(answer))
                response = dns.message.from_wire(answer)
                assert padding_of(response) and str(response.question[0].name) == f"{name}."
            plain = dns.message.make_query(name, "A", use_edns=0).to_wire()
            for answer in (
                dot_exchange(server, authority, plain),
                client.post(base, content=plain, headers=dns_message).content,
            ):
                assert not padding_of(dns.message.from_wire(answer))  # a query that does not pad: no padding
    for tcp in (False, True):  # port 53: padding would hide nothing, and cost bytes
        assert not padding_of(server.ask("example.com", tcp=tcp, use_edns=0, pad=128))


def test_tls_sessions_resume_and_versions_before_tls_1_2_are_refused(server, authority):
    context = client_context(authority, ("dot",))

    def connect(session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", server.dot_port), timeout=3)
        return context.wrap_socket(raw, server_hostname=NAME, session=session)

    first = connect()
    assert first.selected_alpn_protocol() == "dot"
    dns.query.tls(
        dns.message.make_query("example.com", "A"), "127.0.0.1", sock=first, timeout=3
    )  # TLS 1.3: tickets follow
    session = first.session
    first.close()
    resumed = connect(session)
    assert resumed.session_reused
    resumed.close()
    old = client_context(authority)
    with warnings.catch_warnings(category=DeprecationWarning, action="ignore"):
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        old.wrap_socket(socket.create_connection(("127.0.0.1", server.dot_port), timeout=3), server_hostname=NAME)


# --- bounds ----------------------------------------------------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed `sock` (it sends nothing first); fails after `seconds`."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    except TimeoutError:
        raise AssertionError(f"not closed within {seconds} s") from None
    return time.monotonic() - started


def test_a_slow_handshake_and_a_silent_connection_are_cut_off_and_others_are_answered(upstream, pair, lists, authority):
    with serving(upstream, pair, lists, {"handshake_timeout": 0.5, "idle_timeout": 0.5}) as server:
        silent = socket.create_connection(("127.0.0.1", server.dot_port))  # never says hello
        trickle = socket.create_connection(("127.0.0.1", server.doh_port))
        trickle.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes, and no more
        idle = client_context(authority).wrap_socket(
            socket.create_connection(("127.0.0.1", server.dot_port)), server_hostname=NAME
        )
        for _ in range(3):
            assert answer_addresses(over_dot(server, authority, "example.com"))
            assert answer_addresses(over_doh(server, authority, "example.com"))
        assert closed_within(silent, 3) < 2.5 and closed_within(trickle, 3) < 2.5 and closed_within(idle, 3) < 2.5
        eventually(lambda: counters(server)["cut"]["handshake_timeout"] == 2, 2)
        assert counters(server)["cut"]["idle"] == 1
        eventually(lambda: counters(server)["open"] == 0, 2)  # the idle one's client never closes: cut at 0.5 s


def h2_connection(server: ServerThread, authority: Authority) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    raw = socket.create_connection(("127.0.0.1", server.doh_port), timeout=3)
    sock = client_context(authority, ("h2",)).wrap_socket(raw, server_hostname=NAME)
    assert sock.selected_alpn_protocol() == "h2"
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    return sock, connection


def until_goaway(sock: ssl.SSLSocket, connection: h2.connection.H2Connection) -> h2.events.ConnectionTerminated:
    """Read until the server says GOAWAY (and the connection closes)."""
    sock.settimeout(3)
    while True:
        data = sock.recv(65536)
        assert data, "closed without GOAWAY"
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                return event


def get_headers(server: ServerThread, name: str) -> list[tuple[str, str]]:
    encoded = base64.urlsafe_b64encode(dns.message.make_query(name, "A").to_wire()).rstrip(b"=").decode()
    return [(":method", "GET"), (":scheme", "https"), (":authority", NAME), (":path", f"/dns-query?dns={encoded}")]


def test_http2_stream_reset_and_ping_floods_are_cut_off_and_others_are_answered(pair, lists, authority):
    # Upstream never answers: every stream stays open until reset, as in the "rapid reset" attack.
    with (
        ScriptedUpstream(script=Script(mode="drop")) as upstream,
        serving(upstream, pair, lists, {"max_streams": 4}) as server,
    ):
        sock, many = h2_connection(server, authority)  # more streams than the 4 allowed, before the settings arrive
        for stream in range(1, 12, 2):
            many.send_headers(stream, get_headers(server, f"n{stream}.example"), end_stream=True)
        sock.sendall(many.data_to_send())
        assert until_reset(sock, many) == {
            9: h2.errors.ErrorCodes.REFUSED_STREAM,
            11: h2.errors.ErrorCodes.REFUSED_STREAM,
        }
        sock.close()  # those two refused (RFC 9113 §5.1.2), not the connection

        sock, resets = h2_connection(server, authority)
        for stream in range(1, 41, 2):  # each request given up before its answer
            resets.send_headers(stream, get_headers(server, f"r{stream}.example"), end_stream=True)
            resets.reset_stream(stream)
        sock.sendall(resets.data_to_send())
        assert until_goaway(sock, resets).error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

        sock, pings = h2_connection(server, authority)
        for index in range(150):
            pings.ping(index.to_bytes(8, "big"))
        sock.sendall(pings.data_to_send())
        assert until_goaway(sock, pings).error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

        sock, large = h2_connection(server, authority)
        large.send_headers(1, [*get_headers(server, "example.com"), ("x-padding", "x" * 20_000)], end_stream=True)
        sock.sendall(large.data_to_send())
        until_goaway(sock, large)  # a header list beyond 16 KiB
        assert outcome(over_doh(server, authority, "porn.example")) == "blocked: pornography"
        cut = counters(server)["cut"]
        assert (cut["streams"], cut["flood"], cut["protocol"]) == (2, 2, 1)


def until_reset(sock: ssl.SSLSocket, connection: h2.connection.H2Connection, count: int = 2) -> dict[int, int]:
    """Read until `count` streams are reset by the server: their error codes by stream (no GOAWAY meanwhile)."""
    sock.settimeout(3)
    reset: dict[int, int] = {}
    while len(reset) < count:
        data = sock.recv(65536)
        assert data, "closed"
        for event in connection.receive_data(data):
            assert not isinstance(event, h2.events.ConnectionTerminated), event
            if isinstance(event, h2.events.StreamReset):
                reset[event.stream_id] = event.error_code
        sock.sendall(connection.data_to_send())
    return reset


def test_http2_requests_h2_would_call_malformed_get_a_4xx_and_the_connection_goes_on(server, authority):
    """h2 does not check a client's headers (doh.py: they cost a fifth of DoH's time); `head` holds the four it
    reads to what DoH allows. Malformed requests each get a status, and a good one after them its answer."""
    raw = socket.create_connection(("127.0.0.1", server.doh_port), timeout=3)
    sock = client_context(authority, ("h2",)).wrap_socket(raw, server_hostname=NAME)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False)
    )
    client.initiate_connection()
    query = dns.message.make_query("example.com", "A").to_wire()
    good = get_headers(server, "n0.porn.example")
    post = [(":method", "POST"), (":scheme", "https"), (":authority", NAME), (":path", "/dns-query")]
    requests: dict[int, tuple[list[tuple[str, str]], int]] = {
        1: ([*post, ("Content-Type", "application/dns-message")], 415),  # uppercase: a name h2 would refuse
        3: ([(":scheme", "https"), (":authority", NAME), (":path", "/dns-query")], 405),  # no :method
        5: ([(":method", "GET"), (":scheme", "https"), (":authority", NAME)], 404),  # no :path
        7: ([*good, ("connection", "close"), ("x-bad", "a\r\nb\x00c")], 200),  # connection-specific, bytes h2 refuses
        9: ([(":path", "/elsewhere"), *good], 200),  # :path twice: the last stands
        11: ([*post, (":path", "/dns-query/Not An Id"), ("content-type", "application/dns-message")], 200),
        13: (good, 200),
    }
    for stream, (headers, _status) in requests.items():
        client.send_headers(stream, headers, end_stream=headers[0][1] != "POST" or stream == 1)
        if headers[0][1] == "POST" and stream != 1:
            client.send_data(stream, query, end_stream=True)
    sock.sendall(client.data_to_send())
    statuses: dict[int, int] = {}
    while len(statuses) < len(requests):
        data = sock.recv(65536)
        assert data, f"closed after {statuses}"
        for event in client.receive_data(data):
            assert not isinstance(event, h2.events.ConnectionTerminated | h2.events.StreamReset), event
            if isinstance(event, h2.events.ResponseReceived):
                statuses[event.stream_id] = int(dict(event.headers)[b":status"])
        sock.sendall(client.data_to_send())
    assert statuses == {stream: status for stream, (_headers, status) in requests.items()}
    assert counters(server)["cut"]["protocol"] == 0
    sock.close()


def test_http2_priority_in_headers_spends_no_control_frame_budget(server, authority):
    """A browser gives each request a priority in its HEADERS frame: 300 requests are not 300 PRIORITY frames."""
    sock, client = h2_connection(server, authority)
    sock.settimeout(3)
    for stream in range(1, 601, 2):
        headers = get_headers(server, f"n{stream}.porn.example")
        client.send_headers(stream, headers, end_stream=True, priority_weight=220, priority_depends_on=0)
        sock.sendall(client.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            assert data, f"closed at stream {stream}"
            for event in client.receive_data(data):
                assert not isinstance(event, h2.events.ConnectionTerminated), f"GOAWAY at stream {stream}"
                ended = ended or (isinstance(event, h2.events.StreamEnded) and event.stream_id == stream)
            sock.sendall(client.data_to_send())
    assert counters(server)["cut"]["flood"] == 0
    sock.close()


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """Write `data` from another thread, so the test can read answers meanwhile (the server stops reading while
    the client does not read: a client writing all first and reading after would wait on itself). Not while this
    thread reads the same TLS socket: OpenSSL takes no read and write of one connection at once (a read then
    sees a false end); `MemoryTls` encrypts first, so that the thread writes plain bytes."""

    def send() -> None:
        with contextlib.suppress(OSError):  # cut off: the test's reading says so
            sock.sendall(data)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


class MemoryTls:
    """A TLS client connection whose records are made and read in memory, over a plain socket: what it sends can
    be encrypted at once and written by another thread while this one reads. Unless `finish`, the handshake is
    left to the test, which may send its last flight (`pending`) when and with what it likes."""

    def __init__(self, port: int, authority: Authority, alpn: str, finish: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.incoming, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(authority, (alpn,)).wrap_bio(self.incoming, self._out, server_hostname=NAME)
        if finish:
            self.handshake()
            self.sock.sendall(self.pending())
            assert self.tls.selected_alpn_protocol() == alpn

    def handshake(self) -> None:
        """Until the server's last flight is read (the client's own last one is then `pending`)."""
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                self.incoming.write(self.sock.recv(1 << 16))

    def pending(self) -> bytes:
        """What the client has made and not sent yet."""
        return self._out.read()

    def encrypted(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self._out.read()

    def recv(self) -> bytes:
        """What the server sent next (b"": it closed, with close_notify or without)."""
        while True:
            try:
                return self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                try:
                    data = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    return b""
                if not data:
                    return b""
                self.incoming.write(data)
            except ssl.SSLZeroReturnError:
                return b""


def test_thousands_of_http11_requests_pipelined_in_one_write_are_all_answered_in_order(server, authority):
    """Blocked answers are given at once; each must not take a stack frame (3000 would pass Python's limit)."""
    count = 3000
    requests = b"".join(
        b"GET /dns-query?dns=%s HTTP/1.1\r\nhost: %s\r\n\r\n"
        % (
            base64.urlsafe_b64encode(dns.message.make_query(f"n{index}.porn.example", "A").to_wire()).rstrip(b"="),
            NAME.encode(),
        )
        for index in range(count)
    )
    client = MemoryTls(server.doh_port, authority, "http/1.1")
    sender = send_in_background(client.sock, client.encrypted(requests))
    received = bytearray()
    while received.count(b"HTTP/1.1 200 ") < count:
        data = client.recv()
        assert data, f"closed after {received.count(b'HTTP/1.1 200 ')} answers"
        received += data
    sender.join(5)
    bodies = [
        dns.message.from_wire(bytes(received[start + 4 : start + 4 + int(length)]))
        for length, start in _bodies(received)
    ]
    assert [str(body.question[0].name) for body in bodies] == [f"n{index}.porn.example." for index in range(count)]
    client.sock.close()


def _bodies(received: bytes) -> Iterator[tuple[bytes, int]]:
    """(content-length, where its head ends) of each HTTP/1.1 response in `received`."""
    position = 0
    while (end := received.find(b"\r\n\r\n", position)) != -1:
        head = bytes(received[position:end]).lower()
        length = head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]
        yield length, end
        position = end + 4 + int(length)


def test_a_dot_client_that_never_reads_holds_at_most_64_kib_of_answers(server, authority):
    """Its queries, pipelined (blocked names: answered at once), stop being read and answered once 64 KiB of answers
    wait for it; those already read wait as queries."""
    wire = dns.message.make_query("porn.example", "A", use_edns=0).to_wire()
    client = MemoryTls(server.dot_port, authority, "dot")
    sender = send_in_background(client.sock, client.encrypted((len(wire).to_bytes(2, "big") + wire) * 200_000))
    assert server.worker is not None and server.worker.gate is not None
    gate = server.worker.gate

    def held() -> tuple[int, int]:
        (connection,) = gate.open
        return connection._transport.get_write_buffer_size(), len(connection._buffer)

    def settled() -> bool:
        before = server.call(held)
        time.sleep(0.3)
        return sender.is_alive() and server.call(held) == before

    eventually(settled, 10)
    answers, queries = server.call(held)
    assert answers <= 65536 + 512, answers  # the limit, and the answer that crossed it
    assert queries > 0  # read, not answered: they wait for the client to read
    client.sock.close()
    sender.join(5)


def test_http2_answers_waiting_for_a_window_refuse_new_streams_past_64_kib_and_go_once_it_opens(
    upstream, pair, lists, authority
):
    """A client that opens no window gets no request answered past 64 KiB of answers it holds back: later streams are
    refused (REFUSED_STREAM: it may ask again), and its reading goes on, so the window it opens lets them go."""
    with serving(upstream, pair, lists, {"max_streams": 200}) as server:
        sock, client = h2_connection(server, authority)
        assert client.remote_settings.initial_window_size == 65535  # before the server's SETTINGS
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sock.sendall(client.data_to_send())
        streams = list(range(1, 321, 2))  # 160 padded answers of 468 bytes: 73 KiB
        for stream in streams:
            wire = dns.message.make_query(f"n{stream}.porn.example", "A", use_edns=0, pad=128).to_wire()
            encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
            headers = [(":method", "GET"), (":scheme", "https"), (":authority", NAME)]
            client.send_headers(stream, [*headers, (":path", f"/dns-query?dns={encoded}")], end_stream=True)
        sock.sendall(client.data_to_send())
        refused: set[int] = set()
        headed: set[int] = set()
        ended: set[int] = set()
        answered: dict[int, bytes] = {}
        opened = False
        sock.settimeout(3)
        while len(refused) + len(ended) < len(streams):
            data = sock.recv(65536)
            assert data, "closed"
            for event in client.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    assert client.remote_settings.initial_window_size == 16384  # a body's, not 64 KiB
                elif isinstance(event, h2.events.StreamReset):
                    assert event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    refused.add(event.stream_id)
                elif isinstance(event, h2.events.ResponseReceived):
                    headed.add(event.stream_id)
                elif isinstance(event, h2.events.DataReceived):
                    answered[event.stream_id] = answered.get(event.stream_id, b"") + event.data
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            if len(refused) + len(headed) == len(streams) and not opened:  # each answered or refused: open it
                assert not answered  # nothing could go before
                client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
                opened = True
            sock.sendall(client.data_to_send())
        assert 10 <= len(refused) <= 25 and refused == set(streams[-len(refused) :])
        assert all(len(body) == 468 for body in answered.values())
        assert counters(server)["cut"]["streams"] == len(refused)
        sock.close()


def test_an_http2_connection_draining_still_reads_the_window_its_answers_in_flight_need(server, authority):
    """The worker drains while an answer waits for its window: the WINDOW_UPDATE the client sends after is read, the
    answer goes, then GOAWAY and the close; a stream opened meanwhile is refused."""
    sock, client = h2_connection(server, authority)
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.send_headers(1, get_headers(server, "porn.example"), end_stream=True)
    sock.sendall(client.data_to_send())
    sock.settimeout(3)
    headed = False
    while not headed:
        data = sock.recv(65536)
        assert data, "closed"
        headed = any(isinstance(event, h2.events.ResponseReceived) for event in client.receive_data(data))
    assert server.worker is not None and server.worker.gate is not None
    (connection,) = server.worker.gate.open
    server.call(connection.drain)
    client.send_headers(3, get_headers(server, "example.com"), end_stream=True)  # after the drain: refused
    sock.sendall(client.data_to_send())
    time.sleep(0.2)  # read apart: the connection is draining when the window comes
    client.increment_flow_control_window(65535, stream_id=1)
    sock.sendall(client.data_to_send())
    body, refused, goaway = b"", [], None
    while True:
        data = sock.recv(65536)
        if not data:
            break
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, h2.events.StreamReset):
                refused.append((event.stream_id, event.error_code))
            elif isinstance(event, h2.events.ConnectionTerminated):
                goaway = event
    answer = dns.message.from_wire(body)
    assert answer.rcode() == dns.rcode.NXDOMAIN and str(answer.question[0].name) == "porn.example."  # blocked
    assert refused == [(3, h2.errors.ErrorCodes.REFUSED_STREAM)]
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    sock.close()


def test_an_http2_header_block_continued_without_end_is_cut_off_past_32_kib(server, authority):
    """CONTINUATION frames that never end the header block (CVE-2024-27316's kind): the connection goes once
    the block passes what a header list may be (16 KiB) by a frame, long before h2's own bound (64 frames)."""
    sock, _ = h2_connection(server, authority)
    sock.sendall(hyperframe.frame.HeadersFrame(1, data=b"\x82" * 1000).serialize())  # no END_HEADERS
    continuation = hyperframe.frame.ContinuationFrame(1, data=b"\x82" * 16_000).serialize()
    with contextlib.suppress(OSError):
        for _ in range(60):  # under h2's 64: h2 alone would wait for more
            sock.sendall(continuation)
            time.sleep(0.01)
    closed_within(sock, 3)
    assert counters(server)["cut"]["flood"] == 1


def test_connections_are_bounded_per_source_and_per_worker_and_the_idlest_makes_room(upstream, pair, lists, authority):
    settings = {"max_per_client": 2, "max_connections": 3}
    with serving(upstream, pair, lists, settings) as server:
        context = client_context(authority)

        def connect(source: str) -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", server.dot_port), timeout=3, source_address=(source, 0))
            return context.wrap_socket(raw, server_hostname=NAME)

        first, second = connect("127.0.0.2"), connect("127.0.0.2")
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            connect("127.0.0.2")  # a third from the same source: closed at once
        third = connect("127.0.0.3")
        dns.query.tls(dns.message.make_query("example.com", "A"), "127.0.0.1", sock=second, timeout=3)
        dns.query.tls(dns.message.make_query("example.com", "A"), "127.0.0.1", sock=third, timeout=3)
        fourth = connect("127.0.0.4")  # at the worker's cap: the longest idle (first) goes
        assert closed_within(first, 3) < 1
        dns.query.tls(dns.message.make_query("example.com", "A"), "127.0.0.1", sock=fourth, timeout=3)
        cut = counters(server)["cut"]
        assert (cut["client_full"], cut["evicted"], cut["worker_full"]) == (1, 1, 0)
        for sock in (second, third, fourth):
            sock.close()


# --- client ids and access -------------------------------------------------------------------------------------

# Client ids as the API makes them (26 base32 letters): only such an id admits a source outside server.allow.
PHONE_ID, LAPTOP_ID = "phoneqqqqqqqqqqqqqqqqqqqqq", "laptopqqqqqqqqqqqqqqqqqqqq"
HOME = {"networks": ["127.0.0.0/8"], "paused_until": "forever"}  # every loopback client but a client id's: paused
ROAMING = {
    "networks": ["198.51.100.0/24"],
    "mode": "device",
    "devices": {
        "phone": {"client_ids": [PHONE_ID], "paused_until": "forever"},
        "laptop": {"client_ids": [LAPTOP_ID], "policy": {"block": []}},
    },
}


def write_sites(redis_url: str, prefix: str, sites: dict[str, dict[str, Any]]) -> None:
    async def run() -> None:
        store = redis_policy_store(redis_url, prefix)
        try:
            for site_id, document in sites.items():
                await PolicyService(store).put_site(site_id, document)
        finally:
            await store.close()

    asyncio.run(run())


def with_store(shared_redis, redis_prefix) -> dict[str, Any]:
    return {"store": {"redis": shared_redis.url, "prefix": redis_prefix}}


def handed_over(server: ServerThread, path: Path) -> list[dict[str, Any]]:
    """The device activity the worker hands to the admin process (worker/activity.py)."""
    assert server.worker is not None
    tally = server.worker.resolver.tally
    server.call(tally.collect)
    assert server.call(tally.hand_over, path)
    return json.loads(path.read_bytes())["devices"]


def test_a_client_id_in_the_server_name_or_the_path_selects_its_device_fleet_wide(
    upstream, pair, lists, authority, shared_redis, redis_prefix, tmp_path
):
    write_sites(shared_redis.url, redis_prefix, {"home": HOME, "smith": ROAMING})
    with serving(upstream, pair, lists, **with_store(shared_redis, redis_prefix)) as server:
        assert outcome(over_dot(server, authority, "example.com")) == "paused"  # no id: its address's site
        assert outcome(over_doh(server, authority, "example.com")) == "paused"
        # the phone, paused, wherever it asks from and however it gives its id
        assert outcome(over_dot(server, authority, "example.com", f"{PHONE_ID}.{NAME}")) == "paused"
        assert outcome(over_doh(server, authority, "example.com", f"/dns-query/{PHONE_ID}")) == "paused"
        assert outcome(over_doh(server, authority, "example.com", host=f"{PHONE_ID}.{NAME}")) == "paused"
        # the laptop: its own policy, which blocks nothing; the path's id wins over the server name's
        assert outcome(over_dot(server, authority, "porn.example", f"{LAPTOP_ID}.{NAME}")) == "ok"
        assert outcome(over_doh(server, authority, "porn.example", f"/dns-query/{LAPTOP_ID}", post=False)) == "ok"
        assert (
            outcome(over_doh(server, authority, "porn.example", f"/dns-query/{LAPTOP_ID}", host=f"{PHONE_ID}.{NAME}"))
            == "ok"
        )
        # an unknown or malformed id is as good as none: its address's site, paused, never a looser policy (a
        # child whose tablet is paused must not escape by making an id up)
        for unknown in (
            over_dot(server, authority, "porn.example", f"nobody.{NAME}"),
            over_doh(server, authority, "porn.example", "/dns-query/nobody"),
            over_doh(server, authority, "porn.example", "/dns-query/no%20body"),
            over_dot(server, authority, "porn.example", f"bad_id.{NAME}"),
        ):
            assert outcome(unknown) == "paused"
        ids = counters(server)["client_ids"]
        assert (ids["known"], ids["unknown"], ids["malformed"]) == (2, 1, 2)
        # the devices found by their ids are filed under their own keys: the id, a credential, is written nowhere
        seen = handed_over(server, tmp_path / "activity.json")
        assert {("smith", "device:phone"), ("smith", "device:laptop"), ("home", "ip:127.0.0.1")} <= {
            (entry["site"], entry["key"]) for entry in seen
        }
        assert PHONE_ID not in json.dumps(seen) and LAPTOP_ID not in json.dumps(seen)


def test_a_known_client_id_is_answered_from_outside_server_allow_and_nothing_else_is(
    upstream, pair, lists, authority, shared_redis, redis_prefix
):
    write_sites(shared_redis.url, redis_prefix, {"smith": ROAMING})
    strangers = {**with_store(shared_redis, redis_prefix), "server": {"allow": ["10.0.0.0/8"]}}
    with serving(upstream, pair, lists, **strangers) as server:
        assert server.ask("example.com").rcode() == dns.rcode.REFUSED  # port 53: loopback is outside allow
        assert outcome(over_dot(server, authority, "example.com")) == "refused"
        assert outcome(over_doh(server, authority, "example.com")) == "refused"
        assert outcome(over_dot(server, authority, "porn.example", f"{LAPTOP_ID}.{NAME}")) == "ok"
        assert outcome(over_doh(server, authority, "porn.example", f"/dns-query/{LAPTOP_ID}")) == "ok"
        assert outcome(over_doh(server, authority, "example.com", f"/dns-query/{PHONE_ID}")) == "paused"
        assert outcome(over_dot(server, authority, "example.com", f"nobody.{NAME}")) == "refused"
        assert outcome(over_doh(server, authority, "example.com", "/dns-query/nobody")) == "refused"
        assert outcome(over_doh(server, authority, "example.com", "/dns-query/bad%id")) == "refused"
        unmade = "q" * 26  # of the API's form, but no device's: the store is asked, once
        assert outcome(over_doh(server, authority, "example.com", f"/dns-query/{unmade}")) == "refused"
        assert outcome(over_dot(server, authority, "example.com", f"{unmade}.{NAME}")) == "refused"
        assert server.call(lambda: server.worker.shed()["refused_source"]) == 8
        assert counters(server)["client_ids"]["unknown"] == 1


# --- certificates ------------------------------------------------------------------------------------------------


def serial_of(sock: ssl.SSLSocket) -> str:
    certificate = sock.getpeercert()
    assert certificate
    return str(certificate["serialNumber"])


@pytest.mark.logs("the new TLS certificate pair is refused")
def test_certificate_files_replaced_under_load_lose_no_query(upstream, lists, authority, tmp_path, monkeypatch):
    """One client keeps querying on a connection it keeps open, another opens a new DoT and DoH connection per
    query, while the files are replaced: none fails, new connections get the new certificate, the open one keeps
    its own; a bad pair then is refused and the good one goes on."""
    monkeypatch.setattr(certificates, "CHECK_INTERVAL", 0.05)
    live = authority.issue("live")
    with serving(upstream, live, lists) as server:
        context = client_context(authority)
        kept = context.wrap_socket(socket.create_connection(("127.0.0.1", server.dot_port)), server_hostname=NAME)
        first = serial_of(kept)
        failures: list[BaseException] = []
        served: dict[str, int] = {}
        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                try:
                    dns.query.tls(dns.message.make_query("example.com", "A"), "127.0.0.1", sock=kept, timeout=3)
                    served["kept"] = served.get("kept", 0) + 1
                except BaseException as failure:  # every failure is the test's business
                    failures.append(failure)

        def connect_anew() -> None:
            while not stop.is_set():
                try:
                    sock = context.wrap_socket(
                        socket.create_connection(("127.0.0.1", server.dot_port)), server_hostname=NAME
                    )
                    with sock:
                        dns.query.tls(dns.message.make_query("example.com", "A"), "127.0.0.1", sock=sock, timeout=3)
                        serial = serial_of(sock)
                    served[serial] = served.get(serial, 0) + 1
                    assert answer_addresses(over_doh(server, authority, "example.com"))
                except BaseException as failure:  # every failure is the test's business
                    failures.append(failure)

        threads = [threading.Thread(target=keep_asking), threading.Thread(target=connect_anew)]
        for thread in threads:
            thread.start()
        try:
            eventually(lambda: served.get(first, 0) >= 5, 5)
            second = authority.issue("second")
            os.replace(second.certificate, live.certificate)
            os.replace(second.key, live.key)
            eventually(lambda: len(served) >= 3 and min(served.values()) >= 5, 10)  # kept, first, second
            kept_before = served["kept"]
            os.replace(authority.issue("stray").key, live.key)  # a key of another certificate
            eventually(lambda: counters(server)["certificate_reloads"]["refused"] == 1, 5)
            eventually(lambda: served["kept"] >= kept_before + 5, 5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        assert failures == []
        assert serial_of(kept) == first and len(served) == 3  # no fourth certificate: the stray pair was refused
        assert counters(server)["certificate_reloads"] == {"loaded": 1, "refused": 1}
        kept.close()
