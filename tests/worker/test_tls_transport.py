"""The TLS layer of DoT and DoH (tls_transport.py) on a real loopback socket, with a client whose records are made
in memory (so that a test decides which records share a segment): the handshake's outcomes, a query in the
segment that ends the handshake, reading paused with records waiting, close_notify both ways, and a record that
does not decrypt."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from resolver.shared.certificates import server_context
from resolver.worker.tls_transport import TlsTransport
from tests.certificates import Authority, Pair
from tests.conftest import eventually
from tests.worker.test_encrypted import MemoryTls

pytestmark = pytest.mark.integration


class Opener:
    def __init__(self, admit: bool = True, close_at_once: bool = False) -> None:
        self.admit = admit
        self.close_at_once = close_at_once  # as a draining worker does with a handshake that ends
        self.outcomes: list[BaseException | None] = []
        self.protocols: list[Echo] = []

    def begin(self, transport: TlsTransport) -> bool:
        return self.admit

    def ended(self, transport: TlsTransport, error: BaseException | None) -> None:
        self.outcomes.append(error)
        if error is None and self.close_at_once:
            transport.close()
        elif error is None:
            protocol = Echo(transport)
            self.protocols.append(protocol)
            transport.set_protocol(protocol)


class Echo:
    """Writes back what it reads, one line per write (b"pause" pauses its reading for 0.3 s)."""

    def __init__(self, transport: TlsTransport) -> None:
        self.transport = transport
        self.received: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        if data == b"flood":  # more than the socket buffers hold, then closed: the client reads none of it
            self.transport.write(b"x" * (32 << 20))
            self.transport.close()
            return
        if data == b"pause":
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.3, self.transport.resume_reading)
            return
        self.transport.write(b"echo " + data)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class Served:
    """A loop in a thread serving TlsTransport on a loopback port."""

    def __init__(self, pair: Pair, opener: Opener, timeout: float) -> None:
        self.context = server_context(pair.certificate.read_bytes(), pair.key.read_bytes(), ("dot",))
        self.opener = opener
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []  # what reached the loop's exception handler
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.server = self.loop.run_until_complete(
            self.loop.create_server(lambda: TlsTransport(self.context, timeout, opener), "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Pair]:
    authority = Authority(tmp_path_factory.mktemp("ca"))
    return authority, authority.issue()


@contextlib.contextmanager
def serving(
    pair: tuple[Authority, Pair], admit: bool = True, timeout: float = 5.0, close_at_once: bool = False
) -> Iterator[Served]:
    served = Served(pair[1], Opener(admit, close_at_once), timeout)
    try:
        yield served
    finally:
        served.stop()


def opened(pair: tuple[Authority, Pair], served: Served) -> MemoryTls:
    """A client past the server's last flight, its own last one still to send (`pending`)."""
    client = MemoryTls(served.port, pair[0], "dot", finish=False)
    client.handshake()
    return client


def test_a_query_in_the_segment_that_ends_the_handshake_is_read_and_answered(pair):
    with serving(pair) as served:
        client = MemoryTls(served.port, pair[0], "dot", finish=False)
        client.handshake()
        client.sock.sendall(client.pending() + client.encrypted(b"first"))  # the client's Finished and a query
        assert client.recv() == b"echo first"
        assert served.opener.outcomes == [None]


def test_records_waiting_while_reading_is_paused_come_in_order_once_it_resumes(pair):
    with serving(pair) as served:
        client = opened(pair, served)
        client.sock.sendall(client.pending() + b"".join(client.encrypted(b) for b in (b"pause", b"one", b"two")))
        began = time.monotonic()
        assert client.recv() == b"echo one"
        assert time.monotonic() - began >= 0.25  # not before the protocol resumed
        assert client.recv() == b"echo two"
        assert served.opener.protocols[0].received == [b"pause", b"one", b"two"]


def test_close_notify_from_the_client_is_its_end_and_closing_sends_one(pair):
    with serving(pair) as served:
        client = opened(pair, served)
        client.sock.sendall(client.pending() + client.encrypted(b"query"))
        assert client.recv() == b"echo query"
        with contextlib.suppress(ssl.SSLWantReadError):
            client.tls.unwrap()
        client.sock.sendall(client.pending())
        protocol = served.opener.protocols[0]
        eventually(lambda: protocol.eof and protocol.lost, within=5)

        client = opened(pair, served)
        client.sock.sendall(client.pending() + client.encrypted(b"query"))
        assert client.recv() == b"echo query"
        served.loop.call_soon_threadsafe(served.opener.protocols[1].transport.close)
        while True:  # SSLObject.read gives b"" for a close_notify, not for a bare end of the stream
            try:
                assert client.tls.read(1 << 16) == b""
                break
            except ssl.SSLWantReadError:
                data = client.sock.recv(1 << 16)
                assert data, "closed without close_notify"
                client.incoming.write(data)


def test_a_record_that_does_not_decrypt_ends_the_connection(pair):
    with serving(pair) as served:
        client = opened(pair, served)
        record = bytearray(client.encrypted(b"query"))
        record[-1] ^= 0xFF  # its authentication tag
        client.sock.sendall(client.pending() + bytes(record))
        assert client.recv() == b""
        protocol = served.opener.protocols[0]
        eventually(lambda: protocol.lost, within=5)
        assert protocol.received == []


def test_each_handshake_that_fails_is_reported_once_with_why(pair):
    with serving(pair, timeout=0.3) as served:
        silent = socket.create_connection(("127.0.0.1", served.port))
        garbage = socket.create_connection(("127.0.0.1", served.port))
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
        eventually(lambda: len(served.opener.outcomes) == 2, within=5)
        quitter = MemoryTls(served.port, pair[0], "dot", finish=False)
        with contextlib.suppress(ssl.SSLWantReadError):
            quitter.tls.do_handshake()
        quitter.sock.sendall(quitter.pending())  # its ClientHello, then it goes away
        time.sleep(0.05)
        quitter.sock.close()
        eventually(lambda: len(served.opener.outcomes) == 3, within=5)
        time.sleep(0.5)  # past the handshake timeout of the two that ended early: still told once each
        kinds: list[Any] = [type(outcome) for outcome in served.opener.outcomes]
        assert sorted(kind.__name__ for kind in kinds) == ["ConnectionResetError", "SSLError", "TimeoutError"]
        assert silent.recv(1) == b""  # the silent one was closed
        silent.close()
        garbage.close()


def test_a_connection_not_admitted_is_closed_before_any_handshake(pair):
    with serving(pair, admit=False) as served:
        refused = socket.create_connection(("127.0.0.1", served.port), timeout=5)
        assert refused.recv(1) == b""
        assert served.opener.outcomes == []


def test_a_closing_connection_whose_client_reads_nothing_more_is_cut_off_after_the_timeout(pair):
    with serving(pair, timeout=0.5) as served:
        client = opened(pair, served)
        client.sock.sendall(client.pending() + client.encrypted(b"flood"))
        eventually(lambda: served.opener.protocols, within=5)
        protocol = served.opener.protocols[0]
        assert eventually(lambda: protocol.lost, within=5) < 3
        assert served.errors == []


def test_a_connection_closed_as_its_handshake_ends_goes_without_an_error(pair):
    with serving(pair, close_at_once=True) as served:
        client = opened(pair, served)
        client.sock.sendall(client.pending() + client.encrypted(b"query"))
        assert client.recv() == b""
        eventually(lambda: served.opener.outcomes == [None], within=5)
        time.sleep(0.2)
        assert served.errors == []
