"""Scenario `scale-sweep`: a 1000-instance fleet, sweeping how many instances hold each model.

`scale` gives every model the same few holders; a decision's cost grows with the holders of
its model, so this sweep fixes the fleet (1000 instances, 50 models) and sets the holders per
model to 1, 8, 80 and 1000. For each it times, around the router's public APIs only:

- the snapshot index build: constructing the `FleetSnapshot` (which indexes each model's
  holders once per snapshot, so each decision starts from them);
- one routing decision as PickTarget makes it (bench.scenarios.scale.time_decisions);
- a full route-table rebuild (`RouteBook.rebuild`: the scheduler for every model), first from
  empty tables and again with nothing changed;
- PickTarget over gRPC: a real router (`start_router`, placement off) whose data layer's view
  is replaced by the synthetic snapshot, called by a grpc.aio client in the same process
  (client and router share one event loop and core: an upper bound on the router's share).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
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
    grpc_picks: int = 2000
    seed: int = 7


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


async def time_pick_target(snapshot: FleetSnapshot, picks: int, rng: random.Random) -> list[float]:
    """Seconds per PickTarget call against a real router serving `snapshot`."""
    config = RouterConfig(instances=(), listen="127.0.0.1:0", placement_writer=False)
    router = await start_router(config, clock=lambda: NOW, registry=CollectorRegistry())
    try:
        # The data layer's view is replaced (the collector has no instances to read): the
        # route loop picks it up at its next cycle.
        setattr(router.collector, "snapshot", lambda: snapshot)  # noqa: B010
        router.collector.changed.set()
        deadline = time.monotonic() + 30
        while router.snapshot is not snapshot:
            if time.monotonic() > deadline:
                raise TimeoutError("the router never took the synthetic snapshot")
            await asyncio.sleep(0.05)
        names = sorted(snapshot.known_models)
        seconds = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(50):  # warm-up: connection, first calls
                await stub.PickTarget(pb.PickTargetRequest(model_name=names[0]), timeout=5)
            for model in rng.choices(names, k=picks):
                started = time.perf_counter()
                await stub.PickTarget(pb.PickTargetRequest(model_name=model), timeout=5)
                seconds.append(time.perf_counter() - started)
        return seconds
    finally:
        await router.stop(0.5)


def _measure(settings: SweepSettings, holders: int, rng: random.Random) -> dict[str, object]:
    instances = tuple(holders_fleet(settings.instances, settings.models, holders, rng))
    known = frozenset(f"model-{j}" for j in range(settings.models))
    index = _timed(lambda: FleetSnapshot(NOW, instances, known), settings.index_builds)
    snapshot = FleetSnapshot(NOW, instances, known)
    decisions, cpu_s = time_decisions(snapshot, settings.decisions, rng)
    first, again = [], []
    for _ in range(settings.rebuilds):
        book = RouteBook(DecisionPolicy(default_profile()), ttl_ms=5000)
        first += _timed(lambda book=book: book.rebuild(snapshot, NOW), 1)  # type: ignore[misc]
        again += _timed(lambda book=book: book.rebuild(snapshot, NOW), 1)  # type: ignore[misc]
    picks = asyncio.run(time_pick_target(snapshot, settings.grpc_picks, rng))
    return {
        "holders_per_model": holders,
        "models_per_instance": sum(len(i.models) for i in instances) / len(instances),
        "index_build_p50_ms": _ms(index, 50),
        "decision_p50_ms": _ms(decisions, 50),
        "decision_p99_ms": _ms(decisions, 99),
        "decisions_per_s_per_core": len(decisions) / cpu_s if cpu_s > 0 else math.nan,
        "rebuild_from_empty_p50_ms": _ms(first, 50),
        "rebuild_unchanged_p50_ms": _ms(again, 50),
        "pick_target_grpc_p50_ms": _ms(picks, 50),
        "pick_target_grpc_p99_ms": _ms(picks, 99),
        "pick_target_grpc_per_s": len(picks) / sum(picks) if picks else math.nan,
    }


COLUMNS = (
    ("holders_per_model", "holders/model"),
    ("models_per_instance", "models/instance"),
    ("index_build_p50_ms", "index build p50 ms"),
    ("decision_p50_ms", "decision p50 ms"),
    ("decision_p99_ms", "decision p99 ms"),
    ("decisions_per_s_per_core", "decisions/s/core"),
    ("rebuild_from_empty_p50_ms", "rebuild (all tables) p50 ms"),
    ("rebuild_unchanged_p50_ms", "rebuild (unchanged) p50 ms"),
    ("pick_target_grpc_p50_ms", "PickTarget gRPC p50 ms"),
    ("pick_target_grpc_p99_ms", "PickTarget gRPC p99 ms"),
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
                "snapshots; one thread (gRPC: client and router in one process)",
                tuple(title for _, title in COLUMNS),
                tuple(tuple(m[key] for key, _ in COLUMNS) for m in measured),
            ),
        ),
        bars=tuple(
            BarGroup(title, "ms", labels, tuple(float(str(m[key])) for m in measured), log)
            for key, title, log in (
                ("decision_p99_ms", "decision p99 by holders per model", True),
                ("rebuild_from_empty_p50_ms", "full route rebuild by holders per model", True),
                ("pick_target_grpc_p99_ms", "PickTarget over gRPC p99", False),
            )
        ),
        notes=(
            "A route rebuild runs on every fleet change and at least every refresh interval "
            "(0.1 s by default): its time bounds how often the router can republish routes.",
        ),
        data={
            "settings": {
                "instances": settings.instances,
                "models": settings.models,
                "decisions": settings.decisions,
                "grpc_picks": settings.grpc_picks,
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
