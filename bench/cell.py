"""One measured cell: one system, on one testbed, under one workload, once.

The system starts fresh (its own processes), gets a warm-up under the workload's pre-shift
popularity, prolonged while its placement still moves (a system that places by demand starts
empty and loads during the warm-up; on a busy machine those loads can outlast it, and the
window is about serving, not about starting), then the measured window. Around the window
the cell reads, the same way for every system: the load generator's records (bench.stats),
loads and unloads from the Tritons' repository indexes (bench.placement_watch), the system's
own count of requests that waited for a load, Triton's average batch size, the CPU time and
peak RSS of the Tritons, of the router and the sidecar where the system has them, and of this
process (the load generator, and the client-side routing of the baselines), the load average,
and the final placement.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.calls import PROMPTS, codegen_request
from bench.cell_detail import (
    instance_work,
    phases,
    placement_events,
    served_by_model,
    timeline,
)
from bench.loadgen import LoadRun, Request, poisson_arrivals, run_closed_loop, run_open_loop
from bench.placement_watch import LoadCounts, PlacementWatcher, load_counts
from bench.procstats import ProcessCost, ProcessSampler
from bench.stats import LoadSummary, summarize
from bench.testbed import Deployment, System, Testbed, server_version
from bench.workloads import ModelChooser, Workload, long_prompt, on_off_arrivals
from router.datalayer.triton_metrics import parse_triton_metrics

__all__ = [
    "QUICK_CELL",
    "CellResult",
    "CellSettings",
    "average_batch",
    "run_cell",
    "start_retrying",
]

Counters = dict[tuple[str, str], tuple[float, float]]


@dataclass(frozen=True, slots=True)
class CellSettings:
    concurrency: int = 16  # closed loop clients
    max_tokens: int = 8  # tokens per request (a stream reads this many responses)
    warmup_s: float = 15.0
    # The warm-up goes on, `settle_s` at a time and `settle_max_s` at most, until no model was
    # loaded or unloaded for `settle_s`.
    settle_s: float = 5.0
    settle_max_s: float = 30.0
    duration_s: float = 30.0
    timeout_s: float = 10.0  # each request's deadline; a timeout is an infinite latency
    capacity_rps: float = math.nan  # open loops offer a fraction of this
    seed: int = 7
    progress: bool = False
    # Stop the system on a thread of its own, so that the next cell starts meanwhile (a
    # Triton takes about 2 s to stop); for smoke runs, where cells need not be alone.
    stop_in_background: bool = False

    def describe(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "max_tokens": self.max_tokens,
            "warmup_s": self.warmup_s,
            "settle_s": self.settle_s,
            "settle_max_s": self.settle_max_s,
            "duration_s": self.duration_s,
            "timeout_s": self.timeout_s,
            "capacity_rps": self.capacity_rps,
            "seed": self.seed,
            "stop_in_background": self.stop_in_background,
        }


# The cell of a smoke run (`--quick`): 4 clients, 4 tokens, a warm-up long enough for a system
# that starts empty to load its models, one second measured, a short deadline, and the system
# stopped on a thread while the next cell starts.
QUICK_CELL = CellSettings(
    concurrency=4,
    max_tokens=4,
    warmup_s=2.0,
    duration_s=1.0,
    timeout_s=5.0,
    stop_in_background=True,
)


@dataclass(frozen=True)
class CellResult:
    system: str
    workload: str
    repetition: int
    order: int  # position of the system within its repetition
    seed: int
    summary: LoadSummary
    warmup_loads: LoadCounts
    loads: LoadCounts
    average_batch: float
    costs: Mapping[str, ProcessCost]
    placement: Mapping[str, list[str]]
    loadavg: tuple[float, float, float]  # at the start of the measured window
    started_utc: str
    elapsed_s: float
    records_by_tag: Mapping[str, int] = field(default_factory=dict)
    triton_version: str = ""
    start_attempts: int = 1
    # The warm-up it had, settling included.
    warmup_s: float = 0.0
    # What explains the figures (bench.cell_detail): phases, timeline, instances, events.
    detail: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "system": self.system,
            "workload": self.workload,
            "triton_version": self.triton_version,
            "start_attempts": self.start_attempts,
            "warmup_s": self.warmup_s,
            "repetition": self.repetition,
            "order": self.order,
            "seed": self.seed,
            "started_utc": self.started_utc,
            "loadavg_1_5_15": list(self.loadavg),
            "wall_s": self.elapsed_s,
            "latency": self.summary.to_dict(),
            "requests_by_model": dict(self.records_by_tag),
            "warmup_loads": self.warmup_loads.to_dict(),
            "loads": self.loads.to_dict(),
            "average_batch_size": self.average_batch,
            "cost": {name: c.to_dict(self.summary.requests) for name, c in self.costs.items()},
            "final_placement": dict(self.placement),
            "detail": dict(self.detail),
        }


def batch_counters(metrics_urls: Sequence[str]) -> Counters:
    """(instance url, model) -> (inference count, execution count), cumulative."""
    counters: Counters = {}
    for url in metrics_urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            metrics = parse_triton_metrics(response.read().decode())
        for model, count in metrics.inference_count_by_model.items():
            counters[(url, model)] = (count, metrics.exec_count_by_model.get(model, 0.0))
    return counters


def average_batch(before: Counters, after: Counters) -> float:
    """Inferences per execution over the window. A series that appeared counts from zero; one
    that vanished (its model was unloaded) or restarted (reloaded) is left out."""
    inferences = executions = 0.0
    for key, (count, execs) in after.items():
        count0, execs0 = before.get(key, (0.0, 0.0))
        if count >= count0 and execs >= execs0:
            inferences += count - count0
            executions += execs - execs0
    return inferences / executions if executions else math.nan


async def _phase(
    deployment: Deployment,
    bed: Testbed,
    workload: Workload,
    settings: CellSettings,
    *,
    duration_s: float,
    shift_at_s: float | None,
    seed: int,
    label: str,
) -> LoadRun:
    """One stretch of the workload against the deployment."""
    streams = settings.concurrency if workload.loop == "closed" else 1
    chooser = ModelChooser(
        bed.models, bed.expected_popularity, seed=seed, streams=streams, shift_at_s=shift_at_s
    )
    prompts = [long_prompt(p, bed.prompt_bytes) for p in PROMPTS]
    bodies = {
        m: [codegen_request(p, settings.max_tokens, model=m) for p in prompts] for m in bed.models
    }
    tokens = settings.max_tokens if workload.streaming else None
    async with deployment.connect(settings.timeout_s) as send:

        def make(key: int, at_s: float) -> Request:
            model = chooser.choose(key, at_s)
            body = chooser.rng(key).choice(bodies[model])
            return Request(send(model, body, tokens), tag=model)

        if workload.loop == "closed":
            return await run_closed_loop(
                make,
                concurrency=settings.concurrency,
                duration_s=duration_s,
                timeout_s=settings.timeout_s,
                label=label,
                progress=settings.progress,
            )
        rate = workload.load_factor * settings.capacity_rps
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"{workload.name}: an open loop needs a measured capacity")
        rng = random.Random(seed)
        arrivals = (
            on_off_arrivals(rate, duration_s, rng)
            if workload.bursts
            else poisson_arrivals(rate, duration_s, rng)
        )
        return await run_open_loop(
            make,
            arrivals=arrivals,
            duration_s=duration_s,
            timeout_s=settings.timeout_s,
            label=label,
            progress=settings.progress,
        )


@dataclass
class _Marks:
    """What is read at the boundary of the measured window, and when it ends."""

    delayed: int = 0
    counters: Counters = field(default_factory=dict)
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    warmup_s: float = 0.0
    start: float = 0.0
    end: float = 0.0


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _start(system: System, bed: Testbed, workdir: Path) -> tuple[Deployment, int]:
    return start_retrying(system.name, lambda folder: system.start(bed, folder), workdir)


def start_retrying(
    name: str, start: Callable[[Path], Deployment], workdir: Path
) -> tuple[Deployment, int]:
    """A system started by `start(folder)`, and how many tries it took: a start that fails (a
    process that dies while coming up) is tried once more in a fresh folder, and the count is
    reported."""
    try:
        return start(workdir), 1
    except Exception as exc:  # retried once; the second failure propagates
        print(f"{name}: start failed ({exc}); trying once more", file=sys.stderr)
    return start(workdir / "second-start"), 2


def run_cell(
    system: System,
    bed: Testbed,
    workload: Workload,
    settings: CellSettings,
    workdir: Path,
    *,
    repetition: int = 0,
    order: int = 0,
) -> CellResult:
    """Starts `system` on `bed`, warms it up, measures it, stops it (see the module docstring)."""
    started_utc, started = _utc(), time.perf_counter()
    seed = settings.seed * 1000 + repetition
    deployment, attempts = _start(system, bed, workdir)
    label = f"{system.name} / {workload.name} #{repetition}"
    try:
        version = server_version(deployment.tritons[0].grpc_address)
        shift_at_s = None if workload.shift_at is None else workload.shift_at * settings.duration_s
        urls = [t.metrics_url for t in deployment.tritons]
        samplers = {"tritons": ProcessSampler(deployment.triton_pids, descendants=True)}
        for name, pid in deployment.component_pids().items():
            samplers[name] = ProcessSampler([pid])
        samplers["bench_process"] = ProcessSampler([os.getpid()])
        marks = _Marks()

        async def warm_then_measure() -> LoadRun:
            # One event loop for both phases: a client-side router's locks and channels live
            # in the loop that first used them.
            if settings.warmup_s > 0:
                await _phase(
                    deployment,
                    bed,
                    workload,
                    settings,
                    duration_s=settings.warmup_s,
                    shift_at_s=None,
                    seed=seed + 500_000,
                    label=f"{label}: warm-up",
                )
                marks.warmup_s = settings.warmup_s
                while marks.warmup_s < settings.warmup_s + settings.settle_max_s and (
                    watch.changed_within(settings.settle_s)
                ):
                    await _phase(
                        deployment,
                        bed,
                        workload,
                        settings,
                        duration_s=settings.settle_s,
                        shift_at_s=None,
                        seed=seed + 600_000 + round(marks.warmup_s),
                        label=f"{label}: warm-up, placement settling",
                    )
                    marks.warmup_s += settings.settle_s
            marks.delayed, marks.counters = deployment.delayed_requests(), batch_counters(urls)
            marks.loadavg, marks.start = os.getloadavg(), time.perf_counter()
            with ExitStack() as stack:
                for sampler in samplers.values():
                    stack.enter_context(sampler)
                run = await _phase(
                    deployment,
                    bed,
                    workload,
                    settings,
                    duration_s=settings.duration_s,
                    shift_at_s=shift_at_s,
                    seed=seed,
                    label=f"{label}: measured",
                )
            marks.end = time.perf_counter()
            return run

        with PlacementWatcher(deployment.tritons) as watch:
            run = asyncio.run(warm_then_measure())
            time.sleep(0.6)  # Triton refreshes its metrics every 250 ms here
            counters_after = batch_counters(urls)
            batch = average_batch(marks.counters, counters_after)
            delayed = deployment.delayed_requests() - marks.delayed
        delayed_before, loadavg = marks.delayed, marks.loadavg
        window_start, window_end = marks.start, marks.end
        reference = window_start + (shift_at_s or 0.0)
        loads = load_counts(watch.events, window_start, window_end, reference, delayed)
        before = [e for e in watch.events if e.at_s < window_start]
        warm = LoadCounts(
            sum(e.loaded for e in before), sum(not e.loaded for e in before), delayed_before, 0.0
        )
        instance_of_url = {t.metrics_url: t.instance_id for t in deployment.tritons}
        detail = {
            "phases": phases(run.records, run.elapsed_s, shift_at_s),
            "timeline": timeline(run.records, run.elapsed_s),
            "served_by_model": served_by_model(run.records, run.elapsed_s),
            "instances": instance_work(marks.counters, counters_after, instance_of_url),
            "placement_events": placement_events(watch.events, window_start, window_end),
        }
        by_tag: dict[str, int] = {}
        for record in run.records:
            by_tag[record.tag] = by_tag.get(record.tag, 0) + 1
        return CellResult(
            system=system.name,
            workload=workload.name,
            repetition=repetition,
            order=order,
            seed=seed,
            summary=summarize(run.records, run.elapsed_s),
            warmup_loads=warm,
            loads=loads,
            average_batch=batch,
            costs={name: s.cost for name, s in samplers.items()},
            placement=watch.placement(),
            loadavg=loadavg,
            started_utc=started_utc,
            elapsed_s=time.perf_counter() - started,
            records_by_tag=dict(sorted(by_tag.items())),
            triton_version=version,
            start_attempts=attempts,
            warmup_s=marks.warmup_s,
            detail=detail,
        )
    finally:
        if settings.stop_in_background:
            # Not a daemon: the interpreter waits for it before it exits.
            threading.Thread(target=deployment.stop, name=f"stop {system.name}").start()
        else:
            deployment.stop()
