"""Prometheus metrics of a node: each worker writes its counters to a small file every second; the admin
process adds them up when scraped. Counting stays off the query path: the cache already counts its hits
and misses, the blocked-answer builder its verdicts, the forwarder the replies it took and refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def metric_line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if labels:
        text = ",".join(
            f'{key}="{str(val).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
            for key, val in labels.items()
        )
        return f"{name}{{{text}}} {value}"
    return f"{name} {value}"


def _summed(workers: list[dict[str, Any]], counter: str) -> dict[str, int]:
    """A labelled counter of every worker, added up by label."""
    total: dict[str, int] = {}
    for worker in workers:
        for label, count in worker.get(counter, {}).items():
            total[label] = total.get(label, 0) + count
    return total


def _tls_lines(workers: list[dict[str, Any]]) -> list[str]:
    """The DoT and DoH listeners' metrics (worker/tls.py), when they listen."""
    serving = [worker["tls"] for worker in workers if worker.get("tls")]
    if not serving:
        return []
    labelled = (
        ("bns_tls_handshakes_total", "handshakes", "listener", "TLS handshakes completed, by listener (dot, doh)."),
        (
            "bns_tls_cut_total",
            "cut",
            "reason",
            "DoT and DoH connections cut by a bound, by reason: worker_full, client_full, evicted (idle, to make room),"
            " handshake_timeout, handshake_failed, idle, streams (HTTP/2 streams beyond tls.max_streams), flood (HTTP/2"
            " resets or control frames beyond their budget), protocol (HTTP that does not parse).",
        ),
        (
            "bns_client_ids_total",
            "client_ids",
            "outcome",
            "Client ids given over DoT and DoH: known (naming a device, counted once per worker as it is resolved),"
            " unknown (the same), malformed (per connection or request).",
        ),
        ("bns_doh_responses_total", "doh_statuses", "status", "DoH responses, by HTTP status."),
        (
            "bns_tls_certificate_reloads_total",
            "certificate_reloads",
            "outcome",
            "New certificate files taken (loaded) or refused, counted by each worker.",
        ),
    )
    lines = [
        "# HELP bns_tls_connections DoT and DoH connections open now (handshakes included).",
        "# TYPE bns_tls_connections gauge",
        metric_line("bns_tls_connections", sum(worker["open"] for worker in serving)),
        "# HELP bns_tls_certificate_not_after When the certificate served expires (Unix time; the soonest of the"
        " workers').",
        "# TYPE bns_tls_certificate_not_after gauge",
        metric_line("bns_tls_certificate_not_after", min(worker["certificate_not_after"] for worker in serving)),
    ]
    for name, counter, label, about in labelled:
        lines += [f"# HELP {name} {about}", f"# TYPE {name} counter"]
        lines += [metric_line(name, count, {label: key}) for key, count in sorted(_summed(serving, counter).items())]
    return lines


class Metrics:
    """What `/metrics` renders: the workers' counters summed, and the node's own state."""

    def __init__(self, directory: Path, state: Callable[[], dict[str, Any]], workers: int = 1) -> None:
        """`workers`: how many the node runs (it is ready when each of them reports ready)."""
        self.directory = directory
        self._state = state
        self._expected = workers
        self.sections: list[Callable[[], list[str]]] = []  # lines of the node's other parts (its feeds)

    def readiness(self) -> tuple[bool, str | None]:
        """(whether every worker answers queries, why the node serves its last verified list if it does)."""
        workers = self._workers()
        ready = len(workers) >= self._expected and all(worker.get("ready", True) for worker in workers)
        fallback = next((worker["lists_fallback"] for worker in workers if worker.get("lists_fallback")), None)
        return ready, fallback

    def _workers(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.directory.glob("worker-*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced this instant: next scrape
        return out

    def alerts(self, site: str | None = None) -> list[dict[str, Any]]:
        """The newest threat alerts of this node's workers (of one site if given), newest first."""
        found = [
            alert
            for worker in self._workers()
            for alert in worker.get("threat_alerts", [])
            if site is None or alert.get("site") == site
        ]
        return sorted(found, key=lambda alert: alert["at"], reverse=True)

    def forwards(self, workers: list[dict[str, Any]] | None = None) -> dict[str, dict[str, int]]:
        """Each local.forward zone's replies and failed sends summed over the workers, its servers, and those
        down as the worker that finds most of them down."""
        forwards: dict[str, dict[str, int]] = {}
        for worker in self._workers() if workers is None else workers:
            for zone, counts in worker.get("forwards", {}).items():
                summed = forwards.setdefault(zone, {})
                for key, count in counts.items():
                    added = key not in ("down", "servers")
                    summed[key] = summed.get(key, 0) + count if added else max(summed.get(key, 0), count)
        return forwards

    def render(self) -> str:
        workers = self._workers()
        hits = sum(w["cache_hits"] for w in workers)
        misses = sum(w["cache_misses"] for w in workers)
        verdicts: dict[str, int] = {}
        for worker in workers:
            for key, count in worker["verdicts"].items():
                verdicts[key] = verdicts.get(key, 0) + count
        replies = sum(w["upstream_replies"] for w in workers)
        seconds = sum(w["upstream_seconds"] for w in workers)
        rejected = _summed(workers, "upstream_rejected")
        send_errors = sum(w["upstream_send_errors"] for w in workers)
        shed = _summed(workers, "shed")
        threats = _summed(workers, "threats")
        refused_claims = _summed(workers, "refused_claims")
        local_answers = _summed(workers, "local_answers")
        forwards = self.forwards(workers)
        state = self._state()
        lines = [
            "# HELP bns_queries_total Queries answered, by verdict (blocked, warned, passed) and category.",
            "# TYPE bns_queries_total counter",
            metric_line("bns_queries_total", hits + misses, {"verdict": "passed", "category": "", "reason": ""}),
        ]
        for key, count in sorted(verdicts.items()):
            action, category, reason = key.split("|", 2)
            lines.append(
                metric_line("bns_queries_total", count, {"verdict": action, "category": category, "reason": reason})
            )
        lines += [
            "# HELP bns_cache_hits_total Answers served from the cache.",
            "# TYPE bns_cache_hits_total counter",
            metric_line("bns_cache_hits_total", hits),
            "# HELP bns_stale_answers_total Answers served from expired data because no upstream answered (RFC 8767).",
            "# TYPE bns_stale_answers_total counter",
            metric_line("bns_stale_answers_total", sum(w.get("stale_answers", 0) for w in workers)),
            "# HELP bns_cache_misses_total Cache lookups that missed.",
            "# TYPE bns_cache_misses_total counter",
            metric_line("bns_cache_misses_total", misses),
            "# HELP bns_cache_hit_ratio Hits over lookups since start.",
            "# TYPE bns_cache_hit_ratio gauge",
            metric_line("bns_cache_hit_ratio", round(hits / (hits + misses), 6) if hits + misses else 0),
            "# HELP bns_upstream_replies_total Upstream replies accepted.",
            "# TYPE bns_upstream_replies_total counter",
            metric_line("bns_upstream_replies_total", replies),
            "# HELP bns_upstream_latency_seconds_sum Seconds spent waiting for those replies.",
            "# TYPE bns_upstream_latency_seconds_sum counter",
            metric_line("bns_upstream_latency_seconds_sum", round(seconds, 6)),
            "# HELP bns_upstream_rejected_replies_total Upstream replies refused (RFC 5452), by reason: wrong_id,"
            " wrong_question, wrong_case (0x20), malformed.",
            "# TYPE bns_upstream_rejected_replies_total counter",
            *(
                metric_line("bns_upstream_rejected_replies_total", count, {"reason": reason})
                for reason, count in sorted(rejected.items())
            ),
            "# HELP bns_upstream_send_errors_total Upstream queries that could not be sent (no descriptor, port or"
            " route).",
            "# TYPE bns_upstream_send_errors_total counter",
            metric_line("bns_upstream_send_errors_total", send_errors),
            "# HELP bns_shed_total Queries not answered in full, by reason: refused_source (server.allow),"
            " rate_limit_dropped and rate_limit_slipped (RRL), client_busy and zone_busy (flood isolation).",
            "# TYPE bns_shed_total counter",
            *(metric_line("bns_shed_total", count, {"reason": reason}) for reason, count in sorted(shed.items())),
            "# HELP bns_threat_alerts_total Clients flagged, by reason: dga (a machine-made name), tunnel (DNS"
            " tunnelling), or the threat category of a listed name asked for (malware, phishing).",
            "# TYPE bns_threat_alerts_total counter",
            *(
                metric_line("bns_threat_alerts_total", count, {"reason": reason})
                for reason, count in sorted(threats.items())
            ),
            "# HELP bns_identity_claims_refused_total Identity claims of a trusted router about another site than"
            " its own, ignored, by claim: address (ECS, Umbrella) or cpe_id.",
            "# TYPE bns_identity_claims_refused_total counter",
            *(
                metric_line("bns_identity_claims_refused_total", count, {"claim": claim})
                for claim, count in sorted(refused_claims.items())
            ),
            "# HELP bns_local_answers_total Answers given by a zone served here (never forwarded), by zone.",
            "# TYPE bns_local_answers_total counter",
            *(
                metric_line("bns_local_answers_total", count, {"zone": zone})
                for zone, count in sorted(local_answers.items())
            ),
            "# HELP bns_forward_replies_total Replies from the servers of a local.forward zone, by zone.",
            "# TYPE bns_forward_replies_total counter",
            *(
                metric_line("bns_forward_replies_total", counts["replies"], {"zone": zone})
                for zone, counts in sorted(forwards.items())
            ),
            "# HELP bns_forward_send_errors_total Queries that could not be sent to a local.forward zone's servers.",
            "# TYPE bns_forward_send_errors_total counter",
            *(
                metric_line("bns_forward_send_errors_total", counts["send_errors"], {"zone": zone})
                for zone, counts in sorted(forwards.items())
            ),
            "# HELP bns_forward_servers_down Servers of a local.forward zone a worker has marked down, by zone.",
            "# TYPE bns_forward_servers_down gauge",
            *(
                metric_line("bns_forward_servers_down", counts.get("down", 0), {"zone": zone})
                for zone, counts in sorted(forwards.items())
            ),
            "# HELP bns_workers Workers reporting.",
            "# TYPE bns_workers gauge",
            metric_line("bns_workers", len(workers)),
            "# HELP bns_lists_info The list version each worker serves.",
            "# TYPE bns_lists_info gauge",
        ]
        for version in sorted({w["lists_version"] for w in workers}):
            lines.append(metric_line("bns_lists_info", 1, {"version": version}))
        ready, fallback = self.readiness()
        lines += [
            "# HELP bns_store_up 1 when the policy store answers, 0 when not, -1 with none.",
            "# TYPE bns_store_up gauge",
            metric_line("bns_store_up", state.get("store_up", -1)),
            "# HELP bns_ready 1 when every worker answers queries, 0 while one waits for its list.",
            "# TYPE bns_ready gauge",
            metric_line("bns_ready", int(ready)),
            "# HELP bns_lists_fallback 1 while the list file is unusable and the last verified list serves.",
            "# TYPE bns_lists_fallback gauge",
            metric_line("bns_lists_fallback", int(fallback is not None)),
            "# HELP bns_webhook_alerts_total Threat alerts posted to sites' webhooks (delivered), or dropped from"
            " a full queue while a webhook did not answer.",
            "# TYPE bns_webhook_alerts_total counter",
            metric_line("bns_webhook_alerts_total", state.get("webhook_delivered", 0), {"outcome": "delivered"}),
            metric_line("bns_webhook_alerts_total", state.get("webhook_dropped", 0), {"outcome": "dropped"}),
            "# HELP bns_webhook_refused_total Posts to sites' webhooks not made: the address is not public nor in"
            " admin.webhook_allow, or the URL carries a user name or password.",
            "# TYPE bns_webhook_refused_total counter",
            metric_line("bns_webhook_refused_total", state.get("webhook_refused", 0)),
            "# HELP bns_activity_lost_total Device activity items lost: a worker's hand-over was full, or the"
            " store was out of reach for long.",
            "# TYPE bns_activity_lost_total counter",
            metric_line("bns_activity_lost_total", state.get("activity_lost", 0)),
            "# HELP bns_devices_evicted_total Seen devices forgotten because their site had activity.devices_per_site.",
            "# TYPE bns_devices_evicted_total counter",
            metric_line("bns_devices_evicted_total", state.get("devices_evicted", 0)),
            *_tls_lines(workers),
        ]
        for section in self.sections:
            lines += section()
        return "\n".join(lines) + "\n"
