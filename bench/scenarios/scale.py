"""Scenario `scale`: the router's engines on simulated fleets, no processes.

For each fleet size (instances x models) a synthetic `FleetSnapshot` is built with the
contracts' own types, and the router's code runs on it exactly as it does in `PickTarget`:
`decide` (router/decision.py; default profile: filters, weighted scorers, the picker), then
the assumed-load bookkeeping. Reported: decision latency p50/p99 and decisions per second per
core (one thread, CPU time). The placement planner's round time on the same fleet, and the
collector's parse of one instance's Triton metrics (one refresh) complete the picture of what
grows with fleet size.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from bench.report import BarGroup, ScenarioResult, Table, TargetCheck
from bench.scenarios import Options, Say
from bench.synthetic import synthetic_instance
from router.contracts import (
    FleetSnapshot,
    RoutingRequest,
)
from router.datalayer.triton_metrics import parse_triton_metrics
from router.decision import AssumedLoad, DecisionPolicy, decide
from router.demand import DemandSnapshot, ModelDemand
from router.placement.inputs import (
    InstanceState,
    LoadedModel,
    ModelSpec,
    PlacementPolicy,
    PlanInputs,
)
from router.placement.planner import ScaleDownState, plan_placement
from router.plugins.registry import default_profile

__all__ = ["FleetShape", "ScaleSettings", "run_scale", "synthetic_fleet", "triton_metrics_text"]

MiB = 1024**2
FOOTPRINT = 64 * MiB
TARGET_P99_MS_AT_1000 = 1.0


@dataclass(frozen=True, slots=True)
class FleetShape:
    instances: int
    models: int

    @property
    def models_per_instance(self) -> int:
        """Enough slots for every model to have two copies, at least 4 per instance."""
        return min(self.models, max(4, math.ceil(2 * self.models / self.instances)))

    @property
    def label(self) -> str:
        return f"{self.instances} x {self.models}"


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    shapes: tuple[FleetShape, ...]
    decisions: int  # timed routing decisions per shape
    plan_rounds: int  # timed placement rounds per shape
    parses: int  # timed metrics parses per shape
    seed: int = 7


FULL = ScaleSettings(
    shapes=tuple(FleetShape(i, m) for i in (10, 100, 1000) for m in (50, 500)),
    decisions=3000,
    plan_rounds=5,
    parses=50,
)
QUICK = ScaleSettings(
    shapes=(FleetShape(10, 50), FleetShape(100, 50)), decisions=200, plan_rounds=1, parses=5
)


def synthetic_fleet(shape: FleetShape, rng: random.Random, now: float) -> FleetSnapshot:
    """`shape.instances` healthy, fresh instances; instance i holds models i*k .. i*k+k-1
    (mod the model count), k = models_per_instance, with random queues, rates and memory."""
    k = shape.models_per_instance
    instances = [
        synthetic_instance(
            i, sorted({f"model-{(i * k + j) % shape.models}" for j in range(k)}), rng, now
        )
        for i in range(shape.instances)
    ]
    return FleetSnapshot(
        taken_at=now,
        instances=tuple(instances),
        known_models=frozenset(f"model-{m}" for m in range(shape.models)),
    )


def _zipf_weights(count: int, exponent: float = 1.1) -> list[float]:
    return [1 / (rank + 1) ** exponent for rank in range(count)]


def time_decisions(
    snapshot: FleetSnapshot, decisions: int, rng: random.Random
) -> tuple[list[float], float]:
    """Per-decision wall seconds, and CPU seconds for them all, as PickTarget decides."""
    policy = DecisionPolicy(default_profile())
    assumed = AssumedLoad(window_s=0.5)
    names = sorted(snapshot.known_models)
    chosen = rng.choices(names, weights=_zipf_weights(len(names)), k=decisions)
    now = snapshot.taken_at
    wall: list[float] = []
    clock = time.perf_counter
    cpu_started = time.process_time()
    for model in chosen:
        started = clock()
        request = RoutingRequest(model_name=model)
        decision = decide(request, snapshot, policy, now=now, rng=rng, assumed=assumed)
        if decision.pick is not None:
            assumed.add(decision.pick.candidate.instance_id, model, now)
        wall.append(clock() - started)
    return wall, time.process_time() - cpu_started


def plan_inputs(snapshot: FleetSnapshot, rng: random.Random) -> PlanInputs:
    """The placement view of the same fleet, with Zipf-skewed demand over the models."""
    now = snapshot.taken_at
    names = sorted(snapshot.known_models)
    weights = _zipf_weights(len(names))
    total_rps = 20.0 * len(snapshot.instances)
    demand = {
        name: ModelDemand(name, rate_rps=total_rps * w / sum(weights), last_seen=now)
        for name, w in zip(names, weights, strict=True)
    }
    instances = tuple(
        InstanceState(
            instance_id=inst.instance_id,
            memory_budget_bytes=inst.memory_budget_bytes,
            memory_used_bytes=inst.memory_used_bytes,
            models=tuple(
                LoadedModel(m, FOOTPRINT, loaded_at=now - 3600, last_used=now - rng.uniform(0, 60))
                for m in inst.models
            ),
            load=inst.inferences_per_second,
        )
        for inst in snapshot.instances
    )
    return PlanInputs(
        now=now,
        instances=instances,
        specs=tuple(ModelSpec(n, FOOTPRINT, per_copy_capacity_rps=50.0) for n in names),
        demand=DemandSnapshot(taken_at=now, models=demand),
        policy=PlacementPolicy(),
    )


def time_plans(inputs: PlanInputs, rounds: int, rng: random.Random) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        plan_placement(inputs, ScaleDownState(), rng)
        times.append(time.perf_counter() - started)
    return times


_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def triton_metrics_text(models: Sequence[str], rng: random.Random) -> str:
    """A /metrics page shaped like Triton's for `models` (one version each): every per-model
    family it serves, the four failure reasons, the pending gauge and the server's CPU series."""
    lines: list[str] = []
    for family in _COUNTERS:
        lines += [f"# HELP {family} synthetic", f"# TYPE {family} counter"]
        lines += [f'{family}{{model="{m}",version="1"}} {rng.randrange(10**6)}' for m in models]
    family = "nv_inference_request_failure"
    lines += [f"# HELP {family} synthetic", f"# TYPE {family} counter"]
    for m in models:
        for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
            lines.append(f'{family}{{model="{m}",reason="{reason}",version="1"}} 0')
    family = "nv_inference_pending_request_count"
    lines += [f"# HELP {family} synthetic", f"# TYPE {family} gauge"]
    lines += [f'{family}{{model="{m}",version="1"}} {rng.randrange(8)}' for m in models]
    for family in ("nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes"):
        lines += [f"# HELP {family} synthetic", f"# TYPE {family} gauge", f"{family} 1"]
    return "\n".join(lines) + "\n"


def time_parses(text: str, parses: int) -> list[float]:
    times = []
    for _ in range(parses):
        started = time.perf_counter()
        parse_triton_metrics(text)
        times.append(time.perf_counter() - started)
    return times


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else math.nan


def run_scale(
    settings: ScaleSettings, progress: Callable[[str], None] = lambda _line: None
) -> ScenarioResult:
    rng = random.Random(settings.seed)
    rows = []
    measured: list[dict[str, object]] = []
    for shape in settings.shapes:
        progress(f"scale: {shape.label} ...")
        snapshot = synthetic_fleet(shape, rng, now=1000.0)
        wall, cpu_s = time_decisions(snapshot, settings.decisions, rng)
        plans = time_plans(plan_inputs(snapshot, rng), settings.plan_rounds, rng)
        page = triton_metrics_text(sorted(snapshot.instances[0].models), rng)
        parses = time_parses(page, settings.parses)
        figures: dict[str, object] = {
            "instances": shape.instances,
            "models": shape.models,
            "models_per_instance": shape.models_per_instance,
            "decision_p50_ms": _ms(wall, 50),
            "decision_p99_ms": _ms(wall, 99),
            "decisions_per_s_per_core": len(wall) / cpu_s if cpu_s > 0 else math.nan,
            "plan_round_p50_ms": _ms(plans, 50),
            "metrics_page_bytes": len(page),
            "collector_parse_p50_ms": _ms(parses, 50),
            "collector_cpu_per_refresh_ms_fleet": _ms(parses, 50) * shape.instances,
        }
        measured.append(figures)
        rows.append(
            (
                shape.label,
                shape.models_per_instance,
                figures["decision_p50_ms"],
                figures["decision_p99_ms"],
                figures["decisions_per_s_per_core"],
                figures["plan_round_p50_ms"],
                figures["collector_parse_p50_ms"],
                figures["collector_cpu_per_refresh_ms_fleet"],
            )
        )
    return ScenarioResult(
        name="scale",
        title="Scale: routing decisions and placement on simulated fleets",
        tables=(
            Table(
                "Router engines on synthetic snapshots (one thread; no processes)",
                (
                    "instances x models",
                    "models/instance",
                    "decision p50 ms",
                    "decision p99 ms",
                    "decisions/s/core",
                    "placement round p50 ms",
                    "metrics parse ms/instance",
                    "collector CPU ms/refresh (fleet)",
                ),
                tuple(rows),
            ),
        ),
        bars=(
            BarGroup(
                "routing decision p99",
                "ms",
                tuple(str(r[0]) for r in rows),
                tuple(float(str(r[3])) for r in rows),
                log_scale=True,
            ),
            BarGroup(
                "decisions per second per core",
                "decisions/s",
                tuple(str(r[0]) for r in rows),
                tuple(float(str(r[4])) for r in rows),
                log_scale=True,
            ),
        ),
        targets=_targets(measured),
        notes=(
            "A decision is what PickTarget runs: decide (the model's holders, the default "
            "profile's filters and weighted scorers, the weighted-random picker), then the "
            "assumed-load bookkeeping. Sidecars route from streamed tables, so most requests "
            "need none.",
            "Collector cost is the CPU to parse one instance's Triton /metrics page (its "
            "models' series) per refresh; the fleet column multiplies by the instance count.",
        ),
        data={"settings": {"decisions": settings.decisions}, "shapes": measured},
    )


def _targets(measured: Sequence[dict[str, object]]) -> tuple[TargetCheck, ...]:
    largest = [m for m in measured if m["instances"] == 1000]
    if not largest:
        return (
            TargetCheck(
                "routing decision p99, 1000 instances",
                f"< {TARGET_P99_MS_AT_1000} ms",
                "not run (quick mode)",
                None,
            ),
        )
    worst = max(float(str(m["decision_p99_ms"])) for m in largest)
    return (
        TargetCheck(
            "routing decision p99, 1000 instances",
            f"< {TARGET_P99_MS_AT_1000} ms",
            f"{worst:.3f} ms (worst model count)",
            worst < TARGET_P99_MS_AT_1000,
        ),
    )


def scenario(options: Options, say: Say) -> ScenarioResult:
    return run_scale(replace(QUICK if options.quick else FULL, seed=options.seed), say)
