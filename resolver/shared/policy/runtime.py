"""The effective policy of one client at one moment, and the verdicts it gives.

A Policy is what the query path needs to decide in a few attribute reads: a verdict that blocks everything
(a pause, an active block-all schedule) or none; the allow and deny names; the category bits it blocks and
warns on; safe search; how a blocked name is answered. The decision for a set of matched categories is a
Verdict, made once per (policy, categories) and then reused: the answer builder's memo is keyed on the
Verdict object, and the verdict with its reason travels with the answer.

Precedence inside one policy: block-all beats allow, allow beats deny, deny beats categories; a name the
device passed ("continue anyway") is judged on the blocked categories only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from blocklists.catalog import Catalog
from resolver.shared.dns import EdeCode, ede_option


class Action(StrEnum):
    BLOCK = "blocked"
    WARN = "warned"


class AnswerMode(StrEnum):
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    NULL = "null"  # 0.0.0.0 and ::
    PAGE = "page"  # the block (or warning) page's addresses


_NULL_ADDRESSES = ("0.0.0.0", "::")


@dataclass(frozen=True, eq=False)
class Verdict:
    """Why and how one query is answered without asking upstream. Compared by identity (memo keys)."""

    action: Action
    categories: int
    reason: str  # "pornography", "denied by policy", "paused", "schedule bedtime"
    ede: bytes  # the whole EDE option, ready to append to an OPT record
    mode: AnswerMode
    ipv4: tuple[bytes, ...]  # packed addresses answered for A in NULL/PAGE mode
    ipv6: tuple[bytes, ...]
    ttl: int


@dataclass(frozen=True)
class Answering:
    """How blocked names are answered on this deployment: the default mode, the pages, the TTL."""

    mode: AnswerMode
    block_page: tuple[str, ...]
    warning_page: tuple[str, ...]
    ttl: int

    def verdict(self, action: Action, categories: int, reason: str, code: EdeCode, text: str,
                mode: AnswerMode | None = None) -> Verdict:
        mode = mode or self.mode
        page = self.block_page
        if action is Action.WARN and self.warning_page:
            mode, page = AnswerMode.PAGE, self.warning_page
        addresses = _NULL_ADDRESSES if mode is AnswerMode.NULL else page if mode is AnswerMode.PAGE else ()
        parsed = [ipaddress.ip_address(address) for address in addresses]
        return Verdict(
            action, categories, reason, ede_option(code, text), mode,
            tuple(a.packed for a in parsed if a.version == 4), tuple(a.packed for a in parsed if a.version == 6),
            self.ttl,
        )


ALLOWED = object()  # `Policy.listed` result: the name is on the policy's allow list
PASSED = object()  # `Policy.listed` result: the device continued past a warning for the name: warnings lifted
_LISTED_MEMO = 4096


@dataclass(eq=False)
class Policy:
    """The effective policy of a client now. Immutable once made; shared by every client it applies to."""

    blocked: int
    warned: int
    answering: Answering
    catalog: Catalog
    mode: AnswerMode | None = None  # None: the deployment's default mode
    allow: frozenset[bytes] = frozenset()  # lowercased wire names; each covers its subdomains
    deny: frozenset[bytes] = frozenset()
    passed: frozenset[bytes] = frozenset()  # names whose warnings are lifted for this device
    block_all: Verdict | None = None  # a pause or an active block-all schedule
    safe_search: bool = False
    level: str = "default"  # which policy decided: device, group, subscriber or default
    filtered: int = field(init=False)
    has_lists: bool = field(init=False)
    plain: bool = field(init=False)  # no block-all, no allow/deny, no safe search: the common case, one check
    _verdicts: dict[int, Verdict] = field(init=False, default_factory=dict)
    _listed: dict[bytes, object] = field(init=False, default_factory=dict)
    _denied: Verdict | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.warned &= ~self.blocked  # a category both blocked and warned is blocked
        self.filtered = self.blocked | self.warned
        self.has_lists = bool(self.allow or self.deny or self.passed)
        self.plain = self.block_all is None and not self.has_lists and not self.safe_search

    def verdict(self, bits: int) -> Verdict:
        """The verdict for a name in categories `bits`, which must intersect `filtered`."""
        hit = bits & self.filtered
        verdict = self._verdicts.get(hit)
        if verdict is None:
            verdict = self._verdicts[hit] = self._decide(hit)
        return verdict

    def listed(self, name: bytes) -> object:
        """ALLOWED, the deny Verdict, PASSED or None, for a lowercased wire name (suffixes on label
        boundaries)."""
        result = self._listed.get(name, self)
        if result is self:
            result = self._match_lists(name)
            if len(self._listed) >= _LISTED_MEMO:
                self._listed.clear()
            self._listed[name] = result
        return result

    def _match_lists(self, name: bytes) -> object:
        suffixes = []
        pos = 0
        while name[pos]:
            suffixes.append(name[pos:])
            pos += name[pos] + 1
        if any(suffix in self.allow for suffix in suffixes):
            return ALLOWED
        if any(suffix in self.deny for suffix in suffixes):
            if self._denied is None:
                self._denied = self.answering.verdict(Action.BLOCK, 0, "denied by policy", EdeCode.BLOCKED,
                                                      "blocked: denied by policy", self.mode)
            return self._denied
        if any(suffix in self.passed for suffix in suffixes):
            return PASSED
        return None

    def _decide(self, hit: int) -> Verdict:
        blocked = hit & self.blocked
        if blocked:
            names = ", ".join(self.catalog.ids(blocked))
            return self.answering.verdict(Action.BLOCK, blocked, names, EdeCode.BLOCKED, f"blocked: {names}",
                                          self.mode)
        names = ", ".join(self.catalog.ids(hit))
        return self.answering.verdict(Action.WARN, hit, names, EdeCode.FILTERED, f"Web Protect: {names}",
                                      self.mode)
