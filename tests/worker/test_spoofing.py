"""Spoofing resistance (RFC 5452) through a real worker and the scripted upstream on loopback: a fresh source
port and ID per upstream query, 0x20 mixed case checked in replies, refused replies counted, hedges that go
to another upstream."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import dns.message
import dns.rcode
import pytest
import uvloop

from bench.upstream import FORGED_ADDRESS, Script, ScriptedUpstream
from resolver.shared.config import UpstreamSettings, parse_endpoint
from resolver.shared.dns import text_to_name
from resolver.worker.counters import worker_counters
from resolver.worker.upstream import Forwarder, UpstreamFailed
from tests.conftest import ServerThread, answer_addresses, make_config

pytestmark = pytest.mark.integration

# Generous: a thousand misses on a busy two-core machine must not be hedged or time out.
PATIENT = {"timeout": 2.0, "deadline": 4.0}


def ask_all(port: int, names: list[str], batch: int = 50) -> dict[str, dns.message.Message]:
    """Each name asked once over UDP, `batch` at a time in flight; the responses by name."""
    responses: dict[str, dns.message.Message] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        for start in range(0, len(names), batch):
            waiting = {}
            for query_id, name in enumerate(names[start : start + batch]):
                query = dns.message.make_query(name, "A")
                query.id = query_id  # distinct within the batch, so responses pair up
                waiting[query_id] = name
                client.sendto(query.to_wire(), ("127.0.0.1", port))
            while waiting:
                response = dns.message.from_wire(client.recv(4096))
                responses[waiting.pop(response.id)] = response
    return responses


def upper_case_share(names: list[str]) -> float:
    letters = [char for name in names for char in name if char.isalpha()]
    return sum(char.isupper() for char in letters) / len(letters)


def rejected(server: ServerThread) -> dict[str, int]:
    """The worker's refused-reply counters as it exports them for metrics."""
    assert server.worker is not None
    counters = server.call(worker_counters, server.worker.resolver, server.worker.catalog)
    return counters["upstream_rejected"]


def test_a_thousand_misses_use_at_least_500_source_ports_and_990_ids(upstream):
    names = [f"host{index}.spoof.example" for index in range(1000)]
    with ServerThread(make_config([upstream.address], upstream=PATIENT)) as server:
        responses = ask_all(server.port, names)
    assert all(response.rcode() == dns.rcode.NOERROR for response in responses.values())
    first = upstream.seen[:1000]
    assert sorted(seen.name for seen in first) == sorted(names)  # one upstream query per name, no hedges
    ports = len({seen.source_port for seen in first})
    ids = len({seen.query_id for seen in first})
    print(f"distinct per 1,000 upstream queries: {ports} source ports, {ids} IDs")
    assert ports >= 500
    assert ids >= 990


def test_upstream_names_are_mixed_case_and_clients_see_their_own(upstream):
    names = [f"Name{index}.Mixed.Example" for index in range(200)]
    with ServerThread(make_config([upstream.address], upstream=PATIENT)) as server:
        responses = ask_all(server.port, names)
        again = server.ask("name7.mixed.example")  # the cache key is lowercase whatever went upstream
    sent = [seen.wire_name for seen in upstream.seen]
    share = upper_case_share(sent)
    print(f"upper-case letters in upstream names: {share:.1%}")
    assert share >= 0.30
    for name, response in responses.items():
        assert response.question[0].name.to_text() == name + "."
        assert response.answer[0].name.to_text() == name + "."
    assert again.answer[0].name.to_text() == "name7.mixed.example."
    assert len(upstream.seen) == len(names)


def test_an_upstream_in_keep_case_is_asked_in_lowercase_and_the_others_in_mixed_case(upstream):
    upstream.script.modes["passed-on.kept.example"] = "drop"
    with ScriptedUpstream() as preserving:
        config = make_config(
            [upstream.address, preserving.address],
            upstream={"timeout": 1.0, "deadline": 4.0, "keep_case": [upstream.address]},
        )
        with ServerThread(config) as server:
            responses = ask_all(server.port, [f"Name{index}.Kept.Example" for index in range(200)])
            hedged = server.ask("Passed-On.Kept.Example", timeout=5)
    assert all(answer_addresses(response) for response in responses.values())
    assert len(upstream.seen) == 201
    assert upper_case_share([seen.wire_name for seen in upstream.seen]) == 0
    assert answer_addresses(hedged)
    assert [seen.name for seen in preserving.seen] == ["passed-on.kept.example"]
    assert upper_case_share([seen.wire_name for seen in preserving.seen]) > 0


def test_a_forged_reply_in_the_other_case_is_refused_counted_and_the_real_one_taken(upstream):
    upstream.script.mode = "wrong_case"
    upstream.script.delay = 0.1  # the forgery comes first, the real reply this much later
    with ServerThread(make_config([upstream.address], upstream=PATIENT)) as server:
        response = server.ask("bank.example")
        assert FORGED_ADDRESS not in answer_addresses(response)
        assert answer_addresses(response)[0].startswith("192.0.2.")
        assert rejected(server)["wrong_case"] == 1
    assert len(upstream.seen) == 1


def test_only_forged_replies_give_servfail_at_the_deadline_never_the_forgery(upstream):
    upstream.script.mode = "wrong_case"
    upstream.script.delay = 5.0  # the real reply comes after the deadline
    with ServerThread(make_config([upstream.address], upstream={"timeout": 0.25, "deadline": 1.0})) as server:
        for _ in range(2):  # the second from the cache: a cached forgery would show there
            response = server.ask("bank.example")
            assert response.rcode() == dns.rcode.SERVFAIL and not response.answer
        counted = rejected(server)
    assert 2 <= counted["wrong_case"] <= len(upstream.seen)  # a forgery for every attempt


@pytest.mark.parametrize("mode", ["wrong_id", "wrong_question"])
def test_replies_failing_a_check_are_counted_by_reason(upstream, mode):
    upstream.script.mode = mode
    with ServerThread(make_config([upstream.address], upstream={"timeout": 0.25, "deadline": 0.6})) as server:
        assert server.ask("counted.example").rcode() == dns.rcode.SERVFAIL
        counted = rejected(server)
    assert 1 <= counted[mode] <= len(upstream.seen)
    assert sum(counted.values()) == counted[mode]


def test_the_hedge_goes_to_the_next_upstream(upstream):
    """An upstream silent for `timeout` gets no second query while another upstream can be asked."""
    with ScriptedUpstream(script=Script(mode="delay", delay=1.5)) as slow:
        config = make_config([slow.address, upstream.address], upstream={"timeout": 0.25, "deadline": 2.0})
        with ServerThread(config) as server:
            response = server.ask("hedged.example")
    assert answer_addresses(response)
    assert slow.names_seen() == ["hedged.example"]
    assert upstream.names_seen() == ["hedged.example"]


def forwarder_for(upstream: ScriptedUpstream, **settings: object) -> Forwarder:
    return Forwarder(UpstreamSettings(servers=(parse_endpoint(upstream.address),), **settings))  # type: ignore[arg-type]


def question(name: str) -> bytes:
    return text_to_name(name) + b"\x00\x01\x00\x01"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_by_default_each_query_has_a_socket_closed_when_it_ends(upstream):
    upstream.script.mode = "delay"
    upstream.script.delay = 0.2

    async def scenario() -> tuple[int, int, int]:
        forwarder = forwarder_for(upstream)
        before = open_descriptors()
        queries = [forwarder.query(question(f"fd{index}.example"), False, False) for index in range(20)]
        await asyncio.sleep(0.1)
        during = open_descriptors() - before
        await asyncio.gather(*queries)
        after = open_descriptors() - before
        forwarder.close()
        return during, after, len({seen.source_port for seen in upstream.seen})

    during, after, ports = uvloop.run(scenario())
    assert during >= 20  # one socket per query in flight
    assert after == 0  # each closed as its query ended
    assert ports == 20


def test_a_socket_that_cannot_be_opened_is_a_failed_attempt_and_counted(upstream, monkeypatch):
    """EMFILE (out of descriptors) or EADDRINUSE (out of ports) fails that attempt only: the next attempt,
    `timeout` later, may succeed."""
    failures = [OSError(errno.EMFILE, "Too many open files"), OSError(errno.EADDRINUSE, "Address in use")]
    real_socket = socket.socket

    def scarce_socket(*args: object, **kwargs: object) -> socket.socket:
        if failures:
            raise failures.pop(0)
        return real_socket(*args, **kwargs)  # type: ignore[arg-type]

    async def scenario() -> tuple[int, int]:
        forwarder = forwarder_for(upstream, timeout=0.05, deadline=1.0)
        monkeypatch.setattr(socket, "socket", scarce_socket)
        reply = await forwarder.query(question("scarce.example"), False, False)
        monkeypatch.undo()
        forwarder.close()
        return reply.rcode, forwarder.send_errors

    assert uvloop.run(scenario()) == (0, 2)
    assert upstream.names_seen() == ["scarce.example"]


def test_a_fetch_whose_sockets_all_fail_ends_at_the_deadline(upstream, monkeypatch):
    def no_socket(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    async def scenario() -> int:
        forwarder = forwarder_for(upstream, timeout=0.05, deadline=0.3)
        monkeypatch.setattr(socket, "socket", no_socket)
        with pytest.raises(UpstreamFailed):
            await forwarder.query(question("none.example"), False, False)
        monkeypatch.undo()
        forwarder.close()
        return forwarder.send_errors

    assert uvloop.run(scenario()) >= 3
    assert not upstream.seen
