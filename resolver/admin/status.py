"""The effective status of a site, of each of its groups and of each device: what applies now, why, and until
when, worked out by the resolver's own code (shared/policy/effective.py: `governing`, `in_force`,
`PolicyMaker.effective`; then `decide` for a name no list holds, as the query path would). The subscriber's app
shows it and works out nothing itself, so it cannot disagree with the DNS answers.

Whose status:
- a configured device: that device; a device the site does not know (seen only): an unknown client of the site,
  which the resolver puts in the site's default group;
- a group: a device of that group with no pause or policy of its own (what its members follow);
- the site: a device in no group with nothing of its own (the site's pause, and in network mode its policy).

A status is valid until `valid_until`, the next moment anything in it may change.
"""

from __future__ import annotations

from typing import Any

from blocklists.catalog import Catalog
from resolver.shared.dns import text_to_name
from resolver.shared.policy.decision import Rule, decide
from resolver.shared.policy.effective import PolicyMaker, governing, guest_profile, in_force, schedule_end
from resolver.shared.policy.model import Device, PolicySpec, Site, time_document
from resolver.shared.store.policies import Store

_PROBE = text_to_name("status.bns.invalid")  # a name no list holds: what decides for it is the client's status
_STATES = {Rule.PAUSE: "paused", Rule.SCHEDULE: "scheduled"}


async def profiles_of(store: Store, catalog: Catalog) -> dict[str, PolicySpec]:
    """The profiles a policy may name: the built-in guest profile and the stored ones."""
    return {"guest": guest_profile(catalog), **await store.load_profiles()}


def status_of(
    site: Site, device: Device | None, maker: PolicyMaker, profiles: dict[str, PolicySpec], now: float
) -> dict[str, Any]:
    """The status of a client of `site` known as `device` (None: a device the site does not know), at `now`."""
    rule = governing(site, device, profiles)
    policy, valid_until = maker.effective(rule, now)
    state = in_force(rule, now)
    verdict = decide(policy, _PROBE, 0).verdict
    shown = _STATES.get(verdict.rule, "ok") if verdict is not None else "ok"
    blocking = state.blocking
    schedules = [
        {
            "name": schedule.name,
            "block": "all" if schedule.block_all else list(schedule.categories),
            "until": time_document(schedule_end(schedule, rule.zone, now)),
        }
        for schedule in state.schedules
    ]
    pause = {"level": state.pause[1], "until": time_document(state.pause[0])} if state.pause is not None else None
    schedule = next((entry for entry in schedules if blocking is not None and entry["name"] == blocking.name), None)
    ending = {"paused": pause, "scheduled": schedule}.get(shown)
    return {
        "state": shown,
        "until": ending["until"] if ending is not None else None,
        "pause": pause,
        "schedule": schedule,
        "schedules": schedules,
        "level": rule.level,
        "profile": rule.profile,
        "group": rule.group,
        "membership": rule.membership,
        "valid_until": time_document(valid_until),
    }


def site_status(site: Site, maker: PolicyMaker, profiles: dict[str, PolicySpec], now: float) -> dict[str, Any]:
    """The status of the site, of each of its groups and of each configured device, at `now`."""
    return {
        "at": time_document(now),
        "site": status_of(site, Device(""), maker, profiles, now),
        "groups": {group: status_of(site, Device("", group=group), maker, profiles, now) for group in site.groups},
        "devices": {device.id: status_of(site, device, maker, profiles, now) for device in site.devices.values()},
    }
