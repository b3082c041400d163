"""One root exception, and what each failure means to the two faces of bns: the HTTP status the admin API
answers and the exit code the command line ends with. Each error class carries both, so every place that
reports a failure reports it the same way (`http_status_of`, `exit_code_of`, `exit_code_for_status`).

Exit codes: 0 done, 1 failed while running (a write: not applied), 2 refused (bad usage, configuration or
input), 3 not found, 4 not allowed, 5 a write whose outcome is unknown.
"""

from __future__ import annotations

from blocklists.errors import BlocklistError

EXIT_FAILURE, EXIT_REFUSED, EXIT_NOT_FOUND, EXIT_NOT_ALLOWED, EXIT_UNKNOWN = 1, 2, 3, 4, 5


class BnsError(Exception):
    """Base of every error this package raises on purpose."""

    http_status = 400
    exit_code = EXIT_FAILURE
    summary = ""  # what the failure means, before the details (the message)

    def explain(self) -> str:
        return f"{self.summary}: {self}" if self.summary else str(self)


class ConfigError(BnsError):
    """A configuration key or value that cannot be used; the message names the key and the reason."""

    exit_code = EXIT_REFUSED
    summary = "configuration error"


class StartupError(BnsError):
    """The server cannot start (a socket cannot be bound, a file cannot be read)."""

    summary = "cannot start"


class Refused(BnsError):
    """A request refused as it stands: fix it and ask again."""

    exit_code = EXIT_REFUSED


class TooLarge(Refused):
    """A request body over its bound: `setting` (admin.max_upload, admin.max_json) holds `limit`."""

    http_status = 413

    def __init__(self, setting: str, limit: int) -> None:
        super().__init__(f"the body is larger than {setting} ({limit} bytes)")


class Busy(Refused):
    """Something else of the kind is under way (a compile)."""

    http_status = 409


class NotFound(BnsError):
    """The site, group, device, version or job named does not exist."""

    http_status = 404
    exit_code = EXIT_NOT_FOUND


class NotAllowed(BnsError):
    """No credentials, wrong ones, or ones that do not allow this."""

    http_status = 403
    exit_code = EXIT_NOT_ALLOWED


class Unauthenticated(NotAllowed):
    http_status = 401


class StoreUnavailable(BnsError):
    """The store cannot be reached (Redis down, file unreadable); the caller keeps what it has. A write that
    raises this was not applied."""

    http_status = 503
    summary = "the store is unreachable (nothing was written)"


class TokenUncheckable(StoreUnavailable):
    """A soundly signed site token the store cannot confirm now (its site, its revocation): refused, never let
    through."""

    summary = "a site token cannot be checked now; try again"


class WriteUnknown(BnsError):
    """A write whose outcome is unknown: it was sent, but the store could not confirm it (the connection
    died before the reply and Redis stayed out of reach, or too few replicas confirmed it in time). Read
    the document again to see whether it was applied."""

    http_status = 504
    exit_code = EXIT_UNKNOWN
    summary = "the outcome of this write is unknown"


def http_status_of(exc: Exception) -> int:
    if isinstance(exc, BnsError):
        return exc.http_status
    return 400 if isinstance(exc, BlocklistError) else 500


def exit_code_of(exc: Exception) -> int:
    return exc.exit_code if isinstance(exc, BnsError) else EXIT_FAILURE


def exit_code_for_status(status: int) -> int:
    """The exit code of a command whose API call was answered `status` (the table above, read backwards)."""
    for kind in (WriteUnknown, StoreUnavailable, NotFound, NotAllowed, Unauthenticated):
        if kind.http_status == status:
            return kind.exit_code
    return EXIT_REFUSED if 400 <= status < 500 else EXIT_FAILURE
