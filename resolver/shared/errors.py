"""One root exception; every module's errors subclass it so the CLI can report them in one place."""


class BnsError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(BnsError):
    """A configuration key or value that cannot be used; the message names the key and the reason."""


class StartupError(BnsError):
    """The server cannot start (a socket cannot be bound, a file cannot be read)."""
