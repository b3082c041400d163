"""What each device of a site did, counted in the worker and handed to the admin process every few seconds, which
adds it to the store (resolver/admin/recorder.py): the seen-devices records, the hourly activity, the query log
of the sites that opted in, and the threat alerts.

The query path pays an increment on the client it already holds (and, the first time since the last
collection, an append to the clients to collect); a blocked or warned answer to a client of a site, one more
in a small table on the client, keyed by the interned query and verdict; a site that opted in to the query
log, an append to a bounded ring. This module is compiled with the query path. The rest happens here, every
`activity.hand_over_seconds` (5): the clients counted since are folded into per-(site, device, hour) entries,
written to `<run>/activity/worker-<index>.json` (RunDirectory.activity) for the admin process to take. Until it
has taken the last file, entries keep adding up in memory, at most `_MAX_PENDING` of them (a flood of random
MACs while the admin process is away costs bounded memory; what does not fit is counted as dropped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blocklists.artifact import write_atomically
from blocklists.catalog import Catalog
from resolver.shared.dns import RRType, name_to_text
from resolver.shared.logs import Throttled
from resolver.shared.policy.decision import Verdict
from resolver.worker.directory import Client
from resolver.worker.threats import ThreatWatch
from resolver.worker.wire import Query

_failures = Throttled(logging.getLogger(__name__))
_MAX_PENDING = 50_000  # (site, device, hour) entries waiting for the admin process
_MAX_NAMES = 32  # distinct blocked names per client between two collections; beyond, counted without the name
_LOG_SIZE = 10_000  # queries of opted-in sites waiting to be handed over, at most (the oldest go first)


def _type_text(qtype: int) -> str:
    try:
        return RRType(qtype).name
    except ValueError:
        return f"TYPE{qtype}"


class Tally:
    """One worker's counts since they were last handed over."""

    def __init__(self, catalog: Catalog, threats: ThreatWatch, clock: Callable[[], float] = time.time) -> None:
        self._catalog = catalog
        self._threats = threats
        self._clock = clock
        self.counted: list[Client] = []  # clients asked since the last collection (the query path appends)
        self.log: deque[tuple[float, Client, bytes, int, str]] = deque(maxlen=_LOG_SIZE)
        self._pending: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._queries: list[dict[str, Any]] = []
        self._alerts: list[dict[str, Any]] = []
        self.dropped = 0
        self._labels: dict[Verdict, tuple[str, ...]] = {}

    # --- the query path ----------------------------------------------------------------------------------

    def blocked(self, client: Client, verdict: Verdict, query: Query) -> None:
        # Keyed by the interned query and verdict (hashed by identity: no name hashed or compared per query);
        # beyond `_MAX_NAMES` queries, counted under None, without the name.
        blocks = client.blocks
        if blocks is None:
            blocks = client.blocks = {}
        key: Query | None = query if query in blocks or len(blocks) < _MAX_NAMES else None
        by_verdict = blocks.get(key)
        if by_verdict is None:
            by_verdict = blocks[key] = {}
        by_verdict[verdict] = by_verdict.get(verdict, 0) + 1

    def logged(self, client: Client, name: bytes, qtype: int, verdict: Verdict | None, now: float) -> None:
        self.log.append((now, client, name, qtype, verdict.action.value if verdict is not None else "allowed"))

    # --- every few seconds -------------------------------------------------------------------------------

    def collect(self) -> None:
        """Fold what the query path counted into the pending entries."""
        now = self._clock()
        hour = int(now // 3600 * 3600)
        counted, self.counted = self.counted, []
        for client in counted:
            queries, blocks = client.queries, client.blocks
            client.queries, client.blocks = 0, None
            if client.site is None:
                continue
            identity = client.identity
            key = (client.site.id, client.device_key, hour)
            entry = self._pending.get(key)
            if entry is None:
                if len(self._pending) >= _MAX_PENDING:
                    self.dropped += 1
                    continue
                entry = self._pending[key] = {
                    "site": client.site.id,
                    "key": client.device_key,
                    "hour": hour,
                    "address": identity.address,
                    "mac": identity.key[4:] if identity.mac is not None else None,
                    "client_id": identity.client_id,
                    "cpe_id": identity.cpe_id,
                    "first": now,
                    "queries": 0,
                    "blocked": 0,
                    "warned": 0,
                    "verdicts": {},
                    "names": {},
                }
            entry["last"] = now
            entry["queries"] += queries
            for query, by_verdict in (blocks or {}).items():
                for verdict, count in by_verdict.items():
                    entry[verdict.action.value] += count
                    for label in self._labels_of(verdict):
                        entry["verdicts"][label] = entry["verdicts"].get(label, 0) + count
                    if query is not None:
                        text = f"{verdict.action.value}|{name_to_text(query.name)}"
                        names = entry["names"]
                        if text in names or len(names) < _MAX_NAMES:  # per entry too, however long it waits
                            names[text] = names.get(text, 0) + count
        while self.log:
            at, client, name, qtype, action = self.log.popleft()
            if client.site is not None:
                self._queries.append(
                    {
                        "at": at,
                        "site": client.site.id,
                        "device": client.device_key,
                        "name": name_to_text(name),
                        "type": _type_text(qtype),
                        "verdict": action,
                    }
                )
        del self._queries[: max(len(self._queries) - _LOG_SIZE, 0)]
        while self._threats.unsent:
            self._alerts.append(dataclasses.asdict(self._threats.unsent.popleft()))
        del self._alerts[: max(len(self._alerts) - _LOG_SIZE, 0)]

    def _labels_of(self, verdict: Verdict) -> tuple[str, ...]:
        """`action|category` for each category of a verdict, or `action|rule` for one of none (a deny, a pause…)."""
        labels = self._labels.get(verdict)
        if labels is None:
            action = verdict.action.value
            labels = tuple(f"{action}|{category}" for category in self._catalog.ids(verdict.categories)) or (
                f"{action}|{verdict.rule.value}",
            )
            if len(self._labels) > 4096:  # verdicts are interned per policy: a new policy makes new ones
                self._labels.clear()
            self._labels[verdict] = labels
        return labels

    def hand_over(self, path: Path) -> bool:
        """Write what is pending to `path` unless the admin process has not taken the last file yet."""
        if not (self._pending or self._queries or self._alerts) or path.exists():
            return False
        document = {
            "at": self._clock(),
            "devices": list(self._pending.values()),
            "queries": self._queries,
            "alerts": self._alerts,
            "dropped": self.dropped,
        }
        write_atomically(path, [json.dumps(document).encode()])
        self._pending, self._queries, self._alerts, self.dropped = {}, [], [], 0
        return True


async def hand_over_every(tally: Tally, path: Path, interval: float) -> None:
    """Until cancelled: collect and hand over every `interval` seconds."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    while True:
        await asyncio.sleep(interval)
        tally.collect()  # always: the clients counted must not pile up while the hand-over fails
        try:
            tally.hand_over(path)
        except OSError as exc:  # a full disk: the pending entries stay bounded and wait for the next turn
            _failures.exception(f"activity: cannot hand over to {path}", exc)
