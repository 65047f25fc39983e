"""Scenario `overload`: high-priority latency and low-priority shedding at three times capacity.

One real Triton serves `codegen` behind the router and a sidecar (its own process) under a
policy with two classes, `high` (Triton priority 1) and `low` (priority 2, sheddable, the
default). For each sidecar `--max-in-flight` setting a fresh sidecar is started and measured:

1. unloaded: high-priority latency of one closed-loop client;
2. loaded: open-loop Poisson arrivals at `load_factor` (3) times the capacity, a share
   `high_share` of them high priority, each tagged with its `x-priority` class.

Capacity is measured once, straight at Triton (closed loop at concurrency 8, the model's
largest batch). The sidecar's CPU time and peak RSS are sampled during the loaded phase. The
priority helpers here (`closed_priority_load`, `open_priority_load`, `class_figures`) are the
load generator with an `x-priority` header per request; tests/sidecar/test_overload.py uses
them too. The load generator shares the machine: loaded latencies are pessimistic.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from app.fleet import Fleet, FleetConfig
from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import wait_until_ready
from bench.calls import TritonCalls, codegen_request
from bench.loadgen import LoadRun, Request, poisson_arrivals, run_closed_loop, run_open_loop
from bench.procstats import ProcessSampler
from bench.report import ScenarioResult, Table
from bench.scenarios import Options, Say
from bench.scenarios.quick_fleet import SharedFleet, fleet_for
from bench.stats import percentile, summarize

__all__ = [
    "PRIORITY_POLICY",
    "ClassFigures",
    "OverloadSettings",
    "class_figures",
    "closed_priority_load",
    "measure_capacity",
    "open_priority_load",
    "scenario",
]

# The router policy of the overload test and this scenario: codegen always placed, two
# classes, low the default and sheddable.
PRIORITY_POLICY = """\
models:
  codegen: {min_copies: 1}
priority_classes:
  high: {triton_priority: 1}
  low: {triton_priority: 2, sheddable: true}
default_priority_class: low
"""
SHED = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True, slots=True)
class ClassFigures:
    sent: int
    ok: int
    shed: int  # RESOURCE_EXHAUSTED
    other_errors: int
    p50_ms: float  # of successful answers
    p99_ms: float


def class_figures(run: LoadRun, priority: str) -> ClassFigures:
    """Counts and latency percentiles of one class's requests."""
    mine = [r for r in run.records if r.tag == priority]
    ok = [r.latency_s * 1e3 for r in mine if r.status == "OK"]
    shed = sum(r.status == SHED for r in mine)
    return ClassFigures(
        len(mine), len(ok), shed, len(mine) - len(ok) - shed, percentile(ok, 50), percentile(ok, 99)
    )


def _metadata(priority: str) -> tuple[tuple[str, str], ...]:
    return (("x-priority", priority),) if priority else ()


async def closed_priority_load(
    address: str,
    request: bytes,
    *,
    priority: str,
    concurrency: int,
    duration_s: float,
    timeout_s: float = 30.0,
) -> LoadRun:
    """`concurrency` clients sending `request` with `x-priority: priority`, one at a time."""
    async with grpc.aio.insecure_channel(address) as channel:
        calls = TritonCalls(channel, timeout_s)
        metadata = _metadata(priority)
        return await run_closed_loop(
            lambda _w, _at: Request(calls.unary(request, metadata), priority),
            concurrency=concurrency,
            duration_s=duration_s,
        )


async def measure_capacity(
    address: str, request: bytes, *, concurrency: int, duration_s: float
) -> float:
    """Successful answers per second of a closed loop that keeps the server busy."""
    run = await closed_priority_load(
        address, request, priority="", concurrency=concurrency, duration_s=duration_s
    )
    return summarize(run.records, run.elapsed_s).throughput_rps


async def open_priority_load(
    address: str,
    request: bytes,
    *,
    rate_rps: float,
    duration_s: float,
    classes: Sequence[tuple[str, float]],
    seed: int,
    timeout_s: float = 30.0,
) -> LoadRun:
    """Poisson arrivals at `rate_rps` for `duration_s`, each request's class drawn from
    `classes` (name, share) with a generator seeded by `seed`; waits for every answer."""
    rng = random.Random(seed)
    names, shares = [n for n, _ in classes], [s for _, s in classes]
    async with grpc.aio.insecure_channel(address) as channel:
        calls = TritonCalls(channel, timeout_s)

        def make(_index: int, _at: float) -> Request:
            priority = rng.choices(names, shares)[0]
            return Request(calls.unary(request, _metadata(priority)), priority)

        return await run_open_loop(
            make, arrivals=poisson_arrivals(rate_rps, duration_s, rng), duration_s=duration_s
        )


@dataclass(frozen=True, slots=True)
class OverloadSettings:
    max_in_flight: tuple[int, ...] = (2, 4, 8)
    max_queued: int = 32
    duration_s: float = 8.0  # the loaded phase
    capacity_s: float = 4.0  # the capacity measurement
    unloaded_s: float = 4.0  # the unloaded phase
    warmup_s: float = 1.0  # before the capacity measurement and before the unloaded phase
    high_share: float = 0.1
    load_factor: float = 3.0
    seed: int = 7


def _start_sidecar(
    fleet: Fleet, run_dir: Path, max_in_flight: int, max_queued: int
) -> tuple[ManagedProcess, str]:
    address = f"127.0.0.1:{free_port()}"
    argv = [
        sys.executable,
        "-m",
        "app",
        "sidecar",
        "--listen",
        address,
        "--router",
        fleet.router_address,
        "--cold-start-wait",
        "0",
        "--max-in-flight",
        str(max_in_flight),
        "--max-queued",
        str(max_queued),
    ]
    proc = ManagedProcess(
        ProcessSpec(
            name=f"sidecar-{max_in_flight}",
            argv=argv,
            env={"PYTHONUNBUFFERED": "1"},
            log_path=run_dir / f"sidecar-{max_in_flight}.log",
        )
    )
    proc.start()
    wait_until_ready(address, ["codegen"], 60, proc, server_ready=True)
    return proc, address


def _measure(
    settings: OverloadSettings, fleet: Fleet, run_dir: Path, request: bytes, say: Say
) -> tuple[float, list[dict[str, object]]]:
    triton = fleet.tritons[0].grpc_address
    asyncio.run(measure_capacity(triton, request, concurrency=8, duration_s=settings.warmup_s))
    capacity = asyncio.run(
        measure_capacity(triton, request, concurrency=8, duration_s=settings.capacity_s)
    )
    offered = settings.load_factor * capacity
    shares = (("high", settings.high_share), ("low", 1 - settings.high_share))
    cells = []
    for max_in_flight in settings.max_in_flight:
        say(f"overload: max_in_flight {max_in_flight}, offered {offered:.1f} rps")
        proc, address = _start_sidecar(fleet, run_dir, max_in_flight, settings.max_queued)
        try:
            warmup = closed_priority_load(
                address, request, priority="high", concurrency=1, duration_s=settings.warmup_s
            )
            asyncio.run(warmup)
            unloaded = class_figures(
                asyncio.run(
                    closed_priority_load(
                        address,
                        request,
                        priority="high",
                        concurrency=1,
                        duration_s=settings.unloaded_s,
                    )
                ),
                "high",
            )
            assert proc.pid is not None
            with ProcessSampler([proc.pid]) as sampler:
                run = asyncio.run(
                    open_priority_load(
                        address,
                        request,
                        rate_rps=offered,
                        duration_s=settings.duration_s,
                        classes=shares,
                        seed=settings.seed,
                    )
                )
            high, low = class_figures(run, "high"), class_figures(run, "low")
            summary = summarize(run.records, run.elapsed_s)
            cells.append(
                {
                    "max_in_flight": max_in_flight,
                    "unloaded_high": _figures_dict(unloaded),
                    "high": _figures_dict(high),
                    "low": _figures_dict(low),
                    "high_p99_ratio": high.p99_ms / unloaded.p99_ms if unloaded.ok else math.nan,
                    "served_rps": summary.throughput_rps,
                    "sidecar": sampler.cost.to_dict(summary.requests),
                }
            )
        finally:
            stop_all([proc])
    return capacity, cells


def _figures_dict(figures: ClassFigures) -> dict[str, object]:
    return {name: getattr(figures, name) for name in ClassFigures.__slots__}


def run_overload(
    settings: OverloadSettings, say: Say = lambda _line: None, shared: SharedFleet | None = None
) -> ScenarioResult:
    """On `shared`'s fleet when given (its policy has the same classes), else on its own."""
    run_dir = Path(tempfile.mkdtemp(prefix="pointsman-bench-overload-"))
    policy = run_dir / "policy.yaml"
    policy.write_text(PRIORITY_POLICY)
    request = codegen_request("def quicksort(items):", 16)
    config = FleetConfig(
        instances=1,
        placement={"triton-0": ("codegen",)},
        sidecar_port=0,
        router_port=0,
        run_dir=run_dir,
        policy_file=policy,
        sidecar_args=("--cold-start-wait", "0"),
    )
    with fleet_for(shared, config) as fleet:
        capacity, cells = _measure(settings, fleet, run_dir, request, say)
    rows = []
    for cell in cells:
        high, low, unloaded = cell["high"], cell["low"], cell["unloaded_high"]
        assert isinstance(high, dict) and isinstance(low, dict) and isinstance(unloaded, dict)
        sidecar = cell["sidecar"]
        assert isinstance(sidecar, dict)
        rows.append(
            (
                cell["max_in_flight"],
                unloaded["p50_ms"],
                unloaded["p99_ms"],
                high["p50_ms"],
                high["p99_ms"],
                cell["high_p99_ratio"],
                f"{high['shed']}/{high['sent']}",
                f"{low['ok']}/{low['shed']}/{low['other_errors']}",
                cell["served_rps"],
                sidecar["peak_rss_mib"],
                sidecar["cpu_ms_per_request"],
            )
        )
    offered = settings.load_factor * capacity
    return ScenarioResult(
        name="overload",
        title="Overload: priority classes at three times capacity",
        tables=(
            Table(
                f"capacity {capacity:.1f} rps (Triton direct, c=8); offered {offered:.1f} rps "
                f"for {settings.duration_s:g} s, {settings.high_share:.0%} high; max_queued "
                f"{settings.max_queued}",
                (
                    "max_in_flight",
                    "high p50 unloaded ms",
                    "high p99 unloaded ms",
                    "high p50 loaded ms",
                    "high p99 loaded ms",
                    "p99 ratio",
                    "high shed/sent",
                    "low served/shed/other",
                    "served rps",
                    "sidecar peak RSS MiB",
                    "sidecar CPU ms/request",
                ),
                tuple(rows),
            ),
        ),
        notes=(
            *(("quick mode: on the quick run's shared fleet",) if shared else ()),
            f"logs: {run_dir}",
        ),
        data={
            "capacity_rps": capacity,
            "offered_rps": offered,
            "cells": cells,
            "settings": {
                "max_queued": settings.max_queued,
                "duration_s": settings.duration_s,
                "high_share": settings.high_share,
                "load_factor": settings.load_factor,
            },
        },
    )


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = OverloadSettings(seed=options.seed)
    if options.quick:
        settings = replace(
            settings,
            max_in_flight=(8,),
            duration_s=0.5,
            capacity_s=0.5,
            unloaded_s=0.3,
            warmup_s=0.2,
        )
    if options.duration_s:
        settings = replace(settings, duration_s=options.duration_s)
    return run_overload(settings, say, options.shared)
