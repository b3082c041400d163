"""Errors of the blocklists library. They subclass resolver's root only through the CLI: this library stands
alone (no network, no asyncio, no resolver import)."""


class BlocklistError(Exception):
    """Base of every error this library raises on purpose."""


class CatalogError(BlocklistError):
    """The category catalogue cannot be used; the message names the entry and field."""


class SourceError(BlocklistError):
    """A list source cannot be used at all (unreadable, or nothing usable in it)."""


class ArtifactError(BlocklistError):
    """A compiled artifact is corrupt, truncated, of another format version, or inconsistent."""
