"""Scenario `prefix`: prefix-aware routing on shared-prefix code-generation traffic (issue 14).

The workload (bench/prefix_workload.py): repositories with Zipf popularity, each with a long
shared context; many short completions per repository and multi-turn sessions, every request
streamed (time to first token). The systems (bench/prefix_systems.py): round robin,
least-request, Pointsman without and with prefix routing, and the ideal (every request finds
its prefix). The model's prefix cache and prefill cost are the stand-in's, grounded in
published measurements (triton_models/README.md: prefill ratio 0.26); every cell is also run
at half that ratio.

Method (issue 13's): capacity is measured first per prefill ratio (round robin, closed loop);
the open loops offer fractions of it. Each repetition runs every rate on every system, systems
in an order rotated by one per repetition, each cell on fresh processes with cold caches, a
warm-up, then the measured window; the same seeded arrivals for every system of a repetition.
Medians over repetitions with 95 % bootstrap intervals (bench/scenarios/prefix_report.py):
TTFT p50/p99, latency p99, goodput, the prefix caches' hit ratio (from Triton's own counters),
max/mean requests across instances; throughput at equal TTFT p99; a hot-repository run (one
repository takes half the traffic) for the load bound; and the agreement of two sidecars that
share nothing, simulated with the sidecar's own choice on the measured workload. Every cell is
appended to `cells.jsonl` as it finishes.
"""

from __future__ import annotations

import heapq
import json
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.prefix_cell import CellPlan, measure_capacity, run_prefix_cell
from bench.prefix_systems import PREFIX_SYSTEMS, PrefixBed, testbed
from bench.prefix_workload import Arrival, PrefixWorkload, schedule
from bench.report import ScenarioResult
from bench.scenarios import Options, Say
from bench.scenarios.comparison import interleaved
from bench.scenarios.prefix_report import prefix_result
from pointsman.prefix import PrefixBlocks, prefix_key
from sidecar import prefix_routing
from sidecar.balancer import CandidateSet
from sidecar.testing import MockTransport

__all__ = ["PrefixSettings", "run_prefix", "scenario", "sidecar_agreement"]

CAPACITY_SYSTEM = "round-robin"
HOT = "hot-repository"


@dataclass(frozen=True, slots=True)
class PrefixSettings:
    systems: tuple[str, ...] = tuple(PREFIX_SYSTEMS)
    workload: PrefixWorkload = field(default_factory=PrefixWorkload)
    instances: int = 3
    rate_factors: tuple[float, ...] = (0.6, 1.0, 1.4, 1.8)
    prefill_ratios: tuple[float, ...] = (0.26, 0.13)
    repetitions: int = 5
    warmup_s: float = 10.0
    duration_s: float = 30.0
    timeout_s: float = 15.0
    capacity_s: float = 20.0
    capacity_concurrency: int = 16
    # When set, the open loops offer fractions of this instead of a measured capacity (the
    # quick smoke run, which has no time for a capacity cell).
    capacity_rps: float | None = None
    cache_blocks: int = 2048  # the models' default: 128 KiB of prompt per instance
    ideal_cache_blocks: int = 16384
    epsilon: float = 0.25
    # The hot-repository run: these systems, one repository at this share, at rate 1.0x.
    hot_systems: tuple[str, ...] = ("least-request", "pointsman-prefix")
    hot_share: float = 0.5
    # Throughput at equal p99: the TTFT p99 allowed, as a multiple of round robin's TTFT p99
    # at the lowest rate.
    slo_factor: float = 2.0
    seed: int = 7

    def describe(self) -> dict[str, object]:
        return {
            "systems": list(self.systems),
            "workload": self.workload.describe(),
            "instances": self.instances,
            "rate_factors": list(self.rate_factors),
            "prefill_ratios": list(self.prefill_ratios),
            "repetitions": self.repetitions,
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "timeout_s": self.timeout_s,
            "capacity_s": self.capacity_s,
            "capacity_system": CAPACITY_SYSTEM,
            "capacity_concurrency": self.capacity_concurrency,
            "capacity_rps": self.capacity_rps,
            "cache_blocks": self.cache_blocks,
            "ideal_cache_blocks": self.ideal_cache_blocks,
            "epsilon": self.epsilon,
            "hot_systems": list(self.hot_systems),
            "hot_share": self.hot_share,
            "slo_factor": self.slo_factor,
            "seed": self.seed,
        }


def sidecar_agreement(
    arrivals: Sequence[Arrival],
    instances: int,
    epsilon: float,
    latency_s: float,
    rng: random.Random,
    sidecars: int = 2,
) -> dict[str, float]:
    """How often sidecars that share nothing choose the same instance for a request: the
    arrivals go to the sidecars in turn; each keeps its own in-flight counts (a request stays
    in flight an exponential time of mean `latency_s`); for every request with a key, each
    sidecar's choice (`sidecar.prefix_routing.choose`, the code the sidecar runs) is compared
    with the choice of the sidecar that routes it. Also: the share the routing sidecar sent
    past the key's first holder for load, and the agreement on the others."""
    addresses = [f"10.0.0.{i}:8001" for i in range(instances)]
    transport = MockTransport(lambda _call: b"")
    views = [[transport(a) for a in addresses] for _ in range(sidecars)]
    sets = [CandidateSet(view, [1.0] * instances) for view in views]
    blocks = PrefixBlocks(64, 16)
    ending: list[tuple[float, int, int]] = []  # (end time, sidecar, instance index)
    keyed = same = fallbacks = same_kept = 0
    for index, arrival in enumerate(arrivals):
        while ending and ending[0][0] <= arrival.at_s:
            _, sidecar, instance = heapq.heappop(ending)
            views[sidecar][instance].in_flight -= 1
        key = prefix_key(arrival.prompt, blocks)
        if key is None:
            continue
        own = index % sidecars
        chosen = [prefix_routing.choose(key, s, epsilon) for s in sets]
        routed, outcome = chosen[own]
        keyed += 1
        agreed = all(c[0].address == routed.address for c in chosen)
        same += agreed
        if outcome == prefix_routing.LOAD_FALLBACK:
            fallbacks += 1
        else:
            same_kept += agreed
        instance = addresses.index(routed.address)
        views[own][instance].in_flight += 1
        end = arrival.at_s + rng.expovariate(1 / latency_s)
        heapq.heappush(ending, (end, own, instance))
    return {
        "requests": keyed,
        "agreement": same / keyed if keyed else float("nan"),
        "load_fallback_share": fallbacks / keyed if keyed else float("nan"),
        # Among the requests the routing sidecar kept on the key's first holder.
        "agreement_when_kept": same_kept / (keyed - fallbacks) if keyed > fallbacks else 1.0,
        "latency_s": latency_s,
        "sidecars": sidecars,
    }


def run_prefix(settings: PrefixSettings, say: Say = lambda _line: None) -> ScenarioResult:
    for name in (*settings.systems, *settings.hot_systems):
        if name not in PREFIX_SYSTEMS:
            raise ValueError(f"unknown system {name!r} (known: {', '.join(PREFIX_SYSTEMS)})")
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-prefix-"))
    journal = workdir / "cells.jsonl"
    capacities: dict[float, dict[str, object]] = {}
    cells: list[dict[str, object]] = []
    failures: list[dict[str, object]] = []

    def record(line: dict[str, object]) -> None:
        with journal.open("a") as out:
            out.write(json.dumps(line, default=str) + "\n")

    beds: dict[float, PrefixBed] = {}
    for ratio in settings.prefill_ratios:
        beds[ratio] = testbed(
            workdir / f"ratio-{ratio:g}", instances=settings.instances, prefill_ratio=ratio,
            cache_blocks=settings.cache_blocks, ideal_cache_blocks=settings.ideal_cache_blocks,
            repositories=settings.workload.repositories,
            context_bytes=settings.workload.context_bytes, epsilon=settings.epsilon,
        )  # fmt: skip
        if settings.capacity_rps is not None:
            capacities[ratio] = {"fixed_rps": settings.capacity_rps}
            continue
        say(f"prefix: prefill ratio {ratio:g}: measuring capacity ({CAPACITY_SYSTEM}) ...")
        capacities[ratio] = measure_capacity(
            PREFIX_SYSTEMS[CAPACITY_SYSTEM], beds[ratio], settings.workload,
            concurrency=settings.capacity_concurrency, duration_s=settings.capacity_s,
            timeout_s=settings.timeout_s, seed=settings.seed,
            workdir=workdir / f"capacity-{ratio:g}",
        )  # fmt: skip
        latency = capacities[ratio]["latency"]
        assert isinstance(latency, dict)
        say(f"prefix: capacity {latency['throughput_rps']:.1f} req/s")
    plans = _plans(settings, capacities)
    total = settings.repetitions * sum(len(systems) for _, _, systems in plans)
    for repetition in range(settings.repetitions):
        for ratio, plan, systems in plans:
            plan = replace(plan, seed=settings.seed * 1000 + repetition)
            for order, name in enumerate(interleaved(systems, repetition)):
                say(
                    f"prefix: [{len(cells) + len(failures) + 1}/{total}] repetition "
                    f"{repetition + 1}, ratio {ratio:g}, {plan.variant} "
                    f"x{plan.rate_factor:g}, {name}"
                )
                folder = (
                    workdir / f"r{repetition}-{ratio:g}-{plan.variant}-{plan.rate_factor:g}-{name}"
                )
                try:
                    cell = run_prefix_cell(
                        PREFIX_SYSTEMS[name], beds[ratio], plan, folder,
                        repetition=repetition, order=order,
                    )  # fmt: skip
                except Exception as exc:  # one lost cell must not lose the others
                    failure = {"system": name, "prefill_ratio": ratio, "workload": plan.variant,
                               "rate_factor": plan.rate_factor, "repetition": repetition,
                               "error": repr(exc)}  # fmt: skip
                    say(f"prefix: cell failed: {failure}")
                    failures.append(failure)
                    record({"failed": failure})
                    continue
                cells.append(cell)
                record(cell)
    agreement = _agreement(settings, plans, cells)
    return prefix_result(
        settings=settings.describe(),
        testbeds={f"{r:g}": b.describe() for r, b in beds.items()},
        capacities={f"{r:g}": c for r, c in capacities.items()},
        cells=cells,
        failures=failures,
        agreement=agreement,
        ideal_hit_ratio=_ideal_ratio(settings, plans),
        seed=settings.seed,
        slo_factor=settings.slo_factor,
        epsilon=settings.epsilon,
        notes=(f"raw cells as measured: {journal}", f"logs: {workdir}"),
    )


def _plans(
    settings: PrefixSettings, capacities: dict[float, dict[str, object]]
) -> list[tuple[float, CellPlan, tuple[str, ...]]]:
    """(prefill ratio, cell plan, systems) of one repetition: every rate of the Zipf workload
    on every system, then the hot-repository workload at rate 1.0 on the hot systems."""
    plans = []
    for ratio, capacity in capacities.items():
        rps = _capacity_rps(capacity)
        for factor in settings.rate_factors:
            plan = CellPlan(settings.workload, "zipf", factor, factor * rps, settings.warmup_s,
                            settings.duration_s, settings.timeout_s, settings.seed)  # fmt: skip
            plans.append((ratio, plan, settings.systems))
        if settings.hot_systems and ratio == settings.prefill_ratios[0]:
            hot = replace(settings.workload, hot_share=settings.hot_share)
            plan = CellPlan(hot, HOT, 1.0, rps, settings.warmup_s, settings.duration_s,
                            settings.timeout_s, settings.seed)  # fmt: skip
            plans.append((ratio, plan, settings.hot_systems))
    return plans


def _capacity_rps(capacity: dict[str, object]) -> float:
    """The rate the open loops offer fractions of: the measured goodput, or the fixed one."""
    latency = capacity.get("latency")
    if isinstance(latency, dict):
        return float(latency["throughput_rps"])
    fixed = capacity["fixed_rps"]
    assert isinstance(fixed, float | int)
    return float(fixed)


def _ideal_ratio(
    settings: PrefixSettings, plans: list[tuple[float, CellPlan, tuple[str, ...]]]
) -> dict[str, float]:
    """The hit ratio of one never-evicting cache that every request reaches, per workload and
    rate (the measured schedules of the first repetition)."""
    from bench.prefix_workload import shareable_blocks

    ratios = {}
    for _, plan, _ in plans:
        key = f"{plan.variant} x{plan.rate_factor:g}"
        if key in ratios:
            continue
        arrivals = schedule(plan.workload, plan.rate_rps, plan.duration_s,
                            random.Random(settings.seed * 1000))  # fmt: skip
        lookups, hits = shareable_blocks(arrivals, 64)
        ratios[key] = hits / lookups if lookups else float("nan")
    return ratios


def _agreement(
    settings: PrefixSettings,
    plans: list[tuple[float, CellPlan, tuple[str, ...]]],
    cells: list[dict[str, object]],
) -> dict[str, object]:
    """Two sidecars' agreement on each workload at rate 1.0, with the in-flight time the
    prefix-routed cells measured there (their median mean latency; 1 s if none ran)."""
    result: dict[str, object] = {}
    for ratio, plan, _ in plans:
        if plan.rate_factor != 1.0 or ratio != settings.prefill_ratios[0]:
            continue
        means = sorted(
            float(c["latency"]["mean_ms"]) / 1000  # type: ignore[index]
            for c in cells
            if c["system"] == "pointsman-prefix" and c["workload"] == plan.variant
            and c["rate_factor"] == 1.0 and c["prefill_ratio"] == ratio
        )  # fmt: skip
        latency_s = means[len(means) // 2] if means else 1.0
        arrivals = schedule(plan.workload, plan.rate_rps, plan.duration_s,
                            random.Random(settings.seed * 1000))  # fmt: skip
        result[plan.variant] = sidecar_agreement(
            arrivals, settings.instances, settings.epsilon, latency_s, random.Random(settings.seed)
        )
    return result


# The smoke run: two systems on two instances, a fixed rate, seconds of traffic (the scenario
# starts a fleet per cell, so every system or rate more costs a start).
QUICK = PrefixSettings(
    systems=("round-robin", "pointsman-prefix"),
    workload=PrefixWorkload(repositories=6, context_bytes=4096, turns=2, turn_gap_s=1.0),
    instances=2,
    rate_factors=(1.0,),
    prefill_ratios=(0.26,),
    repetitions=1,
    warmup_s=1.0,
    duration_s=3.0,
    timeout_s=10.0,
    capacity_rps=8.0,
    ideal_cache_blocks=4096,
    hot_systems=(),
)


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = QUICK if options.quick else PrefixSettings()
    settings = replace(settings, seed=options.seed)
    if options.duration_s:
        settings = replace(settings, duration_s=options.duration_s)
    if options.repetitions:
        settings = replace(settings, repetitions=options.repetitions)
    if options.systems:
        hot = tuple(s for s in settings.hot_systems if s in options.systems)
        settings = replace(settings, systems=options.systems, hot_systems=hot)
    return run_prefix(settings, say)
