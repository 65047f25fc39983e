"""The autoscaling signal: how many Triton replicas the demand calls for, for an HPA or KEDA.

Placement (router/placement/copies.py) sizes copies within the instances that exist: its
desired count is capped by the healthy instances. An autoscaler needs the figure before that
cap, so it can add the instances:

    copies(model)  = max(ceil(demand / per_copy_capacity), min_copies,
                         1 if a request came within keep_warm_s)      capped by max_copies only
    replicas(pool) = replicas holding every copy, packed first-fit largest first into
                     instances of the memory budget, copies of one model on distinct
                     replicas (so at least the largest copy count); without a known budget,
                     the largest copy count

demand = max(short-window rate, forecast), as placement sizes copies; per-copy capacity and
the floors come from the policy (router/policy/). The budget is the smallest memory budget
among the healthy instances (0 = unknown: memory does not count).

Exported as `pointsman_router_desired_replicas{pool}` and
`pointsman_router_model_desired_copies{model}`, computed at scrape time from the latest demand
snapshot of the placement controller. deploy/autoscaling/ has the HPA that follows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.demand import DemandSnapshot, ModelDemand
from router.placement.copies import copies_for_demand
from router.placement.inputs import ModelSpec

if TYPE_CHECKING:
    from router.policy import PolicyStore
    from router.server import RouterServer

__all__ = [
    "DesiredReplicasView",
    "ReplicaDemand",
    "desired_model_copies",
    "desired_replicas",
    "measure_router",
    "replica_demand",
]


@dataclass(frozen=True, slots=True)
class ReplicaDemand:
    """What the pool needs now: replicas, and copies per model."""

    pool: str
    replicas: int
    copies: Mapping[str, int] = field(default_factory=dict)


def desired_model_copies(
    spec: ModelSpec, demand: ModelDemand, *, now: float, keep_warm_s: float
) -> int:
    """copies(model) of the module docstring."""
    needed = copies_for_demand(demand.sizing_rps, spec.per_copy_capacity_rps)
    warm = 1 if demand.seen_within(now, keep_warm_s) else 0
    count = max(needed, spec.min_copies, warm)
    return count if spec.max_copies is None else min(count, spec.max_copies)


def desired_replicas(
    copies: Mapping[str, int], footprints: Mapping[str, int], budget_bytes: int
) -> int:
    """replicas(pool) of the module docstring: with a known budget, copies are packed first-fit,
    largest first, never two of one model on a replica (a copy larger than the budget gets a
    replica of its own); without one, the largest copy count."""
    by_spread = max(copies.values(), default=0)
    if budget_bytes <= 0:
        return by_spread
    items = sorted(
        (
            (footprints.get(model, 0), model)
            for model, count in copies.items()
            for _ in range(count)
        ),
        reverse=True,
    )
    replicas: list[tuple[int, set[str]]] = []  # (free bytes, models held)
    for size, model in items:
        for index, (free, held) in enumerate(replicas):
            if size <= free and model not in held:
                replicas[index] = (free - size, held | {model})
                break
        else:
            replicas.append((budget_bytes - size, {model}))
    return max(by_spread, len(replicas))


def replica_demand(
    pool: str,
    demand: DemandSnapshot,
    models: Iterable[str],
    spec_for: Callable[[str], ModelSpec | None],
    *,
    keep_warm_s: float,
    budget_bytes: int,
) -> ReplicaDemand:
    """The pool's figures from one demand snapshot (its `taken_at` is "now"). A model without
    a spec (footprint unknown) counts no copies."""
    copies: dict[str, int] = {}
    footprints: dict[str, int] = {}
    for model in sorted(set(models)):
        spec = spec_for(model)
        if spec is None:
            continue
        copies[model] = desired_model_copies(
            spec, demand.of(model), now=demand.taken_at, keep_warm_s=keep_warm_s
        )
        footprints[model] = spec.footprint_bytes
    return ReplicaDemand(pool, desired_replicas(copies, footprints, budget_bytes), copies)


def measure_router(router: RouterServer, policy: PolicyStore, pool: str) -> ReplicaDemand | None:
    """`replica_demand` of a running router: the placement controller's latest demand, the
    fleet's models, the policy's specs. None before placement's first round (or with
    placement off: demand is tracked by its rounds)."""
    controller = router.placement
    demand = controller.last_demand if controller is not None else None
    if controller is None or demand is None:
        return None
    snapshot = router.snapshot
    current = policy.current
    budgets = [
        i.memory_budget_bytes for i in snapshot.instances if i.healthy and i.memory_budget_bytes > 0
    ]
    return replica_demand(
        pool,
        demand,
        set(snapshot.known_models) | set(demand.models),
        lambda model: current.model_spec(model, controller.footprint(model)),
        keep_warm_s=current.placement.keep_warm_s,
        budget_bytes=min(budgets, default=0),
    )


class DesiredReplicasView(Collector):
    """Computes `ReplicaDemand` with `measure()` at every scrape."""

    def __init__(self, measure: Callable[[], ReplicaDemand | None]) -> None:
        self._measure = measure

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._measure())

    @staticmethod
    def _families(demand: ReplicaDemand | None) -> list[Metric]:
        replicas = GaugeMetricFamily(
            "pointsman_router_desired_replicas",
            "Triton replicas the demand calls for (before any instance cap), per pool",
            labels=["pool"],
        )
        copies = GaugeMetricFamily(
            "pointsman_router_model_desired_copies",
            "Copies of the model the demand calls for (before the healthy-instance cap)",
            labels=["model"],
        )
        if demand is not None:
            replicas.add_metric([demand.pool], demand.replicas)
            for model in sorted(demand.copies):
                copies.add_metric([model], demand.copies[model])
        return [replicas, copies]
