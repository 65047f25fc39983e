"""One measured cell of the prefix scenario: a system, a testbed, a workload at one rate, once.

The system starts fresh (cold caches), a warm-up runs the same workload (another seed) so the
caches hold what a running service's would, then the measured open loop: arrivals scheduled
in advance, every request a stream (time to first token). Around the window the cell reads,
the same way for every system, each Triton's own counters of the model: prefix-cache lookups
and hits (the hit ratio), requests answered (the load across instances: max over mean); and
the CPU time and peak RSS of the Tritons, of the router and the sidecar where the system has
them, and of this process.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.calls import codegen_request
from bench.cell import start_retrying
from bench.loadgen import LoadRun, Request, run_closed_loop, run_open_loop
from bench.prefix_systems import MODEL, SESSION_HEADER, PrefixBed, PrefixSystem
from bench.prefix_workload import Arrival, PrefixWorkload, schedule
from bench.procstats import ProcessSampler
from bench.stats import summarize, summarize_by_tag
from bench.testbed import Deployment
from router.datalayer.triton_metrics import parse_triton_metrics

__all__ = ["CellPlan", "InstanceCounters", "measure_capacity", "run_prefix_cell"]


@dataclass(frozen=True, slots=True)
class CellPlan:
    """What one cell runs: the workload at `rate_rps` for `duration_s` after `warmup_s`."""

    workload: PrefixWorkload
    variant: str  # the workload's name in the results ("zipf", "hot-repository")
    rate_factor: float  # of the testbed's measured capacity
    rate_rps: float
    warmup_s: float
    duration_s: float
    timeout_s: float
    seed: int


@dataclass(frozen=True, slots=True)
class InstanceCounters:
    """One Triton's cumulative counters of the model."""

    lookups: float
    hits: float
    requests: float


def read_counters(metrics_urls: Sequence[str]) -> dict[str, InstanceCounters]:
    counters = {}
    for url in metrics_urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            m = parse_triton_metrics(response.read().decode())
        counters[url] = InstanceCounters(
            m.prefix_lookups_by_model.get(MODEL, 0.0),
            m.prefix_hits_by_model.get(MODEL, 0.0),
            m.success_by_model.get(MODEL, 0.0),
        )
    return counters


def _increases(
    before: dict[str, InstanceCounters], after: dict[str, InstanceCounters]
) -> dict[str, InstanceCounters]:
    zero = InstanceCounters(0.0, 0.0, 0.0)
    return {
        url: InstanceCounters(
            a.lookups - before.get(url, zero).lookups,
            a.hits - before.get(url, zero).hits,
            a.requests - before.get(url, zero).requests,
        )
        for url, a in after.items()
    }


async def _open_loop(
    deployment: Deployment, arrivals: Sequence[Arrival], duration_s: float, timeout_s: float
) -> LoadRun:
    """The arrivals against the deployment, each a stream of its tokens, tagged by kind."""
    bodies = [codegen_request(a.prompt.decode(), a.tokens, model=MODEL) for a in arrivals]
    async with deployment.connect(timeout_s) as send:

        def make(index: int, _at_s: float) -> Request:
            arrival = arrivals[index]
            metadata = ((SESSION_HEADER, f"s{arrival.session}"),) if arrival.session >= 0 else ()
            return Request(send(MODEL, bodies[index], arrival.tokens, metadata), arrival.kind)

        return await run_open_loop(
            make, arrivals=[a.at_s for a in arrivals], duration_s=duration_s, timeout_s=timeout_s
        )


def run_prefix_cell(
    system: PrefixSystem,
    prefix_bed: PrefixBed,
    plan: CellPlan,
    workdir: Path,
    *,
    repetition: int,
    order: int,
) -> dict[str, object]:
    """Starts `system`, warms it up, measures it, stops it; the cell's figures as plain data."""
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = time.perf_counter()
    warm = schedule(plan.workload, plan.rate_rps, plan.warmup_s, random.Random(plan.seed + 1))
    measured = schedule(plan.workload, plan.rate_rps, plan.duration_s, random.Random(plan.seed))
    deployment, attempts = _start(system, prefix_bed, workdir)
    try:
        urls = [t.metrics_url for t in deployment.tritons]
        samplers = {"tritons": ProcessSampler(deployment.triton_pids, descendants=True)}
        for name, pid in deployment.component_pids().items():
            samplers[name] = ProcessSampler([pid])
        samplers["bench_process"] = ProcessSampler([os.getpid()])
        if warm:
            asyncio.run(_open_loop(deployment, warm, plan.warmup_s, plan.timeout_s))
        time.sleep(0.6)  # Triton refreshes its own counters every 250 ms here
        before, loadavg = read_counters(urls), os.getloadavg()
        with ExitStack() as stack:
            for sampler in samplers.values():
                stack.enter_context(sampler)
            run = asyncio.run(_open_loop(deployment, measured, plan.duration_s, plan.timeout_s))
        time.sleep(0.6)
        window = _increases(before, read_counters(urls))
    finally:
        deployment.stop()
    summary = summarize(run.records, run.elapsed_s)
    lookups = sum(c.lookups for c in window.values())
    hits = sum(c.hits for c in window.values())
    served = [c.requests for c in window.values()]
    mean = sum(served) / len(served) if served else 0.0
    return {
        "system": system.name,
        "prefill_ratio": prefix_bed.prefill_ratio,
        "workload": plan.variant,
        "rate_factor": plan.rate_factor,
        "offered_rps": plan.rate_rps,
        "repetition": repetition,
        "order": order,
        "seed": plan.seed,
        "start_attempts": attempts,
        "started_utc": started_utc,
        "loadavg_1_5_15": list(loadavg),
        "wall_s": time.perf_counter() - started,
        "latency": summary.to_dict(),
        "by_kind": {
            k: s.to_dict() for k, s in summarize_by_tag(run.records, run.elapsed_s).items()
        },
        "prefix_cache": {
            "lookup_blocks": lookups,
            "hit_blocks": hits,
            "hit_ratio": hits / lookups if lookups else None,
        },
        "instances": {
            url: {"requests": c.requests, "lookup_blocks": c.lookups, "hit_blocks": c.hits}
            for url, c in window.items()
        },
        "max_mean_load": max(served) / mean if mean else None,
        "cost": {name: s.cost.to_dict(summary.requests) for name, s in samplers.items()},
    }


def _start(system: PrefixSystem, prefix_bed: PrefixBed, workdir: Path) -> tuple[Deployment, int]:
    """Started once more if the first start fails (on a shared machine, say, a free port taken
    by another process before Triton binds it)."""
    return start_retrying(system.name, lambda folder: system.start(prefix_bed, folder), workdir)


def measure_capacity(
    system: PrefixSystem,
    prefix_bed: PrefixBed,
    workload: PrefixWorkload,
    *,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    seed: int,
    workdir: Path,
) -> dict[str, object]:
    """`system`'s closed-loop goodput on the workload's prompts (in their scheduled order, each
    client taking the next): the reference the open loops offer fractions of."""
    prompts = schedule(workload, 10.0, max(duration_s * 10, 60.0), random.Random(seed))
    bodies = [codegen_request(a.prompt.decode(), a.tokens, model=MODEL) for a in prompts]
    deployment, _ = _start(system, prefix_bed, workdir)
    taken = iter(range(1 << 62))

    async def closed() -> LoadRun:
        async with deployment.connect(timeout_s) as send:

            def make(_worker: int, _at_s: float) -> Request:
                index = next(taken) % len(prompts)
                return Request(send(MODEL, bodies[index], prompts[index].tokens), "capacity")

            return await run_closed_loop(
                make,
                concurrency=concurrency,
                duration_s=duration_s,
                warmup_s=min(5.0, duration_s / 2),
                timeout_s=timeout_s,
            )

    try:
        run = asyncio.run(closed())
    finally:
        deployment.stop()
    summary = summarize(run.records, run.elapsed_s)
    return {"system": system.name, "concurrency": concurrency, "latency": summary.to_dict()}
