"""The decision for one name asked by one client at one moment: the one place the filter's rules are written.

`effective.py` settles which policy governs a client now (device, group, subscriber or default; pauses and
schedules); the result is a Policy. `decide` then judges a name by it, in this order:

0. a bypass canary (`CANARIES`), unless the policy's `canaries` are off: NXDOMAIN, whatever the answer mode.
   First: a pause or a deny answered with an address, or an allow, would tell the browser or phone asking
   that this network does not filter, and it would then send its DNS around the filter;
1. block-all (a pause in force, an active block-all schedule): blocked;
2. the name (or a parent) on the allow list: resolves, and its CNAME chain is not judged;
3. on the deny list: blocked;
4. a pass ("continue anyway") on the name: Web Protect's warnings are lifted for it and along its CNAME chain;
5. its categories include one the policy blocks (blocked) or warns on (warned; blocked wins when both);
6. otherwise it resolves, and each name of its CNAME chain is judged by 2–5 with what 4 lifted (`judge_chain`).

The worker's query path and `why` (admin) both call `decide`; nothing else judges a name. A Policy is made
to be judged fast: the decisions and verdicts it gives are made once and reused (the answer builder's memo is
keyed on the Verdict object), and the common one, "resolves", is ready-made.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from blocklists.catalog import BUILT_IN_BIT, Catalog
from resolver.shared.dns import EdeCode, ede_option, text_to_name


class Action(StrEnum):
    BLOCK = "blocked"
    WARN = "warned"


class AnswerMode(StrEnum):
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    NULL = "null"  # 0.0.0.0 and ::
    PAGE = "page"  # the block (or warning) page's addresses


_NULL_ADDRESSES = ("0.0.0.0", "::")

# The names a browser or phone asks to learn whether the network filters; NXDOMAIN tells it that it does, and it
# then keeps its DNS on this network: Firefox's DNS-over-HTTPS canary and iCloud Private Relay's two (Apple's
# documented way for a network to say it filters). No list holds them: they carry the CANARY bit among their
# categories (resolver/shared/lists.py adds it where a name's categories are looked up), so the query path
# tells them apart by the categories it looks up anyway.
CANARY = 1 << BUILT_IN_BIT
CANARIES = {text_to_name(name): CANARY for name in ("use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com")}


class Rule(StrEnum):
    """Which of the rules above decided."""

    CANARY = "canary"
    PAUSE = "pause"
    SCHEDULE = "schedule"
    ALLOW = "allow"
    DENY = "deny"
    CONTINUE = "continue"
    CATEGORY = "category"
    NONE = "none"


@dataclass(frozen=True, eq=False)
class Verdict:
    """Why and how one query is answered without asking upstream. Compared by identity (memo keys)."""

    action: Action
    rule: Rule
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

    def verdict(
        self,
        action: Action,
        rule: Rule,
        categories: int,
        reason: str,
        code: EdeCode,
        text: str,
        mode: AnswerMode | None = None,
    ) -> Verdict:
        mode = mode or self.mode
        page = self.block_page
        if action is Action.WARN and self.warning_page:
            mode, page = AnswerMode.PAGE, self.warning_page
        addresses = _NULL_ADDRESSES if mode is AnswerMode.NULL else page if mode is AnswerMode.PAGE else ()
        parsed = [ipaddress.ip_address(address) for address in addresses]
        return Verdict(
            action,
            rule,
            categories,
            reason,
            ede_option(code, text),
            mode,
            tuple(a.packed for a in parsed if a.version == 4),
            tuple(a.packed for a in parsed if a.version == 6),
            self.ttl,
        )


@dataclass(frozen=True, eq=False, slots=True)
class Decision:
    """What `decide` says of a name: its verdict (None: it resolves), the rule that decided, and the
    categories its CNAME chain is judged by (None: not judged)."""

    verdict: Verdict | None
    rule: Rule
    chain: int | None


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
    canaries: bool = True  # answer the bypass canaries (CANARIES) NXDOMAIN
    canary: int = field(init=False)  # CANARY when it does, else 0
    filtered: int = field(init=False)
    has_lists: bool = field(init=False)
    plain: bool = field(init=False)  # no block-all, no allow/deny, no safe search: the common case, one check
    resolves: Decision = field(init=False)  # the common decision, ready-made
    _verdicts: dict[int, Verdict] = field(init=False, default_factory=dict)
    _decisions: dict[Verdict | tuple[Rule, int | None], Decision] = field(init=False, default_factory=dict)
    _listed: dict[bytes, object] = field(init=False, default_factory=dict)
    _denied: Verdict | None = field(init=False)  # set below: compiled, an init=False default is never set
    _canaried: Decision | None = field(init=False)

    def __post_init__(self) -> None:
        self.warned &= ~self.blocked  # a category both blocked and warned is blocked
        self.filtered = self.blocked | self.warned
        self.canary = CANARY if self.canaries else 0
        self.has_lists = bool(self.allow or self.deny or self.passed)
        self.plain = self.block_all is None and not self.has_lists and not self.safe_search
        self.resolves = Decision(None, Rule.NONE, self.filtered)
        self._denied = None
        self._canaried = None

    def canaried(self) -> Decision:
        """The decision for a bypass canary: NXDOMAIN whatever the policy's answer mode (an address, in null
        or page mode, would tell the asker that the network does not filter)."""
        made = self._canaried
        if made is None:
            verdict = self.answering.verdict(
                Action.BLOCK,
                Rule.CANARY,
                0,
                "bypass canary",
                EdeCode.BLOCKED,
                "blocked: this network filters DNS",
                AnswerMode.NXDOMAIN,
            )
            made = self._canaried = Decision(verdict, Rule.CANARY, None)
        return made

    def answered(self, verdict: Verdict) -> Decision:
        """The decision that answers with `verdict` (made once per policy and verdict)."""
        made = self._decisions.get(verdict)
        if made is None:
            made = self._decisions[verdict] = Decision(verdict, verdict.rule, None)
        return made

    def resolving(self, rule: Rule, chain: int | None) -> Decision:
        """The decision that lets the name resolve (made once per policy, rule and chain)."""
        key = (rule, chain)
        made = self._decisions.get(key)
        if made is None:
            made = self._decisions[key] = Decision(None, rule, chain)
        return made

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
                self._denied = self.answering.verdict(
                    Action.BLOCK,
                    Rule.DENY,
                    0,
                    "denied by policy",
                    EdeCode.BLOCKED,
                    "blocked: denied by policy",
                    self.mode,
                )
            return self._denied
        if any(suffix in self.passed for suffix in suffixes):
            return PASSED
        return None

    def _decide(self, hit: int) -> Verdict:
        blocked = hit & self.blocked
        if blocked:
            names = ", ".join(self.catalog.ids(blocked))
            return self.answering.verdict(
                Action.BLOCK, Rule.CATEGORY, blocked, names, EdeCode.BLOCKED, f"blocked: {names}", self.mode
            )
        names = ", ".join(self.catalog.ids(hit))
        return self.answering.verdict(
            Action.WARN, Rule.CATEGORY, hit, names, EdeCode.FILTERED, f"Web Protect: {names}", self.mode
        )


class Categories(Protocol):
    """Where a name's categories are found: a list snapshot (resolver.shared.lists)."""

    def categories(self, name: bytes) -> int: ...


def decide(policy: Policy, name: bytes, bits: int, judged: int | None = None) -> Decision:
    """The decision for a lowercased wire name in categories `bits`, by the rules of the module's docstring,
    in their order. `judged`: the categories that count for a name of a CNAME chain (the asked name's
    decision's `chain`)."""
    if bits & policy.canary:
        return policy.canaried()
    if policy.block_all is not None:
        return policy.answered(policy.block_all)
    filtered = policy.filtered if judged is None else judged
    passed = False
    if policy.has_lists:
        listed = policy.listed(name)
        if listed is ALLOWED:
            return policy.resolving(Rule.ALLOW, None)
        if listed is PASSED:
            filtered, passed = policy.blocked, True
        elif listed is not None:
            return policy.answered(listed)  # type: ignore[arg-type]  # the deny verdict
    if bits & filtered:
        return policy.answered(policy.verdict(bits))
    if filtered == policy.filtered:
        return policy.resolves
    return policy.resolving(Rule.CONTINUE if passed and bits & policy.warned else Rule.NONE, filtered)


def judge_chain(
    policy: Policy, targets: Sequence[bytes], lists: Categories, judged: int
) -> tuple[bytes, Verdict] | None:
    """The first name of an answer's CNAME chain that the policy blocks or warns on, with its verdict."""
    if not (judged or policy.has_lists):
        return None
    for target in targets:
        verdict = decide(policy, target, lists.categories(target), judged).verdict
        if verdict is not None:
            return target, verdict
    return None
