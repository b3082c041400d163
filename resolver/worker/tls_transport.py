"""TLS over a plain TCP transport, as the DoT and DoH connections see it: an asyncio transport whose bytes are
records decrypted and encrypted by `ssl.SSLObject` over memory BIOs, with no buffer of its own.

asyncio's (and uvloop's) SSL transport does the same with a 256 KiB read buffer per connection, flow control
of plaintext and a state machine for every read and write: it cost 40 µs a query where unbound's TLS costs
nothing measurable (bench/RESULTS.md, issue 20). Here a read is: the bytes into the incoming BIO, each record
out of `read`, to the protocol; a write: `write`, the outgoing BIO's bytes to the socket. Flow control is the
socket's (its transport's pause_writing reaches the protocol as it is); pause_reading stops both the socket
and the records not yet read.

The handshake must end within `timeout` seconds. Whoever made the transport (tls.Handshake) is told once how
it ended. A closing transport sends close_notify and closes once what it has written is sent, without waiting
for the client's close_notify; a client that does not read what is left is cut off after `timeout` seconds
more (neither may hold a connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any, Protocol

from resolver.shared.logs import Throttled

_failures = Throttled(logging.getLogger(__name__))
_RECORD = 16384  # a TLS record's largest plaintext: what one read can give


class Opener(Protocol):
    """Who learns how a handshake went (tls.Handshake)."""

    def begin(self, transport: TlsTransport) -> bool:
        """The socket is connected: whether to handshake on it (False: it is closed at once)."""

    def ended(self, transport: TlsTransport, error: BaseException | None) -> None:
        """The handshake is done (`error` None; then `set_protocol` gets who reads from now on) or failed."""


class TlsTransport(asyncio.Protocol):
    """The raw socket's protocol, and the transport of the protocol set once the handshake is done."""

    def __init__(self, context: ssl.SSLContext, timeout: float, opener: Opener) -> None:
        self._context = context
        self._timeout = timeout
        self._opener: Opener | None = opener  # until told how the handshake ended
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        self._raw: asyncio.Transport | None = None
        self._protocol: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._open = False  # past the handshake
        self._paused = False  # the protocol asked that nothing be read

    # --- the socket's side ------------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self._raw = transport
        opener = self._opener
        if opener is None or not opener.begin(self):
            self._opener = None
            transport.close()
            return
        self._tls = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._open and not self._handshake():
            return
        if not self._paused:
            self._read()

    def eof_received(self) -> bool:
        if self._protocol is None:
            return False  # a handshake cut short (connection_lost says so), or one closed as it ended
        return bool(self._protocol.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self._open = False
            if self._protocol is not None:  # none: closed as its handshake ended (tls.Handshake.ended)
                self._protocol.connection_lost(exc)
        else:
            self._failed(exc if exc is not None else ConnectionResetError("closed during the TLS handshake"))

    def pause_writing(self) -> None:
        if self._protocol is not None:
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._protocol is not None:
            self._protocol.resume_writing()

    # --- the protocol's side (asyncio.Transport) --------------------------------------------------------------

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    def write(self, data: bytes) -> None:
        raw = self._raw
        if raw is None or raw.is_closing() or self._tls is None:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError:
            raw.abort()
            return
        raw.write(self._outgoing.read())

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._raw is None or self._raw.is_closing()

    def close(self) -> None:
        """Send close_notify after what is written, then close the socket once its buffer is sent, or cut it
        off after `timeout` seconds if the client does not read it."""
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if self._tls is not None and self._open:
            # SSLWantReadError: close_notify is written and the client's is not awaited; another: closing anyway
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._flush()
        raw.close()
        if raw.get_write_buffer_size():
            self._timer = asyncio.get_running_loop().call_later(self._timeout, raw.abort)

    def abort(self) -> None:
        if self._raw is not None:
            self._raw.abort()

    def pause_reading(self) -> None:
        self._paused = True
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        raw.resume_reading()
        if self._open and self._incoming.pending:
            # records read before the pause: the socket brings no more of them
            asyncio.get_running_loop().call_soon(self._read_unpaused)

    def is_reading(self) -> bool:
        return not self._paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._raw is None else self._raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return None  # no client certificates are asked for
        return default if self._raw is None else self._raw.get_extra_info(name, default)

    # --- inside ---------------------------------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Take the handshake as far as the bytes read allow; True once it is done."""
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ValueError) as error:
            self._flush()  # the alert saying why
            self._failed(error)
            if self._raw is not None:
                self._raw.close()
            return False
        self._flush()  # the server's last flight, and TLS 1.3's session tickets
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        opener = self._opener
        self._opener = None
        self._open = True
        if opener is not None:
            opener.ended(self, None)
        # The client's first query may have come in the segment that ended the handshake.
        return self._open and self._raw is not None and not self._raw.is_closing()

    def _read(self) -> None:
        """Give the protocol each record read, until none is whole, the protocol pauses, or the socket closes."""
        tls = self._tls
        protocol = self._protocol
        assert tls is not None
        if protocol is None:
            return  # closed as its handshake ended: nothing is read for anyone
        incoming = self._incoming
        while incoming.pending or tls.pending():
            try:
                data = tls.read(_RECORD)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still to come
            except ssl.SSLError:
                if self._raw is not None:
                    self._raw.abort()  # a record that does not decrypt: nothing else on it can be trusted
                return
            if not data:  # the client's close_notify
                if not self.eof_received() and self._raw is not None:
                    self._raw.close()
                return
            protocol.data_received(data)
            if self._paused or not self._open or self._raw is None or self._raw.is_closing():
                break
        if self._outgoing.pending:
            self._flush()  # what reading made OpenSSL say: a key update's answer

    def _read_unpaused(self) -> None:
        raw = self._raw
        if self._open and not self._paused and raw is not None and not raw.is_closing():
            try:
                self._read()
            except Exception:  # as the socket's own reads: the protocol failed, the connection goes
                _failures.exception("a TLS connection failed reading what waited")
                raw.abort()

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._outgoing.read())

    def _too_slow(self) -> None:
        self._timer = None
        self._failed(TimeoutError("TLS handshake timed out"))
        if self._raw is not None:
            self._raw.abort()

    def _failed(self, error: BaseException) -> None:
        opener = self._opener
        self._opener = None
        if opener is not None:
            opener.ended(self, error)
