"""A scripted upstream DNS server on loopback: a real peer on real sockets, for the tests and the bench.

It answers A and AAAA for any name with documentation addresses (192.0.2.0/24, 2001:db8::/32), other types
with NODATA, and behaves as scripted per name or for every name: drop, delay, SERVFAIL, REFUSED, NXDOMAIN,
truncate (TC over UDP, the full answer over TCP), big (more than 512 bytes), garbage bytes, a wrong ID,
a wrong question, wrong_case (over UDP a forged reply first: the question's letters in the other case, as a
forger who guessed the 0x20 bits wrong would send, and an address of the forger's; the real reply follows
after `delay`), or a CNAME chain; it sets AD only when scripted to. Every query it receives is recorded,
with the letter case it came in, so a test can count upstream traffic.

    python -m bench.upstream --port 5301 [--count-file PATH]    # serve until interrupted
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

COUNT_INTERVAL = 0.1  # seconds between writes of --count-file
MODES = (
    "answer",
    "drop",
    "delay",
    "servfail",
    "refused",
    "nxdomain",
    "truncate",
    "big",
    "garbage",
    "wrong_id",
    "wrong_question",
    "wrong_case",
)
FORGED_ADDRESS = "203.0.113.66"  # what forged replies point at (TEST-NET-3): never a real answer here


@dataclass
class Seen:
    """One query as the upstream received it."""

    name: str  # lowercased
    wire_name: str  # as it came, letter case kept (0x20)
    qtype: str
    tcp: bool
    option_codes: list[int]
    query_id: int
    source_port: int


@dataclass
class Script:
    mode: str = "answer"
    ttl: int = 300
    delay: float = 0.3
    big_count: int = 40  # A records in a "big" answer
    ad: bool = False  # set AD in every reply, as a validating upstream would for signed names
    modes: dict[str, str] = field(default_factory=dict)  # name (no trailing dot) -> mode
    cnames: dict[str, str] = field(default_factory=dict)  # name -> target, answered as CNAME + A of target
    # name -> the IPv4 address its A record holds; it has no AAAA (a client then goes nowhere but there)
    addresses: dict[str, str] = field(default_factory=dict)

    def mode_for(self, name: str) -> str:
        return self.modes.get(name, self.mode)


def _address_for(name: str, family: int) -> str:
    digest = hashlib.blake2s(name.encode(), digest_size=4).digest()
    if family == 4:
        return f"192.0.2.{digest[0] % 254 + 1}"
    return f"2001:db8::{digest[0]:x}{digest[1]:02x}:{digest[2]:x}"


def build_reply(query: DNSRecord, script: Script, tcp: bool) -> bytes | None:
    """The scripted reply bytes for `query`, or None to stay silent."""
    name = str(query.q.qname).rstrip(".").lower()
    mode = script.mode_for(name)
    reply = query.reply()
    reply.header.ra = 1
    reply.header.ad = int(script.ad)  # dnslib copies the query's flags; only the script says what was validated
    if query.ar and any(rr.rtype == QTYPE.OPT for rr in query.ar):
        reply.add_ar(EDNS0(udp_len=1232))
    soa = RR(
        query.q.qname,
        QTYPE.SOA,
        ttl=script.ttl,
        rdata=SOA("ns.upstream.test.", "hostmaster.upstream.test.", (1, 3600, 600, 86400, 60)),
    )
    if mode == "drop":
        return None
    if mode == "servfail":
        reply.header.rcode = RCODE.SERVFAIL
    elif mode == "refused":
        reply.header.rcode = RCODE.REFUSED
    elif mode == "nxdomain":
        reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(soa)
    elif mode == "truncate" and not tcp:
        reply.header.tc = 1
    elif mode == "garbage":
        return os.urandom(48)
    else:
        target = script.cnames.get(name)
        owner = query.q.qname
        if target is not None:
            reply.add_answer(RR(owner, QTYPE.CNAME, ttl=script.ttl, rdata=CNAME(target + ".")))
            owner = target + "."
        count = script.big_count if mode == "big" else 1
        if query.q.qtype == QTYPE.A:
            addresses = [f"192.0.2.{index + 1}" for index in range(count)] if count > 1 else [_address_for(name, 4)]
            addresses = [script.addresses[name]] if name in script.addresses else addresses
            for address in addresses:
                reply.add_answer(RR(owner, QTYPE.A, ttl=script.ttl, rdata=A(address)))
        elif query.q.qtype == QTYPE.AAAA and name not in script.addresses:
            reply.add_answer(RR(owner, QTYPE.AAAA, ttl=script.ttl, rdata=AAAA(_address_for(name, 6))))
        else:
            reply.add_auth(soa)
    if mode == "wrong_question":
        reply.q.qname = DNSLabel("other." + name)
    data = reply.pack()
    if mode == "wrong_id":
        data = struct.pack("!H", (query.header.id + 1) & 0xFFFF) + data[2:]
    return data


def forged_reply(query: DNSRecord, script: Script) -> bytes:
    """The forgery of `wrong_case` mode: right ID, right port, the question's letters in the other case, and
    an A record of the forger's."""
    qname = DNSLabel(str(query.q.qname).swapcase())
    forged = DNSRecord(DNSHeader(id=query.header.id, qr=1, rd=query.header.rd, ra=1), q=DNSQuestion(qname, QTYPE.A))
    forged.add_answer(RR(qname, QTYPE.A, ttl=script.ttl, rdata=A(FORGED_ADDRESS)))
    return forged.pack()


class ScriptedUpstream:
    """The server, on its own event loop in a background thread (`with ScriptedUpstream() as upstream:`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, script: Script | None = None) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self.script = script or Script()
        self.seen: list[Seen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def names_seen(self) -> list[str]:
        return [seen.name for seen in self.seen]

    def __enter__(self) -> ScriptedUpstream:
        self._thread = threading.Thread(target=self._run, name="scripted-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("scripted upstream did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.serving():
            self._ready.set()
            await self._stop.wait()

    @contextlib.asynccontextmanager
    async def serving(self) -> Iterator[None]:  # type: ignore[misc]
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _attempt in range(20):  # port 0: a UDP port whose TCP twin is free too
            udp_sock = socket.socket(family, socket.SOCK_DGRAM)
            udp_sock.bind((self.host, self.requested_port))
            self.port = udp_sock.getsockname()[1]
            try:
                server = await asyncio.start_server(self._serve_tcp, self.host, self.port, family=family)
                break
            except OSError:
                udp_sock.close()
                if self.requested_port:
                    raise
        else:
            raise OSError(f"no port free for both UDP and TCP on {self.host}")
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpSide(self), sock=udp_sock)
        try:
            yield
        finally:
            server.close()
            transport.close()

    async def replies_to(self, data: bytes, tcp: bool, source_port: int) -> AsyncIterator[bytes]:
        """What is sent back for `data`, in order, each when it is due."""
        try:
            query = DNSRecord.parse(data)
        except Exception:
            return
        wire_name = str(query.q.qname).rstrip(".")
        name = wire_name.lower()
        options = [opt.code for rr in query.ar if rr.rtype == QTYPE.OPT for opt in rr.rdata]
        self.seen.append(Seen(name, wire_name, QTYPE[query.q.qtype], tcp, options, query.header.id, source_port))
        mode = self.script.mode_for(name)
        if mode == "wrong_case" and not tcp:
            yield forged_reply(query, self.script)
        if mode in ("delay", "wrong_case"):
            await asyncio.sleep(self.script.delay)
        reply = build_reply(query, self.script, tcp)
        if reply is not None:
            yield reply

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                peer_port = writer.get_extra_info("peername")[1]
                data = await reader.readexactly(length)
                async for reply in self.replies_to(data, tcp=True, source_port=peer_port):
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _UdpSide(asyncio.DatagramProtocol):
    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None
        self._answering: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._answer(data, addr))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        async for reply in self.upstream.replies_to(data, tcp=False, source_port=addr[1]):
            if self.transport is not None:
                self.transport.sendto(reply, addr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5301)
    parser.add_argument("--ttl", type=int, default=86400)
    parser.add_argument("--count-file", type=Path, help="write the queries received so far here, every 0.1 s")
    args = parser.parse_args()
    serve_until_interrupted(ScriptedUpstream(args.host, args.port, Script(ttl=args.ttl)), args.count_file)


def serve_until_interrupted(upstream: ScriptedUpstream, count_file: Path | None = None) -> None:
    """Serve on this thread (uvloop) until interrupted: the upstream as a process of its own."""
    import uvloop

    async def forever() -> None:
        async with upstream.serving():
            print(f"scripted upstream on {upstream.address}", flush=True)
            while True:
                if count_file is not None:
                    count_file.with_suffix(".new").write_text(str(len(upstream.seen)))
                    count_file.with_suffix(".new").replace(count_file)
                await asyncio.sleep(COUNT_INTERVAL)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(forever())


if __name__ == "__main__":
    main()
