"""The worker's query path and `why` give the same verdict, in the same form of answer, for any policy: random
policies, groups, pauses, schedules, allow/deny entries, passes, answer modes, bypass canaries on or off, list
names and CNAME chains (hypothesis), asked of a Resolver with no socket (its directory over a real policy file)
and of the Explainer over the same file, at the same moment. Both call the one `decide`; this holds them to it."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.admin.why import Explainer
from resolver.shared.dns import name_to_text, text_to_name
from resolver.shared.policy.model import time_document
from resolver.shared.policy.service import PolicyService
from tests.conftest import answer_addresses
from tests.worker.test_pipeline import CATALOG, Pipeline, ScriptedForwarder, ede_text, query

pytestmark = pytest.mark.unit
LONDON = ZoneInfo("Europe/London")
NOW = datetime(2026, 11, 24, 21, 30, tzinfo=LONDON).timestamp()  # a Tuesday evening
MAC = "02:00:00:00:00:01"
# The list (conftest's `lists`): porn.example (pornography, blocked by default), drug.example (drugs),
# malware.example (malware: Web Protect), dns.google (encrypted-dns, blocked by default). The bypass canaries
# are no list's (the policy's `canaries`). The rest are listed nowhere.
NAMES = [
    "porn.example",
    "a.porn.example",
    "drug.example",
    "malware.example",
    "x.malware.example",
    "fine.example",
    "other.example",
    "dns.google",
    "use-application-dns.net",
    "mask.icloud.com",
]
# Names no list can hold (a dot or another byte inside a label) but a query can carry: each is decided as its
# closest parent a list can hold, by the resolver and by why alike.
UNLISTABLE = {
    "a\\.b.malware.example": "malware.example",
    "x\\000y.porn.example": "porn.example",
    "\\255.drug.example": "drug.example",
    "q.a\\.b.fine.example": "fine.example",
}
CATEGORIES = ["pornography", "drugs", "malware", "hate", "encrypted-dns"]
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _moment(offset_minutes: int) -> str:
    return time_document(NOW + offset_minutes * 60)


names = st.sampled_from(NAMES)
asked = st.sampled_from(NAMES + list(UNLISTABLE))
schedules = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["bedtime", "school"]),
            "days": st.lists(st.sampled_from(DAYS), min_size=1, max_size=3, unique=True),
            "from": st.sampled_from(["07:00", "21:00", "22:00"]),
            "to": st.sampled_from(["07:00", "08:00", "21:45"]),
            "block": st.one_of(
                st.just("all"), st.lists(st.sampled_from(CATEGORIES), min_size=1, max_size=2, unique=True)
            ),
        }
    ),
    max_size=2,
    unique_by=lambda schedule: schedule["name"],
)
policies = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "block": st.lists(st.sampled_from(CATEGORIES), max_size=3, unique=True),
            "web_protect": st.booleans(),
            "allow": st.lists(names, max_size=2, unique=True),
            "deny": st.lists(names, max_size=2, unique=True),
            "schedules": schedules,
            "canaries": st.booleans(),
            "answer": st.sampled_from(["nxdomain", "nodata", "null"]),
        },
    ),
)
# Mostly no pause: three levels can each be paused, and a pause hides every other rule.
pauses = st.sampled_from([None] * 9 + ["forever", _moment(-30), _moment(30)])
passes = st.dictionaries(names, st.integers(-60, 60).map(_moment), max_size=2)


@st.composite
def sites(draw: st.DrawFn) -> dict[str, Any]:
    device: dict[str, Any] = {
        "macs": [MAC],
        "policy": draw(policies),
        "paused_until": draw(pauses),
        "passes": draw(passes),
    }
    if draw(st.booleans()):
        device["group"] = "kids"
    return {
        "networks": ["127.0.0.0/8"],
        "timezone": "Europe/London",
        "mode": draw(st.sampled_from(["device", "network"])),
        "policy": draw(policies),
        "paused_until": draw(pauses),
        "default_group": draw(st.sampled_from([None, "kids"])),
        "groups": {"kids": {"policy": draw(policies), "paused_until": draw(pauses)}},
        "devices": {"pc": device},
    }


def worker_verdict(answer: bytes) -> tuple[str, str | None, str | None]:
    """(verdict, EDE text, the answer's form: nxdomain, nodata or null) of an A query's answer."""
    text = ede_text(answer)
    if text is None:
        return "allowed", None, None
    message = dns.message.from_wire(answer)
    form = "nxdomain" if message.rcode() == dns.rcode.NXDOMAIN else "null" if answer_addresses(message) else "nodata"
    return ("warned" if text.startswith("Web Protect") else "blocked"), text, form


async def both(lists: Path, directory: Path, site: dict[str, Any], name: str, chain: list[str]) -> tuple[Any, Any]:
    spelled = name_to_text(text_to_name(name))  # as the scripted upstream is asked it (`a\\046b`, not `a\\.b`)
    pipeline = Pipeline(lists, directory / "policies.json", ScriptedForwarder({spelled: chain}), now=NOW)
    await PolicyService(pipeline.store).put_site("home", site)
    answer = await pipeline.ask(query(name, mac=MAC))
    explainer = Explainer(pipeline.store, pipeline.resolver.directory.maker, CATALOG, pipeline.resolver.lists)
    why = await explainer.explain(
        {"name": name, "address": "127.0.0.1", "mac": MAC, "at": time_document(NOW), "cnames": chain}
    )
    return worker_verdict(answer), (why["verdict"], why.get("ede_text"), why.get("answer"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(site=sites(), name=asked, chain=st.lists(asked, max_size=2, unique=True))
def test_the_query_path_and_why_agree(lists, site, name, chain):
    chain = [target for target in chain if target != name]
    with tempfile.TemporaryDirectory() as directory:
        seen, explained = asyncio.run(both(lists, Path(directory), site, name, chain))
    assert seen == explained, f"{name} via {chain}: the resolver says {seen}, why says {explained}"


def test_the_comparison_can_tell_verdicts_apart(lists, tmp_path):
    """What the property compares differs between an allowed, a blocked and a warned name."""
    site = {"networks": ["127.0.0.0/8"], "mode": "network", "policy": {"block": ["drugs"]}}
    verdicts = {
        name: asyncio.run(both(lists, tmp_path / name, site, name, []))
        for name in ("fine.example", "drug.example", "malware.example")
    }
    for name, (seen, explained) in verdicts.items():
        (tmp_path / name).mkdir(exist_ok=True)
        assert seen == explained, name
    assert {seen[0] for seen, _ in verdicts.values()} == {"allowed", "blocked", "warned"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(site=sites(), hidden=st.sampled_from(list(UNLISTABLE)))
def test_a_name_no_list_can_hold_gets_the_verdict_of_its_closest_parent_one_can(lists, site, hidden):
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        seen, _ = asyncio.run(both(lists, Path(first), site, hidden, []))
        assert seen == asyncio.run(both(lists, Path(second), site, UNLISTABLE[hidden], []))[0], hidden
