"""The baseline: the least a uvloop UDP DNS server can do per query (turn the query into an empty answer).

Every bench run measures it beside bns, on the same machine at the same time, so figures are reported as
ratios to it rather than as absolute numbers that depend on how busy the shared machine was.

    python -m bench.responder --port 5302
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop

_ANSWER_FLAGS = b"\x81\x80"  # QR, RD, RA, NOERROR


class Responder(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data[:2] + _ANSWER_FLAGS + data[4:], addr)  # type: ignore[attr-defined]


async def serve(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    await asyncio.get_running_loop().create_datagram_endpoint(Responder, sock=sock)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5302)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
