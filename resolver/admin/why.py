"""Why a name is (or is not) blocked for a client at a moment: the verdict, the level, the entry.

It identifies the client as a worker would, takes the governing policy at that moment (effective.py) and asks
the same `decide` the query path asks (decision.py), then says which rule and which list entry decided.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from blocklists.catalog import Catalog
from blocklists.names import BadName, normalize
from resolver.shared.dns import name_to_text, text_to_name
from resolver.shared.identity import Identity
from resolver.shared.lists import Lists
from resolver.shared.policy.decision import Policy, Rule, Verdict, decide, judge_chain
from resolver.shared.policy.effective import PolicyMaker, find_device, governing, guest_profile
from resolver.shared.policy.model import Device, PolicyError, Site, parse_mac, parse_time
from resolver.shared.policy.safesearch import restrict_name
from resolver.shared.store.policies import Store


def _suffixes(wire: bytes) -> list[bytes]:
    out, position = [], 0
    while position < len(wire) - 1:
        out.append(wire[position:])
        position += wire[position] + 1
    return out


def _wire_name(text: object, field: str) -> bytes:
    if not isinstance(text, str):
        raise PolicyError(field, "missing: a name")
    try:
        # Escapes (`a\.b.example`, `\255.example`) spell names no list can hold but a query can carry.
        return text_to_name(text if "\\" in text else normalize(text))
    except (BadName, ValueError) as exc:
        raise PolicyError(field, str(exc)) from None


def _text(question: dict[str, Any], field: str) -> str | None:
    """An optional field of the question that must be text when given (an EDNS option carries at most 255
    bytes, so no more)."""
    value = question.get(field)
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 255):
        raise PolicyError(field, f"must be text of 1 to 255 characters, got {value!r}")
    return value


def _moment(value: object) -> float:
    """The question's `at` (now when not given): an RFC 3339 time whose day, in any time zone, a date can hold
    (a schedule reads it in the site's zone)."""
    at = parse_time(value, "at")
    if at is None:
        return time.time()
    try:
        for edge in (at - 86400, at + 86400):
            datetime.fromtimestamp(edge, UTC)
    except (OverflowError, ValueError, OSError):
        raise PolicyError("at", f"{value!r} is not a time such as 2026-11-23T21:00:00Z") from None
    return at


class Explainer:
    def __init__(self, store: Store | None, maker: PolicyMaker, catalog: Catalog, lists: Lists) -> None:
        self.store = store
        self.maker = maker
        self.catalog = catalog
        self.lists = lists

    async def explain(
        self, question: dict[str, Any], device_of: Callable[[Site], Device | None] | None = None
    ) -> dict[str, Any]:
        """`question`: name, address, and optionally mac, client_id, cpe_id, at (RFC 3339), and cnames: the
        CNAME chain an upstream answered the name with, to judge as the resolver would. `device_of`: which
        device of the client's site it is, when not the one its identity names (the pages tell a device behind
        a router by the page address it came to). Raises PolicyError naming the field at fault."""
        wire = _wire_name(question.get("name"), "name")
        chain = question.get("cnames") or []
        if not isinstance(chain, list):
            raise PolicyError("cnames", "must be a list of names")
        targets = [_wire_name(target, f"cnames[{index}]") for index, target in enumerate(chain)]
        identity = self._identity(question)
        at = _moment(question.get("at"))
        site = device = None
        profiles = {"guest": guest_profile(self.catalog)}
        if self.store is not None:
            located = await self.store.locate(identity.address, identity.cpe_id)
            site = await self.store.load_site(located[0]) if located is not None else None
            if site is not None:
                device = find_device(site, identity) if device_of is None else device_of(site)
            profiles.update(await self.store.load_profiles())
        rule = governing(site, device, profiles)
        policy, until = self.maker.effective(rule, at)
        decision = self._decide(policy, wire, targets)
        return {
            "name": name_to_text(wire),
            "address": identity.address,
            "at": at,
            "valid_until": until,
            "site": site.id if site else None,
            "timezone": site.timezone if site else None,
            "device": device.id if device else None,
            "group": rule.group,
            "level": rule.level,
            **decision,
        }

    @staticmethod
    def _identity(question: dict[str, Any]) -> Identity:
        """The client the question names, as a worker would know it. Raises PolicyError naming the field."""
        address = question.get("address")
        if not isinstance(address, str):
            raise PolicyError("address", "missing: the client's address")
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise PolicyError(
                "address", f"{address!r} is not an IP address (such as 192.0.2.7 or 2001:db8::7)"
            ) from None
        mac = None
        if question.get("mac") is not None:
            try:
                mac = parse_mac(_text(question, "mac") or "")
            except ValueError as exc:
                raise PolicyError("mac", str(exc)) from None
        return Identity(address, mac, _text(question, "client_id"), _text(question, "cpe_id"))

    def _decide(self, policy: Policy, wire: bytes, targets: list[bytes]) -> dict[str, Any]:
        """The resolver's decision (the same functions), and which entry of which list made it."""
        decision = decide(policy, wire, self.lists.snapshot.categories(wire))
        if decision.verdict is not None:
            return {**self._verdict(decision.verdict), "entry": self._entry(policy, wire, decision.rule)}
        if targets and decision.chain is not None:
            found = judge_chain(policy, targets, self.lists.snapshot, decision.chain)
            if found is not None:
                via, verdict = found
                return {
                    **self._verdict(verdict),
                    "entry": self._entry(policy, via, verdict.rule),
                    "via": name_to_text(via),
                }
        match = self.lists.snapshot.matcher.match_wire(wire)
        explained = {
            "verdict": "allowed",
            "rule": str(decision.rule),
            "entry": self._entry(policy, wire, decision.rule),
            "categories": self.catalog.ids(match.bits),
            **self._safe_search(policy, wire),
        }
        if decision.rule is Rule.ALLOW:
            return {**explained, "categories": [], "reason": "allowed by policy"}
        if decision.rule is Rule.CONTINUE:
            return {**explained, "reason": "continued past the warning"}
        return {**explained, "reason": ""}

    def _entry(self, policy: Policy, wire: bytes, rule: Rule) -> str | None:
        """The list entry behind a decision: the allow, deny or pass name, or the listed name matched."""
        names = {Rule.ALLOW: policy.allow, Rule.DENY: policy.deny, Rule.CONTINUE: policy.passed}.get(rule)
        if names is not None:
            return name_to_text(next(suffix for suffix in _suffixes(wire) if suffix in names))
        if rule in (Rule.PAUSE, Rule.SCHEDULE):
            return None
        if rule is Rule.CANARY:  # an entry of the policy's own list (decision.CANARIES)
            return name_to_text(wire)
        return self.lists.snapshot.matcher.match_wire(wire).listed

    def _verdict(self, verdict: Verdict) -> dict[str, Any]:
        # The EDE option is code, length, info code, then the text the client sees.
        return {
            "verdict": str(verdict.action),
            "rule": str(verdict.rule),
            "reason": verdict.reason,
            "categories": self.catalog.ids(verdict.categories),
            "answer": str(verdict.mode),
            "ede_text": verdict.ede[6:].decode("utf-8", "replace"),
        }

    @staticmethod
    def _safe_search(policy: Policy, wire: bytes) -> dict[str, Any]:
        target = restrict_name(wire) if policy.safe_search else None
        return {"safe_search": name_to_text(target) if target else None}
