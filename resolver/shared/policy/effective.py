"""Which policy governs a client, and what it means at a given moment. The precedence is written here, once:

1. A pause beats everything but the bypass canaries of the governing policy (decision.py: they are answered
   NXDOMAIN first): the device's, its group's, or the site's (whichever is in force).
2. An active block-all schedule of the governing policy comes next.
3. The governing policy, most specific first:
   - `device` mode (Wi-Fi Security Controls): the device's policy, else its group's (a device the site does
     not know counts as in the site's `default_group`), else the global default. The subscriber's own
     site-wide policy is off.
   - `network` mode (Broadband Network Security): the subscriber's policy, else the global default;
     device and group policies are not consulted.
   - A client of no known site: the global default.
4. Inside that policy: allow beats deny beats categories (see runtime.Policy); a policy naming a profile
   starts from the profile's fields and overrides them with its own.
5. A device's "continue anyway" passes (from the warning page) lift Web Protect warnings for their names
   until they end, in whatever policy governs; they never lift a block, a deny or a pause.

Schedules are read in the site's time zone (zoneinfo): a window whose end is at or before its start crosses
midnight into the next day, and DST changes move the wall clock, not the window. An effective policy is
valid until the next schedule boundary or pause end (at most an hour), then made again.

The admin API's status of a site, a group or a device (admin/status.py) is read from the same `governing` and
`in_force`, so what the app shows is what the resolver does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from blocklists.catalog import Catalog
from resolver.shared.config import PolicySettings
from resolver.shared.dns import EdeCode
from resolver.shared.errors import ConfigError
from resolver.shared.identity import Identity
from resolver.shared.policy.decision import Action, Answering, AnswerMode, Policy, Rule, Verdict
from resolver.shared.policy.model import Device, PolicySpec, Schedule, Site, wire_names

log = logging.getLogger(__name__)

MAX_VALIDITY = 3600.0  # an effective policy is made again at least this often, whatever the schedules say
_INTERNED_LIMIT = 65536  # specs are replaced when sites change; the old entries go when this fills
UTC_ZONE = ZoneInfo("UTC")


@dataclass(frozen=True, eq=False)
class Governing:
    """What decides for one client, independent of time: the policy, where it comes from, the pauses."""

    spec: PolicySpec | None  # profile already applied; None: the global default
    level: str  # device, group, subscriber, default
    pauses: tuple[tuple[float, str], ...]  # (paused until, level)
    zone: ZoneInfo
    passes: tuple[tuple[str, float], ...] = ()  # the device's (name, until)
    profile: str | None = None  # the profile the governing policy names
    group: str | None = None  # the group the client is in
    membership: str = "none"  # how: own (the device's group), default (the site's default_group), none


def governing(site: Site | None, device: Device | None, profiles: dict[str, PolicySpec]) -> Governing:
    """The precedence rules above, for a client of `site` identified as `device` (either may be None)."""
    if site is None:
        return Governing(None, "default", (), UTC_ZONE)
    group_id, membership = (device.group, "own") if device is not None else (site.default_group, "default")
    group = site.groups.get(group_id) if group_id is not None else None
    pauses = tuple(
        (entity.paused_until, level)
        for entity, level in ((device, "device"), (group, "group"), (site, "subscriber"))
        if entity is not None and entity.paused_until is not None
    )
    spec, level = None, "default"
    if site.mode == "device":
        if device is not None and device.policy is not None:
            spec, level = device.policy, "device"
        elif group is not None and group.policy is not None:
            spec, level = group.policy, "group"
    elif site.policy is not None:
        spec, level = site.policy, "subscriber"
    return Governing(
        _with_profile(spec, profiles),
        level,
        pauses,
        site.zone,
        device.passes if device is not None else (),
        spec.profile if spec is not None else None,
        group.id if group is not None else None,
        membership if group is not None else "none",
    )


def _with_profile(spec: PolicySpec | None, profiles: dict[str, PolicySpec]) -> PolicySpec | None:
    if spec is None or spec.profile is None:
        return spec
    base = profiles.get(spec.profile)
    if base is None:
        log.warning("policy names profile %r, which does not exist; using its own fields only", spec.profile)
        base = PolicySpec()
    return spec.over(base)


def guest_profile(catalog: Catalog) -> PolicySpec:
    """The built-in guest profile: the eight content categories blocked, Web Protect on."""
    return PolicySpec(block=tuple(c.id for c in catalog if c.action == "block"), web_protect=True)


def answering_from(settings: PolicySettings) -> Answering:
    return Answering(AnswerMode(settings.answer), settings.block_page, settings.warning_page, settings.blocked_ttl)


def default_policy(settings: PolicySettings, catalog: Catalog) -> Policy:
    """The global default policy from the config; unknown or doubly listed categories name their key."""
    for key, ids in (("policy.block", settings.block), ("policy.warn", settings.warn)):
        unknown = [category for category in ids or () if category not in catalog]
        if unknown:
            raise ConfigError(
                f"{key}: {', '.join(map(repr, unknown))} not in the catalogue "
                f"(known: {', '.join(c.id for c in catalog)})"
            )
    both = set(settings.block or ()) & set(settings.warn or ())
    if both:
        raise ConfigError(f"policy.warn: {', '.join(sorted(both))} also in policy.block (a category is one or other)")
    blocked = catalog.mask(settings.block) if settings.block is not None else catalog.default_mask("block")
    warned = catalog.mask(settings.warn) if settings.warn is not None else catalog.default_mask("warn")
    return Policy(blocked, warned, answering_from(settings), catalog)


def _active(schedule: Schedule, weekday: int, minute: int) -> bool:
    if schedule.start < schedule.end:
        return weekday in schedule.days and schedule.start <= minute < schedule.end
    # crosses midnight (or lasts a whole day when start == end): the evening part, then the morning after
    return (weekday in schedule.days and minute >= schedule.start) or (
        (weekday - 1) % 7 in schedule.days and minute < schedule.end
    )


def _running(schedules: tuple[Schedule, ...], zone: ZoneInfo, now: float) -> tuple[Schedule, ...]:
    local = datetime.fromtimestamp(now, zone)
    minute = local.hour * 60 + local.minute
    return tuple(schedule for schedule in schedules if _active(schedule, local.weekday(), minute))


def _next_boundary(schedules: tuple[Schedule, ...], zone: ZoneInfo, now: float) -> float:
    """The first instant after `now` at which any schedule starts or ends (wall clock in `zone`)."""
    today = datetime.fromtimestamp(now, zone).date()
    best = math.inf
    for schedule in schedules:
        for offset in range(8):
            day = today + timedelta(days=offset)
            for minute in (schedule.start, schedule.end):
                moment = datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=zone).timestamp()
                if now < moment < best:
                    best = moment
    return best


def schedule_end(schedule: Schedule, zone: ZoneInfo, now: float) -> float:
    """When a schedule running at `now` stops: the first of its boundaries at which it is not running (a window
    that runs into the next, such as two whole days in a row, goes on); inf if it never stops."""
    moment = now
    for _ in range(16):  # at most two boundaries a day: more than a week of windows
        moment = _next_boundary((schedule,), zone, moment)
        if moment == math.inf or not _running((schedule,), zone, moment):
            return moment
    return math.inf


@dataclass(frozen=True, eq=False)
class InForce:
    """What of a Governing applies at one moment, and until when."""

    pause: tuple[float, str] | None  # (paused until, level) of the pause in force
    schedules: tuple[Schedule, ...]  # the governing policy's schedules running now
    passed: tuple[str, ...]  # the names whose warnings the device's passes lift now
    until: float  # the next moment any of it may change (at most MAX_VALIDITY away)

    @property
    def blocking(self) -> Schedule | None:
        """The block-all schedule that blocks everything, unless a pause does already."""
        return next((schedule for schedule in self.schedules if schedule.block_all), None)


def in_force(rule: Governing, now: float) -> InForce:
    """The pause, schedules and passes of `rule` in force at `now`: what PolicyMaker.effective makes a policy of,
    and what the admin API reports as a client's status."""
    until = now + MAX_VALIDITY
    pause = next(((paused_until, level) for paused_until, level in rule.pauses if now < paused_until), None)
    if pause is not None:
        until = min(until, pause[0])
    running: tuple[Schedule, ...] = ()
    spec = rule.spec
    if spec is not None and spec.schedules:
        running = _running(spec.schedules, rule.zone, now)
        until = min(until, _next_boundary(spec.schedules, rule.zone, now))
    passed: tuple[str, ...] = ()
    if rule.passes:
        running_passes = [(name, end) for name, end in rule.passes if now < end]
        passed = tuple(sorted(name for name, _end in running_passes))
        until = min([until, *(end for _name, end in running_passes)])
    return InForce(pause, running, passed, until)


class PolicyMaker:
    """Makes effective policies, sharing one Policy object between all clients in the same state."""

    def __init__(self, catalog: Catalog, answering: Answering, default: Policy) -> None:
        self.catalog = catalog
        self.answering = answering
        self.default = default
        self._interned: dict[tuple[object, ...], Policy] = {}
        self._pause_verdicts: dict[str, Verdict] = {}

    def effective(self, rule: Governing, now: float) -> tuple[Policy, float]:
        """(the policy in force at `now`, the time until which it stays in force)."""
        state = in_force(rule, now)
        spec = rule.spec
        block_all: Verdict | None = None
        block_all_key: str | None = None
        blocking = state.blocking
        if state.pause is not None:
            level = state.pause[1]
            block_all, block_all_key = self._pause_verdict(level), f"paused:{level}"
        elif blocking is not None and spec is not None:
            block_all, block_all_key = self._schedule_verdict(blocking.name, spec), f"schedule:{blocking.name}"
        extra_blocked = 0
        for schedule in state.schedules:
            extra_blocked |= self.catalog.mask(schedule.categories)
        key = (spec, rule.level, block_all_key, tuple(schedule.name for schedule in state.schedules), state.passed)
        policy = self._interned.get(key)
        if policy is None:
            if len(self._interned) >= _INTERNED_LIMIT:
                self._interned.clear()
            policy = self._interned[key] = self._make(spec, rule.level, block_all, extra_blocked, state.passed)
        return policy, state.until

    def _make(
        self,
        spec: PolicySpec | None,
        level: str,
        block_all: Verdict | None,
        extra_blocked: int,
        passed: tuple[str, ...],
    ) -> Policy:
        if spec is None:
            base = self.default
            if block_all is None and not passed:
                return base
            return Policy(
                base.blocked,
                base.warned,
                self.answering,
                self.catalog,
                block_all=block_all,
                level=level,
                passed=wire_names(passed),
                canaries=base.canaries,
            )
        warned = self.catalog.default_mask("warn") if spec.web_protect is not False else 0
        return Policy(
            self.catalog.mask(spec.block or ()) | extra_blocked,
            warned,
            self.answering,
            self.catalog,
            mode=AnswerMode(spec.answer) if spec.answer else None,
            allow=wire_names(spec.allow),
            deny=wire_names(spec.deny),
            block_all=block_all,
            safe_search=bool(spec.safe_search),
            level=level,
            passed=wire_names(passed),
            canaries=spec.canaries is not False,
        )

    def _pause_verdict(self, level: str) -> Verdict:
        verdict = self._pause_verdicts.get(level)
        if verdict is None:
            verdict = self._pause_verdicts[level] = self.answering.verdict(
                Action.BLOCK, Rule.PAUSE, 0, f"paused ({level})", EdeCode.BLOCKED, "paused"
            )
        return verdict

    def _schedule_verdict(self, name: str, spec: PolicySpec) -> Verdict:
        mode = AnswerMode(spec.answer) if spec.answer else None
        return self.answering.verdict(
            Action.BLOCK, Rule.SCHEDULE, 0, f"schedule {name}", EdeCode.BLOCKED, f"schedule {name}", mode
        )


def find_device(site: Site, identity: Identity) -> Device | None:
    """The device of `site` that `identity` names: by MAC, then client id, then address."""
    if identity.mac is not None and identity.mac in site.by_mac:
        return site.by_mac[identity.mac]
    for client_id in (identity.credential, identity.client_id):
        if client_id is not None and client_id in site.by_client_id:
            return site.by_client_id[client_id]
    return site.by_address.get(identity.address)
