"""The operations bundle (ops/): names against the code, promtool checks and rule tests."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The metric names the issue promises operators, exactly as Prometheus sees them.
PROMISED = {
    "pointsman_sidecar_request_duration_seconds_bucket": {"model", "version", "method"},
    "pointsman_sidecar_requests_total": {"model", "method", "code"},
    "pointsman_sidecar_upstream_attempts_total": {"instance", "code"},
    "pointsman_sidecar_retries_total": {"model"},
    "pointsman_sidecar_shed_total": {"model", "priority"},
    "pointsman_sidecar_cold_starts_total": {"model"},
    "pointsman_sidecar_affinity_hits_total": {"model"},
    "pointsman_sidecar_routed_total": {"model"},
    "pointsman_sidecar_in_flight_requests": {"instance"},
    "pointsman_sidecar_route_table_age_seconds": set(),
    "pointsman_sidecar_route_tables_stale": set(),
    "pointsman_sidecar_router_connected": set(),
    "pointsman_router_instance_inferences_per_second": {"instance"},
    "pointsman_router_batch_size": {"instance", "model"},
    "pointsman_router_model_load_duration_seconds_bucket": {"model"},
    "pointsman_router_memory_used_bytes": {"instance"},
    "pointsman_router_memory_budget_bytes": {"instance"},
    "pointsman_router_score_duration_seconds_bucket": {"operation"},
    "pointsman_router_picks_total": {"model", "code"},
    "pointsman_router_instance_healthy": {"instance"},
    "pointsman_router_instance_data_age_seconds": {"instance"},
    "pointsman_router_instance_pending_requests": {"instance"},
    "pointsman_router_route_generation": set(),
    "pointsman_router_route_watchers": set(),
    "pointsman_router_route_updates_total": set(),
}


@pytest.fixture(scope="module")
def check_names() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_names", ROOT / "ops" / "check_names.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_names"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_code_exports_every_promised_metric(check_names: ModuleType) -> None:
    series = check_names.known_series(check_names.known_metrics())
    for name, labels in PROMISED.items():
        assert name in series, f"{name} is not defined in router/ or sidecar/"
        assert series[name] - {"le"} == labels, name


def test_bundle_names_only_exported_metrics_and_labels(check_names: ModuleType) -> None:
    series = check_names.known_series(check_names.known_metrics())
    files = check_names.bundle_files()
    assert {f.name for f in files} >= {
        "alerts.yaml",
        "alerts_test.yaml",
        "prometheus.yml",
        "pointsman-dashboard.json",
    }
    for path in files:
        checked, problems = check_names.problems_in(path, series)
        assert problems == []
        if path.name != "prometheus.yml":
            assert checked > 0, path


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            "rate(pointsman_sidecar_requests_totl[5m])",
            "unknown metric pointsman_sidecar_requests_totl",
        ),
        # A histogram has no series under its own name.
        ("pointsman_router_score_duration_seconds > 1", "unknown metric"),
        ('pointsman_router_batch_size{modle="codegen"}', "has no label 'modle'"),
        ('pointsman_router_picks_total{le="1"}', "has no label 'le'"),
    ],
)
def test_unknown_names_and_labels_are_reported(
    check_names: ModuleType, tmp_path: Path, expr: str, expected: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        json.dumps({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": expr}]}]})
    )
    series = check_names.known_series(check_names.known_metrics())
    _checked, problems = check_names.problems_in(rules, series)
    assert len(problems) == 1 and expected in problems[0]


def test_dashboard_parses_and_covers_the_figures() -> None:
    dashboard = json.loads((ROOT / "ops/grafana/pointsman-dashboard.json").read_text())
    text = json.dumps(dashboard)
    for figure in (
        "pointsman_sidecar_request_duration_seconds_bucket",  # latency p50/p99 by model
        "pointsman_router_instance_inferences_per_second",  # QPS per instance
        "pointsman_router_batch_size",
        "pointsman_sidecar_affinity_hits_total",
        "pointsman_router_memory_budget_bytes",
        "pointsman_router_score_duration_seconds_bucket",
        "pointsman_sidecar_retries_total",
        "pointsman_sidecar_shed_total",
        "pointsman_sidecar_cold_starts_total",
        "pointsman_sidecar_route_table_age_seconds",
        "pointsman_sidecar_in_flight_requests",
    ):
        assert figure in text, figure
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)


@needs_promtool
def test_promtool_accepts_rules_config_and_dashboard_queries(
    check_names: ModuleType, tmp_path: Path
) -> None:
    assert PROMTOOL is not None
    queries = tmp_path / "dashboard-queries.yaml"
    assert check_names.main(["--dashboard-rules", str(queries)]) == 0
    for args in (
        ["check", "config", str(ROOT / "ops/prometheus/prometheus.yml")],
        ["check", "rules", str(ROOT / "ops/prometheus/alerts.yaml"), str(queries)],
    ):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_decision_alert_fires_after_three_slow_evaluations_not_two() -> None:
    """ops/prometheus/alerts_test.yaml holds the cases; this runs them."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "test", "rules", str(ROOT / "ops/prometheus/alerts_test.yaml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_decision_alert_tests_fail_if_the_streak_changes(tmp_path: Path) -> None:
    """The unit tests pin the streak: `for: 1m` (two in a row) or 3m (four) must fail them."""
    assert PROMTOOL is not None
    rules = (ROOT / "ops/prometheus/alerts.yaml").read_text()
    marker = "        for: 2m\n        labels:\n          severity: warning\n        annotations:\n"
    marker += '          summary: "Routing decisions'
    assert rules.count(marker) == 1
    shutil.copy(ROOT / "ops/prometheus/alerts_test.yaml", tmp_path / "alerts_test.yaml")
    for streak in ("1m", "3m"):
        changed = marker.replace("for: 2m", f"for: {streak}")
        (tmp_path / "alerts.yaml").write_text(rules.replace(marker, changed))
        done = subprocess.run(
            [PROMTOOL, "test", "rules", str(tmp_path / "alerts_test.yaml")],
            capture_output=True,
            text=True,
        )
        assert done.returncode != 0, f"alerts_test.yaml passes with for: {streak}"
        assert "PointsmanRoutingDecisionSlow" in done.stdout + done.stderr
