"""DNS over TCP per RFC 7766, on raw sockets: framing, pipelining, out-of-order answers, timeouts and caps."""

from __future__ import annotations

import socket
import struct
import time

import dns.message
import pytest

from tests.conftest import ServerThread, answer_addresses, make_config

pytestmark = pytest.mark.integration


def frame(name: str, query_id: int) -> bytes:
    query = dns.message.make_query(name, "A")
    query.id = query_id
    data = query.to_wire()
    return struct.pack("!H", len(data)) + data


def read_answer(sock: socket.socket) -> dns.message.Message | None:
    """One framed answer, or None when the server closed the connection."""
    header = _read_exactly(sock, 2)
    if header is None:
        return None
    body = _read_exactly(sock, struct.unpack("!H", header)[0])
    return None if body is None else dns.message.from_wire(body)


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def connect(server: ServerThread, timeout: float = 3.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_queries_are_answered_out_of_order(upstream):
    upstream.script.modes["slow.example"] = "delay"
    upstream.script.delay = 0.2
    with ServerThread(make_config([upstream.address])) as server, connect(server) as sock:
        sock.sendall(frame("slow.example", 1) + frame("fast1.example", 2) + frame("fast2.example", 3))
        ids = [read_answer(sock).id for _ in range(3)]
    assert ids[-1] == 1 and sorted(ids) == [1, 2, 3]


def test_several_queries_over_one_connection(server):
    with connect(server) as sock:
        for index in range(5):
            sock.sendall(frame(f"seq{index}.example", 100 + index))
            answer = read_answer(sock)
            assert answer.id == 100 + index and answer_addresses(answer)


def test_frames_split_across_writes_are_reassembled(server):
    data = frame("split.example", 7)
    with connect(server) as sock:
        for byte in data:
            sock.sendall(bytes((byte,)))
        assert read_answer(sock).id == 7


def test_idle_connection_is_closed(upstream):
    config = make_config([upstream.address], server={"tcp_idle_timeout": 0.3})
    with ServerThread(config) as server, connect(server) as sock:
        started = time.monotonic()
        assert closed_by_server(sock)
        assert 0.25 <= time.monotonic() - started < 1.5


def test_a_query_in_flight_keeps_the_connection_open_past_the_idle_timeout(upstream):
    upstream.script.mode = "delay"
    upstream.script.delay = 0.5
    config = make_config(
        [upstream.address], server={"tcp_idle_timeout": 0.2}, upstream={"timeout": 1.0, "deadline": 2.0}
    )
    with ServerThread(config) as server, connect(server) as sock:
        sock.sendall(frame("patient.example", 9))
        answer = read_answer(sock)
    assert answer is not None and answer.id == 9


def test_at_the_cap_the_longest_idle_connection_makes_room(upstream):
    config = make_config([upstream.address], server={"tcp_max_connections": 2})
    with ServerThread(config) as server, connect(server) as first, connect(server) as second:
        for index, sock in enumerate((first, second)):
            sock.sendall(frame("cap.example", index))
            assert read_answer(sock) is not None
        with connect(server) as third:
            third.sendall(frame("cap.example", 3))
            assert read_answer(third).id == 3
            assert closed_by_server(first)  # idle the longest: closed to make room (RFC 7766 §6.2.3)
            second.sendall(frame("cap.example", 4))
            assert read_answer(second).id == 4


def test_at_the_cap_with_every_connection_busy_new_ones_are_refused(upstream):
    upstream.script.mode = "delay"
    upstream.script.delay = 0.6
    config = make_config(
        [upstream.address], server={"tcp_max_connections": 2}, upstream={"timeout": 1.0, "deadline": 2.0}
    )
    with ServerThread(config) as server, connect(server) as first, connect(server) as second:
        first.sendall(frame("busy1.example", 1))
        second.sendall(frame("busy2.example", 2))
        deadline = time.monotonic() + 5
        while server.call(lambda: len(server.worker.connections)) < 2:  # both accepted
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with connect(server) as third:
            assert closed_by_server(third)
        assert read_answer(first).id == 1 and read_answer(second).id == 2


def test_a_client_trickling_a_frame_is_closed_by_the_idle_timer(upstream):
    config = make_config([upstream.address], server={"tcp_idle_timeout": 0.5})
    data = frame("slow.example", 1)
    with ServerThread(config) as server, connect(server) as sock:
        started = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in data[:-1]:
                sock.sendall(bytes((byte,)))
                time.sleep(0.2)
        assert time.monotonic() - started < 2.0


def test_in_flight_cap_pauses_reading_and_loses_nothing(upstream):
    upstream.script.mode = "delay"
    upstream.script.delay = 0.1
    config = make_config([upstream.address], server={"tcp_max_in_flight": 2})
    with ServerThread(config) as server, connect(server) as sock:
        sock.sendall(b"".join(frame(f"q{index}.example", index) for index in range(8)))
        ids = sorted(read_answer(sock).id for _ in range(8))
    assert ids == list(range(8))
    assert len(upstream.seen) == 8


@pytest.mark.parametrize("length", [0, 5, 11])
def test_a_length_prefix_too_short_for_a_query_closes_the_connection(server, length):
    with connect(server) as sock:
        sock.sendall(struct.pack("!H", length) + b"\x00" * length)
        assert closed_by_server(sock)


def test_half_closed_connection_gets_its_answers_then_closes(server):
    with connect(server) as sock:
        sock.sendall(frame("a.example", 1) + frame("b.example", 2))
        sock.shutdown(socket.SHUT_WR)
        ids = sorted(read_answer(sock).id for _ in range(2))
        assert ids == [1, 2]
        assert closed_by_server(sock)


def test_garbage_query_on_tcp_gets_formerr_and_the_connection_lives(server):
    bad = struct.pack("!HHHHHH", 77, 0x0100, 2, 0, 0, 0) + b"\x00\x00\x01\x00\x01"
    with connect(server) as sock:
        sock.sendall(struct.pack("!H", len(bad)) + bad)
        answer = read_answer(sock)
        assert answer.id == 77 and answer.rcode() == 1
        sock.sendall(frame("after.example", 78))
        assert read_answer(sock).id == 78
