"""Which categories a name belongs to, by the longest-suffix rule on label boundaries.

A listed name covers its subdomains: the categories of `a.b.example.com` are those of every listed name
among `com`, `example.com`, `b.example.com` and `a.b.example.com` together. An allow entry on any of them
wins for the categories of the list it came from (an `@@` in the malware list clears malware, not
pornography).
"""

from __future__ import annotations

from typing import NamedTuple

from blocklists.artifact import Artifact
from blocklists.names import normalize, reverse, unreverse, wire_to_key


class Match(NamedTuple):
    bits: int  # categories of the name (0 when allowed or not listed)
    listed: str | None  # the listed name that decided: the longest blocking one, or the allow entry
    allowed: bool = False


NO_MATCH = Match(0, None)


class Matcher:
    """Looks names up in one mapped artifact; immutable, so readers never lock."""

    def __init__(self, artifact: Artifact | None) -> None:
        self.artifact = artifact
        self._trie = artifact.trie if artifact else None
        self._index = artifact.index if artifact else None
        self._table = artifact.table if artifact else None

    @property
    def version(self) -> str:
        return self.artifact.version if self.artifact else "none"

    def match_key(self, key: str) -> Match:
        """`key` is a reversed name ending in a dot (`com.example.www.`)."""
        if self._trie is None:
            return NO_MATCH
        bits = allowed = 0
        listed: list[tuple[str, int]] = []
        allowed_by = None
        index, table = self._index, self._table
        for prefix, key_id in self._trie.iter_prefixes_with_ids(key):
            entry_bits, entry_allowed = table[index[key_id]]  # type: ignore[index]
            if entry_allowed:
                allowed |= entry_allowed
                allowed_by = prefix
            if entry_bits:
                bits |= entry_bits
                listed.append((prefix, entry_bits))
        remaining = bits & ~allowed
        if remaining:
            decider = next(prefix for prefix, entry_bits in reversed(listed) if entry_bits & remaining)
            return Match(remaining, unreverse(decider))
        if bits and allowed_by is not None:
            return Match(0, unreverse(allowed_by), True)
        return NO_MATCH

    def match(self, name: str) -> Match:
        """`name` as text (`www.example.com`); a name that cannot be listed matches nothing."""
        try:
            return self.match_key(reverse(normalize(name)))
        except ValueError:
            return NO_MATCH

    def match_wire(self, wire: bytes) -> Match:
        """A lowercased wire-format name, decided as the resolver decides it (`wire_to_key`)."""
        return self.match_key(wire_to_key(wire))

    def bits_of_wire(self, wire: bytes) -> int:
        """The categories of a lowercased wire-format query name: the resolver's lookup."""
        if self._trie is None:
            return 0
        return self.match_key(wire_to_key(wire)).bits
