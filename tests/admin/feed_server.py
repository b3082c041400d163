"""A list feed's HTTP server on loopback, scripted per path: a list served with ETag and Last-Modified (304
when the client's validators match), or a fault: an HTTP error, a hang, a body cut short, a redirect."""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODIFIED = "Tue, 01 Dec 2026 00:00:00 GMT"


@dataclass
class Script:
    body: bytes = b""
    status: int = 200
    gzip: bool = False  # sent with Content-Encoding: gzip
    hang: float = 0.0  # seconds to wait before answering
    cut: bool = False  # send Content-Length, half the body, and close
    location: str = ""  # a redirect's
    validators: bool = True  # ETag and Last-Modified, and 304 when they match
    length: bool = True  # Content-Length; without it the body ends where the connection closes


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    status: int


@dataclass
class FeedServer:
    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                script = server.scripts.get(self.path, Script(status=404))
                status = server.answer(self, script)
                server.requests.append(Request(self.path, dict(self.headers.items()), status))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def answer(self, handler: BaseHTTPRequestHandler, script: Script) -> int:
        if script.hang:
            time.sleep(script.hang)
        body = gzip.compress(script.body) if script.gzip else script.body
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if script.location:
            handler.send_response(302)
            handler.send_header("Location", script.location)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return 302
        if script.status != 200:
            handler.send_response(script.status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return script.status
        if script.validators and handler.headers.get("If-None-Match") == etag:
            handler.send_response(304)
            handler.send_header("ETag", etag)
            handler.end_headers()
            return 304
        handler.send_response(200)
        if script.validators:
            handler.send_header("ETag", etag)
            handler.send_header("Last-Modified", MODIFIED)
        if script.gzip:
            handler.send_header("Content-Encoding", "gzip")
        if script.length:
            handler.send_header("Content-Length", str(len(body)))
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        if script.cut:
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return 200
        handler.wfile.write(body)
        return 200

    def asked(self, path: str) -> list[Request]:
        return [request for request in self.requests if request.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def names(prefix: str, count: int) -> bytes:
    return "".join(f"{prefix}{number}.example\n" for number in range(count)).encode()
