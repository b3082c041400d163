"""One root exception; every module's errors subclass it so the CLI can report them in one place."""


class BnsError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(BnsError):
    """A configuration key or value that cannot be used; the message names the key and the reason."""


class StartupError(BnsError):
    """The server cannot start (a socket cannot be bound, a file cannot be read)."""


class StoreUnavailable(BnsError):
    """The store cannot be reached (Redis down, file unreadable); the caller keeps what it has. A write that
    raises this was not applied."""


class WriteUnknown(BnsError):
    """A write whose outcome is unknown: it was sent, but the store could not confirm it (the connection
    died before the reply and Redis stayed out of reach, or too few replicas confirmed it in time). Read
    the document again to see whether it was applied."""
