"""Scenario `scale-sweep`: a 1000-instance fleet, sweeping how many instances hold each model.

`scale` gives every model the same few holders; a decision's cost grows with the holders of
its model, so this sweep fixes the fleet (1000 instances, 50 models) and sets the holders per
model to 1, 8, 80 and 1000. For each it times, around the router's public APIs only:

- the snapshot index build: constructing the `FleetSnapshot` (which indexes each model's
  holders once per snapshot, so each decision starts from them);
- one routing decision as PickTarget makes it (bench.scenarios.scale.time_decisions);
- route-table rebuilds (`RouteBook.rebuild`): from empty tables (every model's table), again
  with nothing changed, and after one instance's refresh (every instance a new, equal object,
  as the collector hands them over, and one instance's load changed: the tables of the models
  it holds may change);
- PickTarget over gRPC: a real router (`start_router`, placement off) whose data layer's view
  is replaced by synthetic snapshots, called by a grpc.aio client in the same process (client
  and router share one event loop and core: an upper bound on the router's share), in three
  regimes: nothing changes; one instance's load changes at every refresh; every instance's
  load changes at every refresh (every table recomputed each time). The route loop rebuilds
  in the same event loop, so the last two show what a rebuild costs PickTarget's tail.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from bench.report import BarGroup, ScenarioResult, Table
from bench.scenarios import Options, Say
from bench.scenarios.scale import time_decisions
from bench.synthetic import synthetic_instance
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from router.config import RouterConfig
from router.contracts import FleetSnapshot, InstanceSnapshot
from router.decision import DecisionPolicy
from router.plugins.registry import default_profile
from router.routes import RouteBook
from router.server import start_router

__all__ = ["SweepSettings", "holders_fleet", "run_scale_sweep", "scenario"]

NOW = 1000.0  # the synthetic clock: every instance was refreshed just now, for ever


@dataclass(frozen=True, slots=True)
class SweepSettings:
    instances: int = 1000
    models: int = 50
    holders: tuple[int, ...] = (1, 8, 80, 1000)
    decisions: int = 2000
    index_builds: int = 20
    rebuilds: int = 5
    grpc_picks: int = 1000  # per regime
    seed: int = 7


class Churn(enum.Enum):
    """How the fleet changes between two refreshes while PickTarget is timed."""

    NONE = "none"
    ONE = "one"  # one instance's load, a different instance each refresh
    ALL = "all"  # every instance's load


def refreshed(
    instances: Sequence[InstanceSnapshot], changed: Sequence[int], step: int
) -> tuple[InstanceSnapshot, ...]:
    """The next refresh of `instances`: every one a new object with equal values (as the
    collector makes them), those at `changed` with a new load (inferences per second)."""
    moved = set(changed)
    return tuple(
        replace(
            inst,
            models=dict(inst.models),
            inferences_per_second=(
                (inst.inferences_per_second + 37.0 * (step + 1)) % 500.0
                if i in moved
                else inst.inferences_per_second
            ),
        )
        for i, inst in enumerate(instances)
    )


def holders_fleet(
    instances: int, models: int, holders: int, rng: random.Random
) -> list[InstanceSnapshot]:
    """`instances` healthy instances where each of `models` models has exactly `holders`
    holders, spread evenly (model j on instances j*s, j*s+1, ... mod N, s = N / models)."""
    if not 1 <= holders <= instances:
        raise ValueError(f"holders must be in [1, {instances}], got {holders}")
    held: list[list[str]] = [[] for _ in range(instances)]
    stride = max(1, instances // models)
    for j in range(models):
        for k in range(holders):
            held[(j * stride + k) % instances].append(f"model-{j}")
    return [synthetic_instance(i, names, rng, NOW) for i, names in enumerate(held)]


def _timed(action: Callable[[], object], times: int) -> list[float]:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return seconds


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else math.nan


def _churned(
    instances: tuple[InstanceSnapshot, ...], known: frozenset[str], churn: Churn
) -> Callable[[], FleetSnapshot]:
    """What the data layer hands the route loop at each refresh under `churn`."""
    if churn is Churn.NONE:
        fixed = FleetSnapshot(NOW, instances, known)
        return lambda: fixed
    steps: Iterator[int] = itertools.count()
    everyone = range(len(instances))

    def next_view() -> FleetSnapshot:
        step = next(steps)
        changed = everyone if churn is Churn.ALL else [step % len(instances)]
        return FleetSnapshot(NOW, refreshed(instances, changed, step), known)

    return next_view


async def time_pick_target(
    view: Callable[[], FleetSnapshot], picks: int, rng: random.Random
) -> tuple[list[float], int]:
    """Seconds per PickTarget call against a real router whose data layer's view is `view()`
    at each refresh, and the route rebuilds made meanwhile."""
    config = RouterConfig(instances=(), listen="127.0.0.1:0", placement_writer=False)
    router = await start_router(config, clock=lambda: NOW, registry=CollectorRegistry())
    try:
        first = view()
        # The data layer's view is replaced (the collector has no instances to read): the
        # route loop takes a new one at each cycle (at least every refresh interval).
        views = itertools.chain([first], iter(view, None))
        setattr(router.collector, "snapshot", lambda: next(views))  # noqa: B010
        router.collector.changed.set()
        deadline = time.monotonic() + 60
        while router.book.tables.keys() != first.known_models:  # the first rebuild is done
            if time.monotonic() > deadline:
                raise TimeoutError("the router never took the synthetic snapshot")
            await asyncio.sleep(0.05)
        names = sorted(first.known_models)
        seconds = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(50):  # warm-up: connection, first calls
                await stub.PickTarget(pb.PickTargetRequest(model_name=names[0]), timeout=5)
            rebuilds_before = _rebuilds(router.metrics.registry)
            for model in rng.choices(names, k=picks):
                started = time.perf_counter()
                await stub.PickTarget(pb.PickTargetRequest(model_name=model), timeout=5)
                seconds.append(time.perf_counter() - started)
        return seconds, int(_rebuilds(router.metrics.registry) - rebuilds_before)
    finally:
        await router.stop(0.5)


def _rebuilds(registry: CollectorRegistry) -> float:
    count = registry.get_sample_value(
        "pointsman_router_score_duration_seconds_count", {"operation": "rebuild"}
    )
    return count or 0.0


def _rebuild_s(book: RouteBook, snapshot: FleetSnapshot) -> float:
    started = time.perf_counter()
    book.rebuild(snapshot, NOW)
    return time.perf_counter() - started


def _time_rebuilds(
    settings: SweepSettings, instances: tuple[InstanceSnapshot, ...], known: frozenset[str]
) -> dict[str, object]:
    """Rebuilds from empty, unchanged, and after one instance's refresh (a new one each time)."""
    snapshot = FleetSnapshot(NOW, instances, known)
    first, again, after_one, recomputed = [], [], [], []
    for r in range(settings.rebuilds):
        book = RouteBook(DecisionPolicy(default_profile()), ttl_ms=5000)
        first.append(_rebuild_s(book, snapshot))
        again.append(_rebuild_s(book, snapshot))
        # One instance refreshed with a new load, a different one each round.
        changed = r * len(instances) // settings.rebuilds
        after_one.append(
            _rebuild_s(book, FleetSnapshot(NOW, refreshed(instances, [changed], r), known))
        )
        last = getattr(book, "last_rebuild", None)  # RebuildStats; absent before it existed
        recomputed.append(len(last.recomputed) if last is not None else len(known))
    return {
        "rebuild_from_empty_p50_ms": _ms(first, 50),
        "rebuild_unchanged_p50_ms": _ms(again, 50),
        "rebuild_one_instance_p50_ms": _ms(after_one, 50),
        "tables_recomputed_one_instance": float(np.median(recomputed)),
    }


def _measure(settings: SweepSettings, holders: int, rng: random.Random) -> dict[str, object]:
    instances = tuple(holders_fleet(settings.instances, settings.models, holders, rng))
    known = frozenset(f"model-{j}" for j in range(settings.models))
    index = _timed(lambda: FleetSnapshot(NOW, instances, known), settings.index_builds)
    snapshot = FleetSnapshot(NOW, instances, known)
    decisions, cpu_s = time_decisions(snapshot, settings.decisions, rng)
    measured: dict[str, object] = {
        "holders_per_model": holders,
        "models_per_instance": sum(len(i.models) for i in instances) / len(instances),
        "index_build_p50_ms": _ms(index, 50),
        "decision_p50_ms": _ms(decisions, 50),
        "decision_p99_ms": _ms(decisions, 99),
        "decisions_per_s_per_core": len(decisions) / cpu_s if cpu_s > 0 else math.nan,
        **_time_rebuilds(settings, instances, known),
    }
    for churn in Churn:
        view = _churned(instances, known, churn)
        picks, rebuilds = asyncio.run(time_pick_target(view, settings.grpc_picks, rng))
        key = _pick_key(churn)
        measured[f"{key}_p50_ms"] = _ms(picks, 50)
        measured[f"{key}_p99_ms"] = _ms(picks, 99)
        measured[f"{key}_per_s"] = len(picks) / sum(picks) if picks else math.nan
        measured[f"{key}_rebuilds"] = rebuilds
    return measured


def _pick_key(churn: Churn) -> str:
    """`pick_target_grpc` (a still fleet, the key earlier results use), `..._churn_one` ..."""
    return "pick_target_grpc" + ("" if churn is Churn.NONE else f"_churn_{churn.value}")


COLUMNS = (
    ("holders_per_model", "holders/model"),
    ("models_per_instance", "models/instance"),
    ("index_build_p50_ms", "index build p50 ms"),
    ("decision_p50_ms", "decision p50 ms"),
    ("decision_p99_ms", "decision p99 ms"),
    ("decisions_per_s_per_core", "decisions/s/core"),
    ("rebuild_from_empty_p50_ms", "rebuild (all tables) p50 ms"),
    ("rebuild_unchanged_p50_ms", "rebuild (unchanged) p50 ms"),
    ("rebuild_one_instance_p50_ms", "rebuild (one instance refreshed) p50 ms"),
    ("tables_recomputed_one_instance", "tables recomputed (one instance refreshed)"),
)
PICK_COLUMNS = (
    ("holders_per_model", "holders/model"),
    *(
        (f"{_pick_key(churn)}_{q}_ms", f"churn {churn.value}: {q}")
        for churn in Churn
        for q in ("p50", "p99")
    ),
    *((f"{_pick_key(churn)}_rebuilds", f"rebuilds ({churn.value})") for churn in Churn),
)


def run_scale_sweep(settings: SweepSettings, say: Say = lambda _line: None) -> ScenarioResult:
    rng = random.Random(settings.seed)
    measured = []
    for holders in settings.holders:
        say(f"scale-sweep: {settings.instances} instances, {holders} holders per model ...")
        measured.append(_measure(settings, holders, rng))
    labels = tuple(str(m["holders_per_model"]) for m in measured)
    return ScenarioResult(
        name="scale-sweep",
        title=f"Scale sweep: holders per model on a {settings.instances}-instance fleet",
        tables=(
            Table(
                f"{settings.instances} instances x {settings.models} models, synthetic "
                "snapshots; one thread",
                tuple(title for _, title in COLUMNS),
                tuple(tuple(m[key] for key, _ in COLUMNS) for m in measured),
            ),
            Table(
                "PickTarget over gRPC, ms, while the fleet changes at every refresh (churn "
                "none / one instance / all instances); client and router in one process",
                tuple(title for _, title in PICK_COLUMNS),
                tuple(tuple(m[key] for key, _ in PICK_COLUMNS) for m in measured),
            ),
        ),
        bars=tuple(
            BarGroup(title, "ms", labels, tuple(float(str(m[key])) for m in measured), log)
            for key, title, log in (
                ("decision_p99_ms", "decision p99 by holders per model", True),
                ("rebuild_from_empty_p50_ms", "full route rebuild by holders per model", True),
                ("rebuild_one_instance_p50_ms", "rebuild after one instance's refresh", True),
                (
                    "pick_target_grpc_churn_all_p99_ms",
                    "PickTarget p99, every table rebuilding",
                    True,
                ),
            )
        ),
        notes=(
            "A route rebuild runs on every fleet change and at least every refresh interval "
            "(0.1 s by default); it recomputes the tables whose inputs changed, in slices "
            "that give the event loop back between models (router/routes.py).",
            "One instance refreshed: every instance is a new object with equal values, one "
            "with a new load; the models that instance holds are recomputed (all 50 of them "
            "when every instance holds every model).",
        ),
        data={
            "settings": {
                "instances": settings.instances,
                "models": settings.models,
                "decisions": settings.decisions,
                "rebuilds": settings.rebuilds,
                "grpc_picks_per_regime": settings.grpc_picks,
            },
            "sweep": measured,
        },
    )


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = SweepSettings(seed=options.seed)
    if options.quick:
        settings = replace(
            settings,
            instances=100,
            holders=(1, 8, 100),
            decisions=200,
            index_builds=3,
            rebuilds=1,
            grpc_picks=200,
        )
    return run_scale_sweep(settings, say)
