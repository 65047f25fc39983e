"""The autoscaling signal: desired copies and replicas (tables), the glue that reads a running
router's placement controller and policy, and the Prometheus families it exports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from router.autoscale import (
    DesiredReplicasView,
    ReplicaDemand,
    desired_model_copies,
    desired_replicas,
    measure_router,
    replica_demand,
)
from router.contracts import FleetSnapshot, InstanceSnapshot
from router.demand import DemandSnapshot, ModelDemand
from router.placement.inputs import ModelSpec
from router.policy import PolicyStore

GIB = 1 << 30

COPY_CASES = [
    # name, spec, demand, expected copies (now = 1000, keep warm 300 s)
    ("no demand, no floor", ModelSpec("m", GIB, 50.0), ModelDemand("m"), 0),
    ("rate over capacity rounds up", ModelSpec("m", GIB, 50.0), ModelDemand("m", rate_rps=101), 3),
    ("exact multiple", ModelSpec("m", GIB, 0.1), ModelDemand("m", rate_rps=0.3), 3),
    (
        "forecast above rate wins",
        ModelSpec("m", GIB, 50.0),
        ModelDemand("m", 40, forecast_rps=160),
        4,
    ),
    ("min copies floor", ModelSpec("m", GIB, 50.0, min_copies=2), ModelDemand("m", rate_rps=1), 2),
    (
        "recent request keeps one warm",
        ModelSpec("m", GIB, 50.0),
        ModelDemand("m", last_seen=900.0),
        1,
    ),
    ("an old request does not", ModelSpec("m", GIB, 50.0), ModelDemand("m", last_seen=600.0), 0),
    (
        "max copies caps",
        ModelSpec("m", GIB, 10.0, max_copies=4),
        ModelDemand("m", rate_rps=1000),
        4,
    ),
    ("max copies 0", ModelSpec("m", GIB, 10.0, max_copies=0), ModelDemand("m", rate_rps=5), 0),
]


@pytest.mark.parametrize(
    ("spec", "demand", "expected"), [c[1:] for c in COPY_CASES], ids=[c[0] for c in COPY_CASES]
)
def test_desired_model_copies(spec: ModelSpec, demand: ModelDemand, expected: int) -> None:
    assert desired_model_copies(spec, demand, now=1000.0, keep_warm_s=300.0) == expected


REPLICA_CASES = [
    ("nothing", {}, {}, 0, 0),
    ("spread: copies of one model on distinct replicas", {"a": 3, "b": 1}, {"a": 1, "b": 1}, 0, 3),
    (
        "4 x 3 GiB: two per 8 GiB replica",
        {"a": 2, "b": 2},
        {"a": 3 * GIB, "b": 3 * GIB},
        8 * GIB,
        2,
    ),
    ("5 x 3 GiB: packed, not 15/8", {"a": 2, "b": 3}, {"a": 3 * GIB, "b": 3 * GIB}, 8 * GIB, 3),
    ("memory binds above spread", {"a": 2, "b": 2}, {"a": 6 * GIB, "b": 6 * GIB}, 8 * GIB, 4),
    ("small copies fill the gaps", {"a": 2, "b": 2}, {"a": 6 * GIB, "b": 2 * GIB}, 8 * GIB, 2),
    ("one model never twice on a replica", {"a": 3}, {"a": GIB}, 8 * GIB, 3),
    ("larger than a replica: one each", {"a": 2}, {"a": 10 * GIB}, 8 * GIB, 2),
    ("unknown budget: spread only", {"a": 2, "b": 2}, {"a": 6 * GIB, "b": 6 * GIB}, 0, 2),
]


@pytest.mark.parametrize(
    ("copies", "footprints", "budget", "expected"),
    [c[1:] for c in REPLICA_CASES],
    ids=[c[0] for c in REPLICA_CASES],
)
def test_desired_replicas(
    copies: dict[str, int], footprints: dict[str, int], budget: int, expected: int
) -> None:
    assert desired_replicas(copies, footprints, budget) == expected


def test_replica_demand_skips_models_without_a_spec() -> None:
    specs = {"a": ModelSpec("a", 2 * GIB, 10.0), "b": None}
    demand = DemandSnapshot(1000.0, models={"a": ModelDemand("a", rate_rps=35.0)})
    result = replica_demand(
        "triton", demand, ["a", "b"], specs.get, keep_warm_s=300.0, budget_bytes=4 * GIB
    )
    assert result == ReplicaDemand("triton", 4, {"a": 4})


@dataclass
class FakeController:
    last_demand: DemandSnapshot | None
    footprints: dict[str, int] = field(default_factory=dict)

    def footprint(self, model: str) -> int:
        return self.footprints.get(model, GIB)


@dataclass
class FakeRouter:
    placement: FakeController | None
    snapshot: FleetSnapshot


def _instance(name: str, budget: int, healthy: bool = True) -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=name, grpc_address="127.0.0.1:1", healthy=healthy, memory_budget_bytes=budget
    )


def test_measure_router_reads_the_policy_and_the_controller(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "placement:\n  default_per_copy_capacity_rps: 100\n"
        "models:\n  codegen: {per_copy_capacity_rps: 20, memory_bytes: 3221225472}\n"
        "  echo: {min_copies: 2}\n"
    )
    policy = PolicyStore(policy_file)
    snapshot = FleetSnapshot(
        taken_at=1000.0,
        instances=(
            _instance("t-0", 8 * GIB),
            _instance("t-1", 4 * GIB),
            _instance("t-2", GIB, False),
        ),
        known_models=frozenset({"codegen", "echo"}),
    )
    demand = DemandSnapshot(1000.0, models={"codegen": ModelDemand("codegen", rate_rps=90.0)})
    router: Any = FakeRouter(FakeController(demand), snapshot)
    result = measure_router(router, policy, "triton")
    # codegen: ceil(90 / 20) = 5 copies of 3 GiB; echo: min 2 copies of 1 GiB (the controller's
    # footprint); smallest healthy budget 4 GiB: one codegen copy per replica (5), the echo
    # copies fit beside two of them.
    assert result == ReplicaDemand("triton", 5, {"codegen": 5, "echo": 2})
    assert measure_router(FakeRouter(FakeController(None), snapshot), policy, "p") is None  # type: ignore[arg-type]
    assert measure_router(FakeRouter(None, snapshot), policy, "p") is None  # type: ignore[arg-type]


def test_view_exports_the_two_families() -> None:
    registry = CollectorRegistry()
    figures: list[ReplicaDemand | None] = [None]
    registry.register(DesiredReplicasView(lambda: figures[0]))
    text = generate_latest(registry).decode()
    assert "# TYPE pointsman_router_desired_replicas gauge" in text
    assert "pointsman_router_desired_replicas{" not in text  # no figures yet: no samples
    figures[0] = ReplicaDemand("triton", 3, {"codegen": 3, "echo": 1})
    text = generate_latest(registry).decode()
    assert 'pointsman_router_desired_replicas{pool="triton"} 3.0' in text
    assert 'pointsman_router_model_desired_copies{model="codegen"} 3.0' in text
    assert 'pointsman_router_model_desired_copies{model="echo"} 1.0' in text
