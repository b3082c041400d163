"""`/metrics`: the workers' counter files summed into Prometheus text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resolver.admin.metrics import Metrics

pytestmark = pytest.mark.unit


def worker_file(
    directory: Path, index: int, rejected: dict[str, int], send_errors: int, shed: dict[str, int] | None = None
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
