"""The query path with no socket at all (sans-I/O, as aioquic tests its protocol): a Resolver fed query bytes,
a scripted forwarder in place of the upstream sockets, and a directory over a real policy file. Most of the
pipeline's logic is tested here; tests/worker/test_forwarding.py and the others add the sockets."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from blocklists.catalog import load_catalog
from resolver.shared.config import UpstreamSettings
from resolver.shared.dns import RRType, name_to_text, text_to_name
from resolver.shared.identity import NetworkSet
from resolver.shared.lists import Lists
from resolver.shared.loading import policy_maker
from resolver.shared.page_pool import PagePool, slot
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.file_policies import FileStore
from resolver.worker.cache import AnswerCache
from resolver.worker.directory import Directory
from resolver.worker.discovery import Discovery
from resolver.worker.pipeline import Resolver
from resolver.worker.upstream import Overloaded
from resolver.worker.wire import ScannedReply, scan_reply
from tests.conftest import make_config

pytestmark = pytest.mark.unit
CATALOG = load_catalog()
CLIENT = ("127.0.0.1", 5353)
ADDRESS = bytes((192, 0, 2, 1))


def _record(owner: bytes, rtype: int, rdata: bytes, ttl: int = 300) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def upstream_reply(question: bytes, chain: list[str]) -> bytes:
    """The reply an upstream gives to `question`: the CNAME chain, then an address for its last name."""
    name, qtype = question[:-4], struct.unpack("!H", question[-4:-2])[0]
    records, owner = [], name
    for target in chain:
        records.append(_record(owner, RRType.CNAME, text_to_name(target)))
        owner = text_to_name(target)
    if qtype == RRType.A:
        records.append(_record(owner, RRType.A, ADDRESS))
    return struct.pack("!HHHHHH", 0, 0x8180, 1, len(records), 0, 0) + question + b"".join(records)


class ScriptedForwarder:
    """The upstream as the pipeline sees it: each name answered by its CNAME chain (`chains`) and an
    address; `overloaded` makes every query fail as the real forwarder does at its cap."""

    def __init__(self, chains: dict[str, list[str]] | None = None) -> None:
        self.chains = chains or {}
        self.asked: list[str] = []
        self.overloaded = False
        self.replies = 0
        self.reply_seconds = 0.0
        self.settings = UpstreamSettings()

    def query(self, question: bytes, do: bool, cd: bool) -> asyncio.Future[ScannedReply]:
        name = name_to_text(question[:-4])
        self.asked.append(name)
        if self.overloaded:
            raise Overloaded("scripted")
        return asyncio.ensure_future(self._reply(question, name))

    async def _reply(self, question: bytes, name: str) -> ScannedReply:
        await asyncio.sleep(0)  # an answer is never synchronous
        return scan_reply(upstream_reply(question, self.chains.get(name, [])), question)

    def close(self) -> None:
        return None


def query(name: str, rdtype: str = "A", mac: str | None = None) -> bytes:
    options = [dns.edns.GenericOption(65001, bytes.fromhex(mac.replace(":", "")))] if mac else []
    return dns.message.make_query(name, rdtype, use_edns=0, options=options).to_wire()


def ede_text(answer: bytes) -> str | None:
    found = [o for o in dns.message.from_wire(answer).options if o.otype == dns.edns.OptionType.EDE]
    return found[0].text if found else None


class Pipeline:
    """A Resolver over a list, a policy file and a scripted forwarder, driven on one event loop."""

    def __init__(
        self,
        lists_path: Path,
        store_path: Path,
        forwarder: ScriptedForwarder,
        now: float = 0.0,
        sections: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        config = make_config(["127.0.0.1:9"], identity={"trusted_networks": ["127.0.0.1/32"]}, **(sections or {}))
        self.now = now
        self.store = FileStore(store_path, CATALOG)
        directory = Directory(
            self.store, policy_maker(config, CATALOG), CATALOG, NetworkSet(("127.0.0.1/32",)), config.store
        )
        self.forwarder = forwarder
        self.resolver = Resolver(
            AnswerCache(config.cache),
            forwarder,  # type: ignore[arg-type]
            Lists(lists_path, CATALOG, 1000, 1.0, store_path.parent / "cache"),
            directory,
            wall_clock=lambda: self.now,
            page_pool=PagePool(config.pages.device_networks),
            discovery=Discovery(config.tls),
            local=config.local,
        )

    async def ask(self, data: bytes, client: tuple[str, int] = CLIENT) -> bytes:
        answer = self.resolver.answer(data, client, False)
        return answer if isinstance(answer, bytes) else await answer


def run(
    lists: Path,
    tmp_path: Path,
    work: Callable[[Pipeline], Awaitable[Any]],
    sections: dict[str, dict[str, Any]] | None = None,
    **script: Any,
) -> Any:
    async def main() -> Any:
        return await work(Pipeline(lists, tmp_path / "policies.json", ScriptedForwarder(**script), sections=sections))

    return asyncio.run(main())


async def write_site(pipeline: Pipeline, document: dict[str, Any]) -> None:
    await PolicyService(pipeline.store).put_site("home", document)


def test_a_second_query_is_answered_at_once_from_the_cache(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        first = await pipeline.ask(query("Cached.Example"))
        second = pipeline.resolver.answer(query("cached.example"), CLIENT, False)
        assert isinstance(second, bytes)  # no future: nothing to wait for
        assert pipeline.forwarder.asked == ["cached.example"]
        assert dns.message.from_wire(first).answer == dns.message.from_wire(second).answer

    run(lists, tmp_path, work)


def test_concurrent_queries_for_one_name_are_one_upstream_query(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        queries = [query("same.example") for _ in range(5)]
        answers = await asyncio.gather(*(pipeline.ask(data) for data in queries))
        assert pipeline.forwarder.asked == ["same.example"]
        for data, answer in zip(queries, answers, strict=True):  # each client gets its own ID back
            assert answer[:2] == data[:2] and dns.message.from_wire(answer).answer

    run(lists, tmp_path, work)


def test_a_listed_name_is_answered_here_and_never_asked_upstream(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        await pipeline.ask(query("warm.example"))  # the client is known from now on
        answer = pipeline.resolver.answer(query("www.porn.example"), CLIENT, False)
        assert isinstance(answer, bytes)
        assert dns.message.from_wire(answer).rcode() == dns.rcode.NXDOMAIN
        assert ede_text(answer) == "blocked: pornography"
        assert pipeline.forwarder.asked == ["warm.example"]

    run(lists, tmp_path, work)


CHAIN = {"innocent.example": ["cdn.example", "porn.example"]}


def test_a_cname_chain_into_a_listed_name_is_blocked(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        assert ede_text(await pipeline.ask(query("innocent.example"))) == "blocked: pornography"
        assert ede_text(await pipeline.ask(query("innocent.example"))) == "blocked: pornography"  # from the cache

    run(lists, tmp_path, work, chains=CHAIN)


def test_an_allowed_name_resolves_whatever_its_chain(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        await write_site(pipeline, {"networks": ["127.0.0.0/8"], "policy": {"allow": ["innocent.example"]}})
        answer = await pipeline.ask(query("innocent.example"))
        assert ede_text(answer) is None and dns.message.from_wire(answer).answer

    run(lists, tmp_path, work, chains=CHAIN)


def test_a_pass_lifts_a_warning_for_the_name_and_its_chain_but_no_block(lists, tmp_path):
    device = {"macs": ["02:00:00:00:00:01"], "passes": {"malware.example": "2030-01-01T00:00:00Z"}}

    async def work(pipeline: Pipeline) -> None:
        await write_site(pipeline, {"networks": ["127.0.0.0/8"], "mode": "device", "devices": {"pc": device}})
        assert ede_text(await pipeline.ask(query("malware.example", mac="02:00:00:00:00:01"))) is None
        assert ede_text(await pipeline.ask(query("x.malware.example", mac="02:00:00:00:00:01"))) is None
        via = await pipeline.ask(query("hop.malware.example", mac="02:00:00:00:00:01"))
        assert ede_text(via) == "blocked: pornography"  # the pass lifts warnings, not blocks
        assert ede_text(await pipeline.ask(query("malware.example", mac="02:00:00:00:00:02"))) == (
            "Web Protect: malware"  # another device of the site: no pass
        )

    run(lists, tmp_path, work, chains={"hop.malware.example": ["malware.example", "porn.example"]})


POOL = {
    "policy": {"answer": "page", "block_page": ["192.0.2.99"], "warning_page": ["192.0.2.100", "2001:db8::100"]},
    "pages": {"device_networks": ["192.0.2.0/29", "2001:db8:5::/125"]},
}


def addresses(answer: bytes) -> list[str]:
    return [item.address for rrset in dns.message.from_wire(answer).answer for item in rrset]


def test_devices_behind_a_router_are_warned_with_page_addresses_of_their_own(lists, tmp_path):
    laptop, phone = "02:00:00:00:00:01", "02:00:00:00:00:02"
    devices = {
        "laptop": {"macs": [laptop], "addresses": ["127.0.0.2"]},
        "phone": {"macs": [phone], "addresses": ["127.0.0.3"]},
    }
    assert (slot("home", "laptop", "malware.example", 8), slot("home", "phone", "malware.example", 8)) == (0, 4)

    async def work(pipeline: Pipeline) -> None:
        await write_site(pipeline, {"networks": ["127.0.0.0/8"], "devices": devices})
        for _ in range(2):  # and again, from the memo
            assert addresses(await pipeline.ask(query("malware.example", mac=laptop))) == ["192.0.2.0"]
            assert addresses(await pipeline.ask(query("malware.example", mac=phone))) == ["192.0.2.4"]
        assert ede_text(await pipeline.ask(query("malware.example", mac=phone))) == "Web Protect: malware"
        assert addresses(await pipeline.ask(query("malware.example", "AAAA", mac=phone))) == ["2001:db8:5::4"]
        # A MAC the site does not know: the shared page. A block: the block page.
        assert addresses(await pipeline.ask(query("malware.example", mac="02:00:00:00:00:09"))) == ["192.0.2.100"]
        assert addresses(await pipeline.ask(query("porn.example", mac=laptop))) == ["192.0.2.99"]
        # The same query bytes from two devices known by their addresses: each its own address, never the
        # other's (the blocked answers' memo is keyed on the address too; the parser interns a query without
        # its identity options, so the MACs above share one Query as well).
        same = query("www.malware.example")
        mine = addresses(await pipeline.ask(same, ("127.0.0.2", 5353)))
        theirs = addresses(await pipeline.ask(same, ("127.0.0.3", 5353)))
        assert mine == ["192.0.2.3"] and theirs == ["192.0.2.6"]
        assert addresses(await pipeline.ask(same, ("127.0.0.2", 5353))) == mine

    run(lists, tmp_path, work, sections=POOL)


def test_devices_sharing_a_slot_for_a_name_both_get_the_shared_warning_page(lists, tmp_path):
    laptop, phone, tv = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
    devices = {"laptop": {"macs": [laptop]}, "phone": {"macs": [phone]}, "tv": {"macs": [tv]}}
    assert slot("home", "laptop", "malware.example", 8) == slot("home", "tv", "malware.example", 8)

    async def work(pipeline: Pipeline) -> None:
        await write_site(pipeline, {"networks": ["127.0.0.0/8"], "devices": devices})
        assert addresses(await pipeline.ask(query("malware.example", mac=laptop))) == ["192.0.2.100"]
        assert addresses(await pipeline.ask(query("malware.example", mac=tv))) == ["192.0.2.100"]
        assert addresses(await pipeline.ask(query("malware.example", mac=phone))) == ["192.0.2.4"]

    run(lists, tmp_path, work, sections=POOL)


def test_any_is_answered_here_and_other_classes_refused(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        answer = dns.message.from_wire(await pipeline.ask(query("porn.example", "ANY")))
        assert answer.rcode() == dns.rcode.NOERROR and answer.answer[0].rdtype == dns.rdatatype.HINFO
        chaos = dns.message.make_query("version.bind", "TXT", rdclass="CH").to_wire()
        assert dns.message.from_wire(await pipeline.ask(chaos)).rcode() == dns.rcode.REFUSED
        assert pipeline.forwarder.asked == []

    run(lists, tmp_path, work)


def test_a_held_resolver_answers_not_ready_and_nothing_else(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        pipeline.resolver.hold()
        answer = await pipeline.ask(query("fine.example"))
        assert dns.message.from_wire(answer).rcode() == dns.rcode.SERVFAIL
        assert ede_text(answer) == "the filter is starting: its blocklist is not in yet"
        assert pipeline.forwarder.asked == []
        pipeline.resolver.release()
        assert dns.message.from_wire(await pipeline.ask(query("fine.example"))).rcode() == dns.rcode.NOERROR

    run(lists, tmp_path, work)


def test_an_overloaded_forwarder_is_servfail_and_not_remembered(lists, tmp_path):
    async def work(pipeline: Pipeline) -> None:
        pipeline.forwarder.overloaded = True
        answer = await pipeline.ask(query("busy.example"))
        assert dns.message.from_wire(answer).rcode() == dns.rcode.SERVFAIL
        assert ede_text(answer) == "too many upstream queries in flight"
        pipeline.forwarder.overloaded = False
        assert dns.message.from_wire(await pipeline.ask(query("busy.example"))).rcode() == dns.rcode.NOERROR

    run(lists, tmp_path, work)
