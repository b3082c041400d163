"""Serve-stale (RFC 8767) on an in-process worker with a scripted upstream on loopback: when the upstream stops
answering, the names answered before are answered from their expired data (TTL 30, EDE 3) once
`cache.client_timeout` has passed, and at once for 30 s after the upstream failed them; a negative answer
likewise; a name the policy now blocks is blocked, never stale; with `cache.serve_stale = false`, SERVFAIL."""

from __future__ import annotations

import dataclasses
import socket
import time

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from bench.upstream import Script, ScriptedUpstream
from tests.conftest import ServerThread, answer_addresses, eventually, make_config

pytestmark = pytest.mark.integration


def ede_codes(response: dns.message.Message) -> list[int]:
    return [option.code for option in response.options if option.otype == dns.edns.OptionType.EDE]


def ask(server: ServerThread, name: str) -> dns.message.Message:
    return server.ask(name, timeout=3.0, use_edns=0)


def serving(upstream: ScriptedUpstream, lists, **cache: object) -> ServerThread:
    settings = {"client_timeout": 0.5, **cache}
    config = make_config([upstream.address], lists={"path": str(lists)}, cache=settings, policy={"block": []})
    return ServerThread(config)


def test_names_answered_before_are_answered_stale_while_the_upstream_is_down(lists):
    script = Script(ttl=1, modes={"gone.example": "nxdomain"})
    with ScriptedUpstream(script=script) as upstream, serving(upstream, lists) as server:
        fresh = ask(server, "www.example.org")
        assert fresh.answer[0].ttl == 1 and not ede_codes(fresh)
        assert ask(server, "gone.example").rcode() == dns.rcode.NXDOMAIN
        ask(server, "later.example")
        time.sleep(1.1)  # every answer expired
        upstream.script = Script(mode="drop")

        started = time.monotonic()
        stale = ask(server, "www.example.org")
        waited = time.monotonic() - started
        assert 0.45 < waited < 0.95  # at client_timeout, before the upstream's deadline (1 s)
        assert answer_addresses(stale) == answer_addresses(fresh)
        assert stale.answer[0].ttl in (29, 30) and ede_codes(stale) == [3]  # 30, made in the second before
        negative = ask(server, "gone.example")
        assert negative.rcode() == dns.rcode.NXDOMAIN and ede_codes(negative) == [3]

        time.sleep(1.5)  # the upstream's deadline passed: the names failed, and are answered stale at once
        asked = len(upstream.seen)
        started = time.monotonic()
        again = ask(server, "www.example.org")
        assert time.monotonic() - started < 0.4 and ede_codes(again) == [3]
        assert 26 <= again.answer[0].ttl <= 30  # 30 when the name failed, counting down to the recheck
        assert len(upstream.seen) == asked  # not asked again within the 30 s of RFC 8767's failure recheck
        assert ask(server, "never.example").rcode() == dns.rcode.SERVFAIL  # nothing held

        upstream.script = Script(ttl=60)  # back: a name not failed meanwhile is fresh again
        back = ask(server, "later.example")
        assert back.answer[0].ttl == 60 and not ede_codes(back)
        counted = server.call(lambda: server.worker.resolver.cache.stale_answers)
        assert counted == 3


def test_a_name_the_policy_now_blocks_is_blocked_not_served_stale_nor_is_a_chain_into_one(lists):
    """The name itself is decided before the cache; a stale answer's CNAME chain is judged again, on the timer's
    path and on the failure recheck's."""
    script = Script(ttl=1, cnames={"alias.example": "porn.example"})
    with ScriptedUpstream(script=script) as upstream, serving(upstream, lists) as server:
        assert answer_addresses(ask(server, "porn.example"))  # nothing blocked yet
        assert answer_addresses(ask(server, "alias.example"))
        time.sleep(1.1)
        upstream.script = Script(mode="drop")
        blocking = dataclasses.replace(
            server.config, policy=dataclasses.replace(server.config.policy, block=("pornography",))
        )
        server.call(server.worker.reload, blocking)
        for _ in range(2):  # before the upstream failed the names (client_timeout), and after (at once)
            for name in ("porn.example", "alias.example"):
                answer = ask(server, name)
                assert answer.rcode() == dns.rcode.NXDOMAIN and 3 not in ede_codes(answer), name
                assert "blocked: pornography" in [o.text for o in answer.options if o.otype == 15], name
            time.sleep(1.5)


def test_with_serve_stale_off_an_upstream_that_does_not_answer_is_servfail(lists):
    with ScriptedUpstream(script=Script(ttl=1)) as upstream, serving(upstream, lists, serve_stale=False) as server:
        ask(server, "www.example.org")
        time.sleep(1.1)
        upstream.script = Script(mode="drop")
        answer = ask(server, "www.example.org")
        assert answer.rcode() == dns.rcode.SERVFAIL and 3 not in ede_codes(answer)


def test_a_client_past_its_upstream_bound_gets_the_expired_answer_rather_than_servfail(lists):
    """upstream.max_per_client: a client with that many questions waiting upstream is not sent another, and is
    answered from the expired data where there is some (SERVFAIL where there is none)."""
    with ScriptedUpstream(script=Script(ttl=1)) as upstream:
        config = make_config(
            [upstream.address],
            lists={"path": str(lists)},
            cache={"client_timeout": 5.0},
            upstream={"max_per_client": 1},
            policy={"block": []},
        )
        with ServerThread(config) as server:
            ask(server, "held.example")
            time.sleep(1.1)
            upstream.script = Script(mode="drop")
            waiting = dns.message.make_query("never.example", "A", use_edns=0)
            sock = dns.query.socket_factory(socket.AF_INET, socket.SOCK_DGRAM, 0)
            with sock:
                sock.sendto(waiting.to_wire(), ("127.0.0.1", server.port))  # this client's one question upstream
                eventually(lambda: "never.example" in upstream.names_seen(), 2)
                started = time.monotonic()
                shed = ask(server, "held.example")
                assert time.monotonic() - started < 2.0  # not asked upstream, not waiting for client_timeout (5 s)
                assert ede_codes(shed) == [3] and shed.answer[0].ttl in (29, 30)
                busy = ask(server, "none.example")  # nothing held: shed as before
                assert busy.rcode() == dns.rcode.SERVFAIL
                assert [o.text for o in busy.options if o.otype == 15] == [
                    "too many of your queries are waiting for upstreams"
                ]
