"""The prefix scenario's figures: medians over repetitions with 95 % bootstrap intervals, the
throughput at equal TTFT p99, and the goals of issue 14 (reported, never asserted).

Throughput at equal p99: per prefill ratio, the TTFT p99 allowed is `slo_factor` x round
robin's median TTFT p99 at the lowest offered rate; each system's throughput there is its
median goodput at the highest offered rate whose median TTFT p99 stays within it, interpolated
linearly (in TTFT p99) towards the next rate, which exceeds it. Goals: that throughput >= 2.5x
round robin's (aim 3x) at the grounded ratio; Pointsman's hit ratio within 10 points of the
ideal's; with one repository taking half the traffic, no instance above (1 + epsilon) x the
mean load; two sidecars agreeing on >= 95 % of their choices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.report import BarGroup, ScenarioResult, Table, TargetCheck, ratio
from bench.stats import Interval, bootstrap_median

__all__ = ["METRICS", "at_equal_p99", "prefix_result"]

Cell = Mapping[str, Any]


def _latency(key: str) -> Callable[[Cell], float]:
    return lambda c: float(c["latency"][key])


def _optional(read: Callable[[Cell], Any]) -> Callable[[Cell], float]:
    def value(cell: Cell) -> float:
        got = read(cell)
        return math.nan if got is None else float(got)

    return value


def _cost(name: str) -> Callable[[Cell], float]:
    return lambda c: float(c["cost"].get(name, {}).get("cpu_ms_per_request", math.nan))


# (key, column title, how to read it from a cell)
METRICS: tuple[tuple[str, str, Callable[[Cell], float]], ...] = (
    ("ttft_p50_ms", "TTFT p50 ms", _latency("ttft_p50_ms")),
    ("ttft_p99_ms", "TTFT p99 ms", _latency("ttft_p99_ms")),
    ("p99_ms", "p99 ms", _latency("p99_ms")),
    ("goodput_rps", "goodput req/s", _latency("throughput_rps")),
    ("failed", "failed", _latency("failed")),
    ("timed_out", "timed out", _latency("timed_out")),
    ("hit_ratio", "hit ratio", _optional(lambda c: c["prefix_cache"]["hit_ratio"])),
    ("max_mean_load", "max/mean load", _optional(lambda c: c["max_mean_load"])),
    ("sidecar_cpu_ms_per_request", "sidecar CPU ms/req", _cost("sidecar")),
)
_TITLES = {key: title for key, title, _ in METRICS}
Group = tuple[float, str, float]  # prefill ratio, workload, rate factor
Aggregates = dict[Group, dict[str, dict[str, Interval]]]


def aggregate(cells: Sequence[Cell], seed: int) -> Aggregates:
    grouped: dict[tuple[Group, str], list[Cell]] = {}
    for cell in cells:
        group = (float(cell["prefill_ratio"]), str(cell["workload"]), float(cell["rate_factor"]))
        grouped.setdefault((group, str(cell["system"])), []).append(cell)
    result: Aggregates = {}
    for (group, system), runs in sorted(grouped.items(), key=lambda item: item[0]):
        rng = random.Random(seed)
        result.setdefault(group, {})[system] = {
            key: bootstrap_median([read(c) for c in runs], rng) for key, _, read in METRICS
        }
    return result


def at_equal_p99(points: Sequence[tuple[float, float]], slo_ms: float) -> float:
    """The goodput at TTFT p99 = `slo_ms` from (TTFT p99 ms, goodput) points in order of
    offered rate: the goodput of the last point within the SLO before the first beyond it,
    interpolated towards that one; 0 when the first is already beyond; NaN without an SLO."""
    if not math.isfinite(slo_ms):
        return math.nan
    previous: tuple[float, float] | None = None
    for p99, goodput in points:
        if p99 <= slo_ms:
            previous = (p99, goodput)
            continue
        if previous is None:  # beyond the SLO already at the lowest rate (or NaN: none ended)
            return 0.0
        if math.isfinite(p99) and p99 > previous[0]:
            share = (slo_ms - previous[0]) / (p99 - previous[0])
            return previous[1] + share * (goodput - previous[1])
        return previous[1]
    return previous[1] if previous else 0.0


def _throughput_at_slo(aggregates: Aggregates, slo_factor: float) -> dict[float, dict[str, object]]:
    """Per prefill ratio (Zipf workload): the SLO and each system's throughput at it."""
    out: dict[float, dict[str, object]] = {}
    for ratio_value in sorted({g[0] for g in aggregates}, reverse=True):
        groups = sorted((g for g in aggregates if g[0] == ratio_value and g[1] == "zipf"),
                        key=lambda g: g[2])  # fmt: skip
        if len(groups) < 2:  # one offered rate says nothing of where p99 crosses the SLO
            continue
        lowest = aggregates[groups[0]].get("round-robin")
        slo = slo_factor * lowest["ttft_p99_ms"].median if lowest else math.nan
        systems = {s for g in groups for s in aggregates[g]}
        throughput = {
            system: at_equal_p99(
                [
                    (
                        aggregates[g][system]["ttft_p99_ms"].median,
                        aggregates[g][system]["goodput_rps"].median,
                    )
                    for g in groups
                    if system in aggregates[g]
                ],
                slo,
            )
            for system in sorted(systems)
        }
        out[ratio_value] = {"ttft_p99_slo_ms": slo, "throughput_rps": throughput}
    return out


def _text(interval: Interval) -> str:
    if interval.samples == 0:
        return "-"
    return interval.text() if interval.samples > 1 else f"{interval.median:.3g}"


def _goals(
    aggregates: Aggregates,
    at_slo: Mapping[float, Mapping[str, Any]],
    agreement: Mapping[str, Any],
    epsilon: float,
    computed_ideal: Mapping[str, float],
) -> list[TargetCheck]:
    checks = []
    if at_slo:
        grounded = max(at_slo)
        rates = at_slo[grounded]["throughput_rps"]
        gain = ratio(rates.get("pointsman-prefix", math.nan), rates.get("round-robin", math.nan))
        checks.append(TargetCheck(
            f"throughput at equal TTFT p99 vs round robin (prefill ratio {grounded:g})",
            ">= 2.5x (aim 3x)", f"{gain:.2f}x", gain >= 2.5 if math.isfinite(gain) else None,
        ))  # fmt: skip
    for group, systems in aggregates.items():
        if group[1] != "zipf" or "pointsman-prefix" not in systems or "ideal" not in systems:
            continue
        mine, ideal = systems["pointsman-prefix"]["hit_ratio"], systems["ideal"]["hit_ratio"]
        gap = (ideal.median - mine.median) * 100
        checks.append(TargetCheck(
            f"hit ratio within 10 points of the ideal system's (ratio {group[0]:g}, "
            f"x{group[2]:g}; its caches warmed beforehand)",
            "<= 10 points", f"{gap:.1f} points", gap <= 10 if math.isfinite(gap) else None,
        ))  # fmt: skip
        bound = computed_ideal.get(f"{group[1]} x{group[2]:g}", math.nan)
        gap = (bound - mine.median) * 100
        checks.append(TargetCheck(
            f"hit ratio within 10 points of one shared never-evicting cache's (ratio "
            f"{group[0]:g}, x{group[2]:g}; computed)",
            "<= 10 points", f"{gap:.1f} points", gap <= 10 if math.isfinite(gap) else None,
        ))  # fmt: skip
    for group, systems in aggregates.items():
        if group[1] == "hot-repository" and "pointsman-prefix" in systems:
            load = systems["pointsman-prefix"]["max_mean_load"].median
            checks.append(TargetCheck(
                "one repository at half the traffic: max/mean load across instances",
                f"<= {1 + epsilon:g}", f"{load:.2f}",
                load <= 1 + epsilon if math.isfinite(load) else None,
            ))  # fmt: skip
    for workload, figures in agreement.items():
        share = float(figures["agreement"])
        checks.append(TargetCheck(
            f"two sidecars agree on their choices ({workload}, simulated)",
            ">= 95 %", f"{share:.1%}", share >= 0.95 if math.isfinite(share) else None,
        ))  # fmt: skip
    return checks


def prefix_result(
    *,
    settings: Mapping[str, object],
    testbeds: Mapping[str, object],
    capacities: Mapping[str, object],
    cells: Sequence[Cell],
    failures: Sequence[Mapping[str, object]],
    agreement: Mapping[str, Any],
    ideal_hit_ratio: Mapping[str, float],
    seed: int,
    slo_factor: float,
    epsilon: float,
    notes: Sequence[str],
) -> ScenarioResult:
    aggregates = aggregate(cells, seed)
    at_slo = _throughput_at_slo(aggregates, slo_factor)
    keys = [k for k, _, _ in METRICS]
    tables = [
        Table(
            f"prefill ratio {g[0]:g}, {g[1]}, offered {g[2]:g}x capacity: median [95 % CI]",
            ("system", *(_TITLES[k] for k in keys)),
            tuple((s, *(_text(m[k]) for k in keys)) for s, m in systems.items()),
        )
        for g, systems in aggregates.items()
    ]
    for ratio_value, figures in at_slo.items():
        rates = figures["throughput_rps"]
        assert isinstance(rates, dict)
        base = rates.get("round-robin", math.nan)
        tables.append(Table(
            f"prefill ratio {ratio_value:g}: throughput at equal TTFT p99 "
            f"(<= {figures['ttft_p99_slo_ms']:.0f} ms)",
            ("system", "goodput req/s", "vs round robin"),
            tuple((s, f"{v:.1f}", f"{ratio(v, base):.2f}x") for s, v in rates.items()),
        ))  # fmt: skip
    bars = [
        BarGroup(f"ratio {g[0]:g}, {g[1]} x{g[2]:g}: TTFT p99", "ms (log)", tuple(systems),
                 tuple(m["ttft_p99_ms"].median for m in systems.values()), log_scale=True)
        for g, systems in aggregates.items()
    ]  # fmt: skip
    return ScenarioResult(
        name="prefix",
        title="Prefix-aware routing on shared-prefix code-generation traffic",
        tables=tuple(tables),
        bars=tuple(bars),
        targets=tuple(_goals(aggregates, at_slo, agreement, epsilon, ideal_hit_ratio)),
        notes=(
            "Hit ratio: prompt blocks found in the models' prefix caches over those looked up, "
            "from each Triton's own counters over the window. Max/mean load: requests each "
            "instance answered in the window, the busiest over the mean.",
            "Ideal hit ratio of one never-evicting cache every request reaches (computed from "
            "the schedules): " + ", ".join(f"{k} {v:.3f}" for k, v in ideal_hit_ratio.items()),
            f"Cells that failed (not in the figures): {len(failures)}.",
            *notes,
        ),
        data={
            "settings": dict(settings),
            "testbeds": dict(testbeds),
            "capacity": dict(capacities),
            "aggregates": {
                f"{g[0]:g}/{g[1]}/{g[2]:g}": {
                    s: {k: i.to_dict() for k, i in m.items()} for s, m in systems.items()
                }
                for g, systems in aggregates.items()
            },
            "throughput_at_equal_ttft_p99": {f"{r:g}": f for r, f in at_slo.items()},
            "ideal_hit_ratio_computed": dict(ideal_hit_ratio),
            "sidecar_agreement": dict(agreement),
            "cells": list(cells),
            "failed_cells": [dict(f) for f in failures],
        },
    )
