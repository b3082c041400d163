"""DNS over TLS (RFC 7858): TCP's connection (listener.py: RFC 7766 framing, pipelining, back-pressure, the idle
timer) over the TLS a gate admitted and completed (tls.py), its queries let in by tls.answer_encrypted with the
client id its server name gave, and its answers padded when the query pads (wire.padded_if_asked)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from resolver.shared.config import ServerSettings
from resolver.worker.access import REFUSED, AccessControl
from resolver.worker.listener import WRITE_BUFFER_LIMIT, InFlight, TcpConnection
from resolver.worker.pipeline import Resolver
from resolver.worker.tls import TlsGate, answer_encrypted
from resolver.worker.wire import padded_if_asked


class DotConnection(TcpConnection):
    def __init__(
        self,
        resolver: Resolver,
        settings: ServerSettings,
        gate: TlsGate,
        in_flight: InFlight,
        access: AccessControl,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(resolver, settings, gate.open, in_flight, access, clock, gate.settings.idle_timeout)
        self._gate = gate
        self._client_id: str | None = None

    def opened(self, transport: asyncio.Transport, client_id: str | None) -> None:
        self._client_id = client_id
        transport.set_write_buffer_limits(high=WRITE_BUFFER_LIMIT)
        self.connection_made(transport)

    def _admitted(self) -> bool:
        # The gate admitted it within the bounds; a stranger with no client id, refused in silence, goes now.
        return not (self._client_id is None and self._access.silent and self._access[self._peer[0]] == REFUSED)

    def eof_received(self) -> bool:
        self._closing = True  # over TLS the transport closes now: an answer still in flight has nowhere to go
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._gate.release(self)

    def idle_since(self) -> float | None:
        if self._transport is None or self._in_flight or self._closing:
            return None
        return self._last_active

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _reply(self, message: bytes) -> bytes | asyncio.Future[bytes] | None:
        return answer_encrypted(self._resolver, self._access, message, self._peer, self._client_id)

    def _write(self, message: bytes, reply: bytes) -> None:
        super()._write(message, padded_if_asked(message, reply))  # RFC 8467 §4: padded when the query pads

    def _close_idle(self) -> None:
        self._gate.cut["idle"] += 1
        super()._close_idle()
