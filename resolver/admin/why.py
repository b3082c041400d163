"""Why a name is (or is not) blocked for a client at a moment: the verdict, the level, the entry.

The resolver's filter stage (`Resolver._answer_for`) is written inline for speed; this follows the same
steps in the same order and also says which rule and which list entry decided. A test asks both the same
questions and requires the same answers.
"""

from __future__ import annotations

import time
from typing import Any

from blocklists.catalog import Catalog
from blocklists.names import BadName, normalize
from resolver.shared.dns import text_to_name
from resolver.shared.identity import Identity
from resolver.shared.lists import Lists
from resolver.shared.policy.effective import PolicyMaker, governing, guest_profile
from resolver.shared.policy.model import PolicyError, parse_mac, parse_time
from resolver.shared.policy.runtime import ALLOWED, PASSED, Policy, Verdict
from resolver.shared.policy.safesearch import restrict_name
from resolver.shared.store.policies import Store
from resolver.worker.directory import find_device


def _suffixes(wire: bytes) -> list[bytes]:
    out, position = [], 0
    while position < len(wire) - 1:
        out.append(wire[position:])
        position += wire[position] + 1
    return out


def _text(wire: bytes) -> str:
    labels, position = [], 0
    while wire[position]:
        labels.append(wire[position + 1 : position + 1 + wire[position]].decode("ascii", "replace"))
        position += wire[position] + 1
    return ".".join(labels)


class Explainer:
    def __init__(self, store: Store | None, maker: PolicyMaker, catalog: Catalog, lists: Lists) -> None:
        self.store = store
        self.maker = maker
        self.catalog = catalog
        self.lists = lists

    async def explain(self, question: dict[str, Any]) -> dict[str, Any]:
        """`question`: name, address, and optionally mac, client_id, cpe_id, at (RFC 3339). Raises
        PolicyError naming the field at fault."""
        name = question.get("name")
        if not isinstance(name, str):
            raise PolicyError("name", "missing: the name to explain")
        try:
            wire = text_to_name(normalize(name))
        except (BadName, ValueError) as exc:
            raise PolicyError("name", str(exc)) from None
        identity = self._identity(question)
        at = parse_time(question.get("at"), "at") if question.get("at") is not None else time.time()
        site = device = None
        profiles = {"guest": guest_profile(self.catalog)}
        if self.store is not None:
            _site_id, site = await self.store.resolve_site(identity.address, identity.cpe_id)
            device = find_device(site, identity) if site is not None else None
            profiles.update(await self.store.load_profiles())
        rule = governing(site, device, profiles)
        policy, until = self.maker.effective(rule, at)
        decision = self._decide(policy, wire)
        return {
            "name": _text(wire), "address": identity.address, "at": at, "valid_until": until,
            "site": site.id if site else None, "timezone": site.timezone if site else None,
            "device": device.id if device else None,
            "group": (device.group if device else site.default_group) if site else None,
            "level": rule.level, **decision,
        }

    @staticmethod
    def _identity(question: dict[str, Any]) -> Identity:
        address = question.get("address")
        if not isinstance(address, str):
            raise PolicyError("address", "missing: the client's address")
        mac = None
        if question.get("mac") is not None:
            try:
                mac = parse_mac(str(question["mac"]))
            except ValueError as exc:
                raise PolicyError("mac", str(exc)) from None
        return Identity(address, mac, question.get("client_id"), question.get("cpe_id"))

    def _decide(self, policy: Policy, wire: bytes) -> dict[str, Any]:
        if policy.block_all is not None:
            rule = "pause" if policy.block_all.reason.startswith("paused") else "schedule"
            return self._verdict(policy.block_all, rule)
        filtered, passed_entry = policy.filtered, None
        if policy.has_lists:
            listed = policy.listed(wire)
            if listed is PASSED:
                filtered = policy.blocked
                passed_entry = _text(next(suffix for suffix in _suffixes(wire) if suffix in policy.passed))
            elif listed is ALLOWED:
                entry = next(suffix for suffix in _suffixes(wire) if suffix in policy.allow)
                return {"verdict": "allowed", "rule": "allow", "entry": _text(entry), "categories": [],
                        "reason": "allowed by policy", **self._safe_search(policy, wire)}
            elif listed is not None:
                entry = next(suffix for suffix in _suffixes(wire) if suffix in policy.deny)
                return {**self._verdict(listed, "deny"), "entry": _text(entry)}  # type: ignore[arg-type]
        match = self.lists.snapshot.matcher.match(_text(wire))
        if match.bits & filtered:
            return {**self._verdict(policy.verdict(match.bits), "category"), "entry": match.listed}
        if passed_entry is not None and match.bits & policy.warned:
            return {"verdict": "allowed", "rule": "continue", "entry": passed_entry,
                    "categories": self.catalog.ids(match.bits), "reason": "continued past the warning",
                    **self._safe_search(policy, wire)}
        return {"verdict": "allowed", "rule": "none", "entry": match.listed if match.bits else None,
                "categories": self.catalog.ids(match.bits), "reason": "", **self._safe_search(policy, wire)}

    def _verdict(self, verdict: Verdict, rule: str) -> dict[str, Any]:
        # The EDE option is code, length, info code, then the text the client sees.
        return {"verdict": str(verdict.action), "rule": rule, "reason": verdict.reason, "entry": None,
                "categories": self.catalog.ids(verdict.categories), "answer": str(verdict.mode),
                "ede_text": verdict.ede[6:].decode("utf-8", "replace")}

    @staticmethod
    def _safe_search(policy: Policy, wire: bytes) -> dict[str, Any]:
        target = restrict_name(wire) if policy.safe_search else None
        return {"safe_search": _text(target) if target else None}
