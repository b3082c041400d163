"""DNS over HTTPS (RFC 8484): GET (`?dns=`, base64url without padding) and POST (`application/dns-message`) on
`tls.doh_path` and `tls.doh_path/{client id}`, over HTTP/2 (h2) or HTTP/1.1 (h11), as the TLS handshake chose
(ALPN). Each request's DNS message goes through the one pipeline (tls.answer_encrypted), and its answer comes back
as `application/dns-message`, padded when the query pads (RFC 8467: wire.padded_if_asked), cacheable by the client
alone (`private`: it is its device's policy's answer) for no longer than its smallest TTL (§5.1). What is not a DoH
request gets an HTTP status: 400 (no DNS message, or none that is answered), 404 (another path), 405 (another
method), 413 (larger than `tls.max_request`), 415 (another content type).

Bounds, each counted by the gate (tls.py): `tls.max_streams` concurrent HTTP/2 streams
(SETTINGS_MAX_CONCURRENT_STREAMS: a stream more is refused, REFUSED_STREAM); a budget of stream resets and refusals
and of control frames (SETTINGS, PING, PRIORITY frames) per ten seconds, past which a client is cut off too (the "rapid
reset" flood, CVE-2023-44487, and its kin); a header block left unended by CONTINUATION frames past 16 KiB and a
frame (CVE-2024-27316's kind); h2's flow control for bodies; h11's bound on a request's head; one
HTTP/1.1 request at a time (reading pauses meanwhile); `tls.idle_timeout`; 64 KiB of answers the client has not
read (reading pauses), or, on HTTP/2, waiting for a window it does not open (new streams are refused); a 16 KiB
HTTP/2 window for request bodies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11
from h2.errors import ErrorCodes

from resolver.shared.config import TlsSettings
from resolver.shared.logs import Throttled
from resolver.worker.access import AccessControl
from resolver.worker.listener import WRITE_BUFFER_LIMIT, InFlight, result_safely
from resolver.worker.pipeline import Resolver
from resolver.worker.tls import TlsGate, answer_encrypted, client_id_of_path
from resolver.worker.wire import Peer, padded_if_asked, smallest_ttl

_failures = Throttled(logging.getLogger(__name__))

_DNS_MESSAGE = b"application/dns-message"
_HEAD_LIMIT = 16_384  # bytes of a request's head (HTTP/1.1) or header list (HTTP/2)
_BODY_WINDOW = 16_384  # HTTP/2 INITIAL_WINDOW_SIZE: what a client may send of a body ahead (or tls.max_request)
_OVER_STREAMS = 100  # streams past tls.max_streams refused one by one; past these too, the connection is cut
_FRAME_SIZE = 16_384  # SETTINGS_MAX_FRAME_SIZE, h2's default, left as it is
_FLOOD_WINDOW = 10.0  # seconds over which the budgets below are counted
_CONTROL_FRAMES = 100  # SETTINGS, PING and PRIORITY frames a client may send per window
# Requests a client may reset before their answer per window: a browser cancels a few; a flood, thousands.
_RESETS_PER_STREAM = 1

Respond = Callable[[int, bytes], None]  # (status, body): what a request is answered


class DohConnection(asyncio.Protocol):
    """One DoH client connection: its HTTP (`_Http2` or `_Http1`) feeds requests to `request`."""

    def __init__(
        self,
        resolver: Resolver,
        gate: TlsGate,
        in_flight: InFlight,
        access: AccessControl,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.gate = gate
        self.settings: TlsSettings = gate.settings
        self._in_flight_futures = in_flight
        self._access = access
        self._clock = clock
        self._path = gate.settings.doh_path.encode()
        self.transport: asyncio.Transport | None = None
        self._peer: Peer = ("", 0)
        self._client_id: str | None = None  # the server name's
        self._http: _Http2 | _Http1 | None = None
        self.in_flight = 0
        self.closing = False
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self.reading_paused = False

    # --- the gate's side (tls.Encrypted) ----------------------------------------------------------------------

    def opened(self, transport: asyncio.Transport, client_id: str | None) -> None:
        self.transport = transport
        self._peer = transport.get_extra_info("peername")[:2]
        self._client_id = client_id
        alpn = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        transport.set_write_buffer_limits(high=WRITE_BUFFER_LIMIT)  # past it, no request is read (pause_writing)
        self._http = _Http2(self) if alpn == "h2" else _Http1(self)
        self._last_active = self._clock()
        self._idle_timer = asyncio.get_running_loop().call_later(self.settings.idle_timeout, self._check_idle)

    def idle_since(self) -> float | None:
        if self.transport is None or self.in_flight or self.closing:
            return None
        return self._last_active

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        self.closing = True
        if self._http is not None:
            self._http.stop()
        self.close_when_done()

    # --- the transport's side ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # Closing too, while the transport is open: a draining HTTP/2 connection (GOAWAY said) still reads the
        # WINDOW_UPDATE frames its answers in flight need; it opens no stream (`_Http2._request`), and HTTP/1.1
        # reads no request once closing.
        transport = self.transport
        if self._http is not None and transport is not None and not transport.is_closing():
            self._http.received(data)

    def eof_received(self) -> bool:
        self.closing = True  # over TLS the transport closes now: an answer still in flight has nowhere to go
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.gate.release(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.update_reading()

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self._writing_paused or (self._http is not None and self._http.busy())
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def cut(self, reason: str) -> None:
        """Close at once for a bound broken (counted)."""
        self.gate.cut[reason] += 1
        self.close()

    def close_when_done(self) -> None:
        if self.in_flight == 0 and self.transport is not None and not (self._http is not None and self._http.unsent()):
            self.transport.close()  # what is written goes first

    def _check_idle(self) -> None:
        idle_for = self._clock() - self._last_active
        timeout = self.settings.idle_timeout
        if self.in_flight == 0 and idle_for >= timeout and not self.closing:
            self.gate.cut["idle"] += 1
            if self._http is not None:
                self._http.stop()
            self.close()
            return
        self._idle_timer = asyncio.get_running_loop().call_later(max(timeout - idle_for, 0.05), self._check_idle)

    # --- requests ---------------------------------------------------------------------------------------------

    def head(self, method: bytes, target: bytes, content_type: bytes | None, length: int | None) -> DohRequest | int:
        """What a request's head asks, or the status it gets before its body is read."""
        path, _, query = target.partition(b"?")
        if path == self._path:
            client_id = self._client_id
        elif path.startswith(self._path + b"/"):
            client_id = self.gate.count_client_id(client_id_of_path(path[len(self._path) + 1 :].decode("latin-1")))
        else:
            return 404
        self._last_active = self._clock()
        if method == b"GET":
            message = _dns_parameter(query, self.settings.max_request)
            return message if isinstance(message, int) else DohRequest(client_id, message)
        if method == b"POST":
            if content_type is None or content_type.split(b";", 1)[0].strip().lower() != _DNS_MESSAGE:
                return 415
            if length is not None and length > self.settings.max_request:
                return 413
            return DohRequest(client_id, None)
        return 405

    def answer(self, request: DohRequest, message: bytes, respond: Respond) -> None:
        """Answer a DoH request's DNS message (`respond` may be called now or later)."""
        reply = answer_encrypted(self.resolver, self._access, message, self._peer, request.client_id)
        if reply is None:
            respond(400, b"")
            return
        if type(reply) is bytes:
            respond(200, padded_if_asked(message, reply))
            return
        self.in_flight += 1
        self._in_flight_futures.track(reply)  # type: ignore[arg-type]
        reply.add_done_callback(lambda future: self._answered(future, message, respond))  # type: ignore[union-attr]

    def _answered(self, future: asyncio.Future[bytes], message: bytes, respond: Respond) -> None:
        self.in_flight -= 1
        self._last_active = self._clock()
        if self.transport is None:
            return
        reply = result_safely(future, message)
        if reply is None:
            respond(400, b"")
        else:
            respond(200, padded_if_asked(message, reply))
        if self.closing:
            self.close_when_done()

    def response_headers(self, status: int, body: bytes) -> list[tuple[bytes, bytes]]:
        """The headers of a response (its status aside), counted by status."""
        self.gate.statuses[status] = self.gate.statuses.get(status, 0) + 1
        if status == 200:
            ttl = smallest_ttl(body)
            return [
                (b"content-type", _DNS_MESSAGE),
                (b"content-length", str(len(body)).encode()),
                # private: the answer is this device's (its policy's), and a shared cache must not hand it to
                # another; max-age its smallest TTL (RFC 8484 §5.1)
                (b"cache-control", b"private, max-age=%d" % (ttl or 0)),
            ]
        headers = [(b"content-length", b"0")]
        if status == 405:
            headers.append((b"allow", b"GET, POST"))
        return headers


class DohRequest:
    """A DoH request whose head was accepted: the client id it gives, and its DNS message once known."""

    __slots__ = ("body", "client_id", "message")

    def __init__(self, client_id: str | None, message: bytes | None) -> None:
        self.client_id = client_id
        self.message = message  # a GET's; a POST's is its body
        self.body = bytearray()


def _dns_parameter(query: bytes, largest: int) -> bytes | int:
    """The DNS message of a GET's `dns` parameter (base64url, RFC 4648 §5, padding optional), or its status."""
    for parameter in query.split(b"&"):
        if parameter.startswith(b"dns="):
            encoded = parameter[4:]
            if len(encoded) * 3 // 4 > largest:
                return 413
            try:
                return base64.b64decode(encoded + b"=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
            except binascii.Error:
                return 400
    return 400


class _Http2:
    """HTTP/2 (RFC 9113) by h2: streams are requests, answered in any order."""

    def __init__(self, owner: DohConnection) -> None:
        self._owner = owner
        settings = owner.settings
        # Our own headers are known to be well formed: h2's checks of them cost more than answering the query did.
        # A client's are not checked either (a fifth of DoH's time): `head` reads four of them and holds each to
        # what DoH allows, so one h2 would call malformed gets a 4xx, and none reaches further than that.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config)
        advertised = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _HEAD_LIMIT,
            # A body is one DNS message of at most tls.max_request bytes: a client may send little more ahead per
            # stream (each DATA frame is acknowledged at once, so a body within the bound flows). Not exactly
            # max_request: a client blocked on the window after a 413 (httpx) would never read it.
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: max(settings.max_request, _BODY_WINDOW),
        }
        self._h2.local_settings = h2.settings.Settings(client=False, initial_values=advertised)
        self._h2.decoder.max_header_list_size = _HEAD_LIMIT  # hpack's own bound (64 KiB) otherwise
        self._streams: dict[int, DohRequest | None] = {}  # open streams: their request (None: answered early)
        self._unsent: dict[int, bytes] = {}  # answers waiting for flow-control window
        self._unsent_bytes = 0
        self._stopping = False  # draining: no new stream, GOAWAY once those open are answered
        self._said_goaway = False
        self._receiving = False  # in `received`: answers given at once go out together when it ends
        self._budget_since = owner.gate.clock()
        self._control_frames = 0
        self._resets = 0
        self._h2.initiate_connection()
        owner.write(self._h2.data_to_send())
        # h2 answers a stream past SETTINGS_MAX_CONCURRENT_STREAMS with GOAWAY, the whole connection lost; RFC 9113
        # §5.1.2 lets a server refuse that one stream instead (`_request`). So h2 itself is told, and the client is
        # not, of more streams than advertised: those a client opens in one read before `_request` refuses them (a
        # client may open them before our SETTINGS arrive); more than that, and the connection goes as before.
        enforced = {**advertised, h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_streams + _OVER_STREAMS}
        self._h2.local_settings = h2.settings.Settings(client=False, initial_values=enforced)

    def busy(self) -> bool:
        return False  # streams are bounded by SETTINGS_MAX_CONCURRENT_STREAMS, not by pausing

    def unsent(self) -> bool:
        """Whether answers wait for a flow-control window (closing waits for them)."""
        return bool(self._unsent)

    def stop(self) -> None:
        """No new streams; those open are answered, then GOAWAY. Not GOAWAY first: h2 treats a connection that said
        it as closed, and neither sends an answer nor reads a WINDOW_UPDATE after it; a stream opened meanwhile is
        refused (`_request`)."""
        self._stopping = True
        self._goaway_when_done()

    def _goaway_when_done(self) -> None:
        if self._stopping and not self._streams and not self._said_goaway:
            self._said_goaway = True
            self._h2.close_connection()
            self._owner.write(self._h2.data_to_send())

    def received(self, data: bytes) -> None:
        owner = self._owner
        if self._said_goaway:
            return  # h2 takes nothing but GOAWAY now, and nothing is owed
        self._receiving = True
        try:
            events = self._h2.receive_data(data)
            # The priorities HEADERS frames carried: h2 reports each again as PriorityUpdated (after the stream's
            # other events), but no PRIORITY frame was sent, and a browser gives every request one.
            carried = {id(p) for event in events if (p := getattr(event, "priority_updated", None)) is not None}
            for event in events:
                if id(event) not in carried:
                    self._handle(event)
        except h2.exceptions.TooManyStreamsError:  # h2 has said GOAWAY (PROTOCOL_ERROR: RFC 9113 §5.1.2)
            self._cut("streams")
            return
        except _Flood:
            self._h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
            self._cut("flood")
            return
        except h2.exceptions.ProtocolError:  # h2 has said GOAWAY
            self._cut("protocol")
            return
        except Exception:
            _failures.exception("a DoH (HTTP/2) connection failed")
            owner.close()
            return
        finally:
            self._receiving = False
        if self._header_block_pending() > _HEAD_LIMIT + _FRAME_SIZE:
            # A header block split across CONTINUATION frames that never ends (CVE-2024-27316's kind): h2 holds up
            # to 64 frames of it (1 MiB) before it gives up; the header list could not exceed 16 KiB anyway.
            self._h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
            self._cut("flood")
            return
        owner.write(self._h2.data_to_send())
        self._goaway_when_done()

    def _header_block_pending(self) -> int:
        """Bytes of a header block whose CONTINUATION frames have not ended, held by h2 undecoded."""
        frames = getattr(self._h2.incoming_buffer, "_headers_buffer", None)  # h2 4.x keeps them there
        return sum(len(frame.data) for frame in frames) if frames else 0

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._ended(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            self._send_unsent()
        elif isinstance(event, h2.events.StreamReset):
            if self._streams.pop(event.stream_id, None) is not None:
                self._resets += 1  # a request given up before its answer
            self._unsent_bytes -= len(self._unsent.pop(event.stream_id, b""))
            self._spend()
        elif isinstance(event, h2.events.RemoteSettingsChanged | h2.events.PingReceived | h2.events.PriorityUpdated):
            self._control_frames += 1
            self._spend()
            if isinstance(event, h2.events.RemoteSettingsChanged) and self._unsent:
                self._send_unsent()  # a larger INITIAL_WINDOW_SIZE opens every stream's window: no WINDOW_UPDATE
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 sends nothing after the client's GOAWAY: answers waiting for a window are lost with it
            self._unsent.clear()
            self._unsent_bytes = 0
            self._owner.closing = True
            self._owner.close_when_done()

    def _spend(self) -> None:
        """Cut off a client past its budgets of resets and control frames in the current window."""
        now = self._owner.gate.clock()
        if now - self._budget_since >= _FLOOD_WINDOW:
            self._budget_since, self._control_frames, self._resets = now, 0, 0
        resets = self._owner.settings.max_streams * _RESETS_PER_STREAM
        if self._control_frames > _CONTROL_FRAMES or self._resets > resets:
            raise _Flood

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        # Refused (RFC 9113 §8.7: not processed; the client may ask again), counted, and spent from the reset budget
        # (a client opening streams only to have them refused is a flood): one past tls.max_streams (§5.1.2), or
        # while answers wait for a window the client does not open (pausing reading instead would stop the
        # WINDOW_UPDATE frames that let them go).
        if self._owner.closing:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)  # draining: GOAWAY said, no new stream
            return
        if len(self._streams) >= self._owner.settings.max_streams or self._unsent_bytes > WRITE_BUFFER_LIMIT:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._owner.gate.cut["streams"] += 1
            self._resets += 1
            self._spend()
            return
        fields = dict(event.headers or ())
        length = fields.get(b"content-length")
        head = self._owner.head(
            fields.get(b":method", b""),
            fields.get(b":path", b""),
            fields.get(b"content-type"),
            int(length) if length is not None and length.isdigit() else None,
        )
        if isinstance(head, int):
            self._streams[stream_id] = None
            self._respond(stream_id, head, b"")
            return
        self._streams[stream_id] = head

    def _data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        self._h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        request = self._streams.get(stream_id)
        if request is None:
            return  # answered already (an error): what follows is dropped
        request.body += event.data
        if len(request.body) > self._owner.settings.max_request:
            self._streams[stream_id] = None
            self._respond(stream_id, 413, b"")

    def _ended(self, stream_id: int) -> None:
        request = self._streams.get(stream_id)
        if request is None:
            self._streams.pop(stream_id, None)
            return
        message = request.message if request.message is not None else bytes(request.body)
        self._owner.answer(request, message, lambda status, body: self._answered(stream_id, status, body))

    def _answered(self, stream_id: int, status: int, body: bytes) -> None:
        if stream_id not in self._streams:
            return  # reset by the client meanwhile
        try:
            self._respond(stream_id, status, body)
        except h2.exceptions.ProtocolError:
            return  # the stream or the connection closed meanwhile
        if not self._receiving:  # else `received` sends it with the rest, in as few TLS records as it can
            self._owner.write(self._h2.data_to_send())
            self._goaway_when_done()

    def _respond(self, stream_id: int, status: int, body: bytes) -> None:
        headers = [(b":status", b"%d" % status), *self._owner.response_headers(status, body)]
        request = self._streams.get(stream_id)
        self._h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self._unsent[stream_id] = body
            self._unsent_bytes += len(body)
            self._send_unsent()
        if request is None and self._h2.streams.get(stream_id) is not None:
            # Answered before the client finished sending (RFC 9113 §8.1): it need not send the rest.
            stream = self._h2.streams[stream_id]
            if stream.open and not stream.closed:
                self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        if stream_id not in self._unsent:
            self._streams.pop(stream_id, None)

    def _send_unsent(self) -> None:
        for stream_id, unsent in list(self._unsent.items()):
            left = unsent
            window = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
            while left and window > 0:
                chunk, left = left[:window], left[window:]
                self._h2.send_data(stream_id, chunk, end_stream=not left)
                self._unsent_bytes -= len(chunk)
                window = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
            if left:
                self._unsent[stream_id] = left
            else:
                del self._unsent[stream_id]
                self._streams.pop(stream_id, None)
        if self._owner.closing and not self._unsent:  # the last answer waiting for a window: out, then close
            self._owner.write(self._h2.data_to_send())
            self._goaway_when_done()
            self._owner.close_when_done()

    def _cut(self, reason: str) -> None:
        self._owner.write(self._h2.data_to_send())
        self._owner.cut(reason)


class _Flood(Exception):
    """A client past its budget of resets or control frames."""


class _Http1:
    """HTTP/1.1 (RFC 9112) by h11: one request at a time, in order; reading pauses while one is answered."""

    def __init__(self, owner: DohConnection) -> None:
        self._owner = owner
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_HEAD_LIMIT)
        self._request: DohRequest | None = None
        self._answering = False
        self._reading = False  # inside `_next`'s loop: an answer given at once lets the loop go on

    def busy(self) -> bool:
        return self._answering

    def unsent(self) -> bool:
        return False  # an answer is written whole

    def stop(self) -> None:
        pass  # the request being answered is the last: `close_when_done`

    def received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._next()

    def _next(self) -> None:
        # A loop, never a recursion: an answer known at once (cached, blocked) is sent from inside `answer`, and a
        # client pipelining thousands of requests in one write must not take a stack frame each.
        if self._reading:
            return
        self._reading = True
        try:
            self._read_requests()
        finally:
            self._reading = False

    def _read_requests(self) -> None:
        owner = self._owner
        while not self._answering and not owner.closing:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError:
                owner.gate.cut["protocol"] += 1
                self._respond(400, b"", finished=False)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                fields = dict(event.headers)
                length = fields.get(b"content-length")
                head = owner.head(
                    event.method, event.target, fields.get(b"content-type"), int(length) if length else None
                )
                if isinstance(head, int):
                    self._respond(head, b"", finished=False)
                    return
                self._request = head
            elif isinstance(event, h11.Data) and self._request is not None:
                self._request.body += event.data
                if len(self._request.body) > owner.settings.max_request:
                    self._respond(413, b"", finished=False)
                    return
            elif isinstance(event, h11.EndOfMessage) and self._request is not None:
                request, self._request = self._request, None
                message = request.message if request.message is not None else bytes(request.body)
                self._answering = True
                owner.update_reading()
                owner.answer(request, message, lambda status, body: self._respond(status, body, finished=True))
            elif isinstance(event, h11.ConnectionClosed):
                owner.closing = True
                owner.close_when_done()
                return

    def _respond(self, status: int, body: bytes, finished: bool) -> None:
        """Send a response; unless the request was `finished` (read whole), close after it."""
        owner = self._owner
        if owner.transport is None:
            return
        headers = owner.response_headers(status, body)
        if not finished:
            headers.append((b"connection", b"close"))
        try:
            data = self._h11.send(h11.Response(status_code=status, headers=headers))
            data += self._h11.send(h11.Data(data=body)) if body else b""
            data += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            owner.close()
            return
        owner.write(data or b"")
        self._answering = False
        if (
            not finished
            or owner.closing
            or self._h11.our_state is not h11.DONE
            or self._h11.their_state is not h11.DONE
        ):
            owner.closing = True
            owner.close_when_done()
            return
        self._h11.start_next_cycle()
        owner.update_reading()
        self._next()  # an answer that came later: read on (one given at once returns to `_next`'s loop)
