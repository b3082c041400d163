"""`/metrics`: the workers' counter files summed into Prometheus text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resolver.admin.metrics import Metrics

pytestmark = pytest.mark.unit


def worker_file(
    directory: Path,
    index: int,
    rejected: dict[str, int],
    send_errors: int,
    shed: dict[str, int] | None = None,
    tls: dict[str, object] | None = None,
    local: dict[str, int] | None = None,
    forwards: dict[str, dict[str, int]] | None = None,
) -> None:
    counters = {
        "cache_hits": 1,
        "cache_misses": 1,
        "verdicts": {},
        "upstream_replies": 1,
        "upstream_seconds": 0.01,
        "upstream_rejected": rejected,
        "upstream_send_errors": send_errors,
        "lists_version": "v1",
        "shed": shed or {},
        "tls": tls or {},
        "local_answers": local or {},
        "forwards": forwards or {},
    }
    (directory / f"worker-{index}.json").write_text(json.dumps(counters))


def test_refused_upstream_replies_are_summed_by_reason(tmp_path):
    worker_file(tmp_path, 0, {"wrong_id": 2, "wrong_question": 0, "wrong_case": 1, "malformed": 0}, 1)
    worker_file(tmp_path, 1, {"wrong_id": 3, "wrong_question": 1, "wrong_case": 0, "malformed": 4}, 0)
    lines = Metrics(tmp_path, dict, workers=2).render().splitlines()
    assert "# TYPE bns_upstream_rejected_replies_total counter" in lines
    assert [line for line in lines if line.startswith("bns_upstream_rejected_replies_total")] == [
        'bns_upstream_rejected_replies_total{reason="malformed"} 4',
        'bns_upstream_rejected_replies_total{reason="wrong_case"} 1',
        'bns_upstream_rejected_replies_total{reason="wrong_id"} 5',
        'bns_upstream_rejected_replies_total{reason="wrong_question"} 1',
    ]
    assert "bns_upstream_send_errors_total 1" in lines


def test_local_answers_are_summed_by_zone(tmp_path):
    worker_file(tmp_path, 0, {}, 0, local={"localhost": 2, "168.192.in-addr.arpa": 1})
    worker_file(tmp_path, 1, {}, 0, local={"localhost": 3})
    lines = Metrics(tmp_path, dict, workers=2).render().splitlines()
    assert [line for line in lines if line.startswith("bns_local_answers_total")] == [
        'bns_local_answers_total{zone="168.192.in-addr.arpa"} 1',
        'bns_local_answers_total{zone="localhost"} 5',
    ]


def test_forwarded_zones_replies_and_send_errors_are_summed_by_zone(tmp_path):
    worker_file(tmp_path, 0, {}, 0, forwards={"corp.example": {"replies": 4, "send_errors": 1, "down": 1}})
    worker_file(tmp_path, 1, {}, 0, forwards={"corp.example": {"replies": 2, "send_errors": 0, "down": 0}})
    lines = Metrics(tmp_path, dict, workers=2).render().splitlines()
    assert 'bns_forward_replies_total{zone="corp.example"} 6' in lines
    assert 'bns_forward_send_errors_total{zone="corp.example"} 1' in lines
    assert 'bns_forward_servers_down{zone="corp.example"} 1' in lines  # as the worker that found it down


def test_shed_queries_are_summed_by_reason(tmp_path):
    worker_file(tmp_path, 0, {}, 0, {"refused_source": 2, "rate_limit_dropped": 5, "zone_busy": 1})
    worker_file(tmp_path, 1, {}, 0, {"refused_source": 1, "rate_limit_slipped": 4, "client_busy": 0})
    lines = Metrics(tmp_path, dict, workers=2).render().splitlines()
    assert [line for line in lines if line.startswith("bns_shed_total")] == [
        'bns_shed_total{reason="client_busy"} 0',
        'bns_shed_total{reason="rate_limit_dropped"} 5',
        'bns_shed_total{reason="rate_limit_slipped"} 4',
        'bns_shed_total{reason="refused_source"} 3',
        'bns_shed_total{reason="zone_busy"} 1',
    ]


def test_the_dot_and_doh_counters_are_summed_when_they_listen(tmp_path):
    worker_file(tmp_path, 0, {}, 0)
    assert "bns_tls" not in Metrics(tmp_path, dict).render()  # no DoT, no DoH: no such metric

    def tls(open_now: int, cut: dict[str, int], not_after: float) -> dict[str, object]:
        return {
            "open": open_now,
            "handshakes": {"dot": 3, "doh": 1},
            "cut": cut,
            "client_ids": {"known": 1, "unknown": 0, "malformed": 2},
            "doh_statuses": {"200": 5, "413": 1},
            "certificate_not_after": not_after,
            "certificate_reloads": {"loaded": 1, "refused": 0},
        }

    worker_file(tmp_path, 0, {}, 0, tls=tls(2, {"idle": 1, "flood": 0}, 2_000_000_000.0))
    worker_file(tmp_path, 1, {}, 0, tls=tls(1, {"idle": 2, "flood": 1}, 1_900_000_000.0))
    lines = Metrics(tmp_path, dict, workers=2).render().splitlines()
    assert "bns_tls_connections 3" in lines and "bns_tls_certificate_not_after 1900000000.0" in lines
    assert 'bns_tls_handshakes_total{listener="dot"} 6' in lines
    assert 'bns_tls_cut_total{reason="flood"} 1' in lines and 'bns_tls_cut_total{reason="idle"} 3' in lines
    assert 'bns_client_ids_total{outcome="malformed"} 4' in lines
    assert 'bns_doh_responses_total{status="413"} 2' in lines
    assert 'bns_tls_certificate_reloads_total{outcome="loaded"} 2' in lines
