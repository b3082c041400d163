"""The admin API as the command line reaches it: urllib (nothing to install), a bearer token, JSON.

A failure raises ApiFailure, whose exit code is what the API's status means (resolver.shared.errors)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from resolver.shared.errors import EXIT_FAILURE, BnsError, Refused, exit_code_for_status

DEFAULT_API = "http://127.0.0.1:5380"
_UPLOAD_CHUNK = 1 << 20


class ApiFailure(BnsError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ApiClient:
    def __init__(self, base: str | None, token: str | None, timeout: float = 60.0) -> None:
        """`base` and `token`: the flags' values, else $BNS_API and $BNS_TOKEN (the command line's own
        environment; the server reads its own in the configuration)."""
        self.base = (base or os.environ.get("BNS_API") or DEFAULT_API).rstrip("/")
        address = urllib.parse.urlsplit(self.base)
        if address.scheme not in ("http", "https") or not address.hostname:
            raise Refused(
                f"the admin API's address {self.base!r} (--api or $BNS_API) is not an http:// or https:// URL"
            )
        self.token = token or os.environ.get("BNS_TOKEN")
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, data: Any = None, size: int | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
            if size is not None:
                headers["Content-Length"] = str(size)
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            hint = None
            try:
                error = json.loads(exc.read())["error"]
                message = f"{error['field']}: {error['message']}" if error.get("field") else error["message"]
                hint = error.get("hint")
            except (ValueError, KeyError, TypeError, AttributeError):
                message = exc.reason
            if exc.code == 401:
                message += f"\n  what to do: {hint or self._token_hint()}"
            raise ApiFailure(f"{exc.code}: {message}", exit_code_for_status(exc.code)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiFailure(f"cannot reach the admin API at {self.base}: {reason}", EXIT_FAILURE) from None
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload.decode()

    def _token_hint(self) -> str:
        """What to do about a 401 from a node that has tokens (one that has none says so itself)."""
        if self.token is None:
            return (
                "give a token of the node with --token TOKEN or $BNS_TOKEN (an admin token to change anything: "
                "the node's admin.tokens or $BNS_ADMIN_TOKENS; a read token to look)"
            )
        return (
            f"the token given (--token or $BNS_TOKEN) is not one the node at {self.base} takes: use one of its "
            "admin.tokens or admin.read_tokens ($BNS_ADMIN_TOKENS, $BNS_READ_TOKENS on the node)"
        )

    def upload(self, path_on_api: str, file: Path, show_progress: bool) -> Any:
        """POST a file's bytes, streamed, with a progress bar on stderr if asked. A file that cannot be read
        is refused naming it (before anything is sent)."""
        try:
            source = file.open("rb")
        except OSError as exc:
            raise Refused(f"{file}: {exc.strerror or exc}") from None
        with source:
            size = os.fstat(source.fileno()).st_size
            return self.call("POST", path_on_api, data=_chunks(source, size, show_progress), size=size)


def _chunks(source: BinaryIO, total: int, show: bool) -> Iterator[bytes]:
    sent = 0
    while chunk := source.read(_UPLOAD_CHUNK):
        sent += len(chunk)
        if show:
            filled = int(30 * sent / total) if total else 30
            print(
                f"\rupload [{'#' * filled}{'.' * (30 - filled)}] {sent / 2**20:.1f}/{total / 2**20:.1f} MB",
                end="",
                file=sys.stderr,
                flush=True,
            )
        yield chunk
    if show:
        print(file=sys.stderr)
