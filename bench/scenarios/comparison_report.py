"""The comparison's figures: medians over repetitions with 95 % bootstrap intervals, the goals.

Every metric of every (workload, system) is reduced over its repetitions to a median and a
percentile-bootstrap interval (bench.stats.bootstrap_median). The goals of issue 13 are
reported, never asserted: on each shift workload, Pointsman's p99 at most 0.5x each fair
baseline's (fair: not the worst case), at 1.5x its goodput or more (judged only where the load
saturates: a closed loop, or an open loop at or above capacity), with no failed or timed-out
request, and with intervals that do not overlap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

from bench.baselines import FAIR_BASELINES
from bench.cell import CellResult
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck, ratio
from bench.stats import Interval, bootstrap_median
from bench.workloads import WORKLOADS

__all__ = ["METRICS", "aggregate", "comparison_result"]


def _cost(name: str, key: str) -> Callable[[CellResult], float]:
    def read(cell: CellResult) -> float:
        cost = cell.costs.get(name)
        if cost is None:
            return math.nan
        figures = cost.to_dict(cell.summary.requests)
        return float(figures[key])

    return read


def _after_shift(key: str) -> Callable[[CellResult], float]:
    def read(cell: CellResult) -> float:
        phases = cell.detail.get("phases")
        if not isinstance(phases, Mapping) or "after" not in phases:
            return math.nan
        return float(phases["after"][key])

    return read


# (key, column title, how to read it from a cell)
METRICS: tuple[tuple[str, str, Callable[[CellResult], float]], ...] = (
    ("p50_ms", "p50 ms", lambda c: c.summary.p50_ms),
    ("p99_ms", "p99 ms", lambda c: c.summary.p99_ms),
    ("goodput_rps", "goodput req/s", lambda c: c.summary.throughput_rps),
    ("failed", "failed", lambda c: float(c.summary.failed)),
    ("timed_out", "timed out", lambda c: float(c.summary.timed_out)),
    ("ttft_p50_ms", "TTFT p50 ms", lambda c: c.summary.ttft_p50_ms),
    ("ttft_p99_ms", "TTFT p99 ms", lambda c: c.summary.ttft_p99_ms),
    ("itl_p99_ms", "ITL p99 ms", lambda c: c.summary.itl_p99_ms),
    ("after_shift_goodput_rps", "after shift req/s", _after_shift("goodput_rps")),
    ("after_shift_p99_ms", "after shift p99 ms", _after_shift("p99_ms")),
    ("loads", "loads", lambda c: float(c.loads.loads)),
    ("delayed_requests", "delayed by a load", lambda c: float(c.loads.delayed_requests)),
    ("converge_s", "converge s", lambda c: c.loads.converge_s),
    ("average_batch", "avg batch", lambda c: c.average_batch),
    ("sidecar_cpu_ms_per_request", "sidecar CPU ms/req", _cost("sidecar", "cpu_ms_per_request")),
    ("router_cpu_ms_per_request", "router CPU ms/req", _cost("router", "cpu_ms_per_request")),
    ("bench_cpu_ms_per_request", "client CPU ms/req", _cost("bench_process", "cpu_ms_per_request")),
    ("sidecar_peak_rss_mib", "sidecar RSS MiB", _cost("sidecar", "peak_rss_mib")),
    ("router_peak_rss_mib", "router RSS MiB", _cost("router", "peak_rss_mib")),
    ("tritons_peak_rss_mib", "Tritons RSS MiB", _cost("tritons", "peak_rss_mib")),
)
_LATENCY = (
    "p50_ms",
    "p99_ms",
    "goodput_rps",
    "failed",
    "timed_out",
    "loads",
    "delayed_requests",
    "converge_s",
)
_STREAM = ("ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms")
# The second half of a shift workload: what following the shift bought.
_SHIFT = ("after_shift_goodput_rps", "after_shift_p99_ms")
_COST = (
    "average_batch",
    "sidecar_cpu_ms_per_request",
    "router_cpu_ms_per_request",
    "bench_cpu_ms_per_request",
    "sidecar_peak_rss_mib",
    "router_peak_rss_mib",
    "tritons_peak_rss_mib",
)
_TITLES = {key: title for key, title, _ in METRICS}

Aggregates = dict[str, dict[str, dict[str, Interval]]]  # workload -> system -> metric -> interval


def aggregate(cells: Sequence[CellResult], seed: int) -> Aggregates:
    """Median and 95 % bootstrap interval of every metric, per workload and system."""
    grouped: dict[tuple[str, str], list[CellResult]] = {}
    for cell in cells:
        grouped.setdefault((cell.workload, cell.system), []).append(cell)
    result: Aggregates = {}
    for (workload, system), runs in grouped.items():
        rng = random.Random(seed)
        result.setdefault(workload, {})[system] = {
            key: bootstrap_median([read(c) for c in runs], rng) for key, _, read in METRICS
        }
    return result


def _text(interval: Interval) -> str:
    if interval.samples == 0:
        return "-"
    return interval.text() if interval.samples > 1 else f"{interval.median:.3g}"


def _goal_checks(aggregates: Aggregates) -> list[TargetCheck]:
    """The goals on every shift workload, against EACH fair baseline: a baseline with the
    lowest p99 may still fail requests (they are not in its percentiles), so none is
    singled out as "the best"; the goal holds when it holds against all of them."""
    checks = []
    for workload, systems in aggregates.items():
        if not workload.startswith("shift") or "pointsman" not in systems:
            continue
        mine = systems["pointsman"]
        repeated = mine["p99_ms"].samples > 1
        # Below capacity every system that keeps up serves what is offered: goodput cannot
        # tell them apart there, only a closed loop or an offer above capacity can.
        shape = WORKLOADS.get(workload)
        saturating = shape is None or shape.loop == "closed" or shape.load_factor >= 1.0
        errors = mine["failed"].median + mine["timed_out"].median
        checks.append(
            TargetCheck(
                f"{workload}: Pointsman failed + timed out (median)",
                "0",
                f"{errors:g}",
                errors == 0,
            )
        )
        for baseline in (s for s in FAIR_BASELINES if s in systems):
            theirs = systems[baseline]
            p99 = ratio(mine["p99_ms"].median, theirs["p99_ms"].median)
            goodput = ratio(mine["goodput_rps"].median, theirs["goodput_rps"].median)
            apart = not mine["p99_ms"].overlaps(theirs["p99_ms"]) and not mine[
                "goodput_rps"
            ].overlaps(theirs["goodput_rps"])
            checks += [
                TargetCheck(f"{workload}: p99 vs {baseline}", "<= 0.5x", f"{p99:.2f}x", p99 <= 0.5),
                TargetCheck(
                    f"{workload}: goodput vs {baseline}",
                    ">= 1.5x",
                    f"{goodput:.2f}x" + ("" if saturating else " (offered below capacity)"),
                    goodput >= 1.5 if saturating else None,
                ),
                TargetCheck(
                    f"{workload}: p99 and goodput intervals apart from {baseline}'s",
                    "no overlap",
                    ("apart" if apart else "overlap") if repeated else "one repetition",
                    apart if repeated else None,
                ),
            ]
    return checks


def _tables(aggregates: Aggregates, repetitions: Mapping[str, int]) -> list[Table]:
    tables = []
    for workload, systems in aggregates.items():
        streamed = any(not math.isnan(s["ttft_p50_ms"].median) for s in systems.values())
        shifted = any(not math.isnan(s["after_shift_p99_ms"].median) for s in systems.values())
        latency = _LATENCY + (_STREAM if streamed else ()) + (_SHIFT if shifted else ())
        n = repetitions.get(workload, 0)
        tables.append(
            Table(
                f"{workload}: median [95 % bootstrap interval] over {n} repetition(s)",
                ("system", *(_TITLES[k] for k in latency)),
                tuple((s, *(_text(m[k]) for k in latency)) for s, m in systems.items()),
            )
        )
        tables.append(
            Table(
                f"{workload}: cost (median over repetitions)",
                ("system", *(_TITLES[k] for k in _COST)),
                tuple((s, *(_text(m[k]) for k in _COST)) for s, m in systems.items()),
            )
        )
    return tables


def comparison_result(
    *,
    settings_data: Mapping[str, object],
    testbeds: Mapping[str, object],
    cells: Sequence[CellResult],
    seed: int,
    notes: Sequence[str],
    failures: Sequence[Mapping[str, object]] = (),
    capacity: CellResult | None = None,
    capacities: Mapping[str, CellResult] | None = None,
) -> ScenarioResult:
    """The scenario's result; `capacities` per testbed kind ("unary", "accelerator"), or
    `capacity` alone for the unary testbed."""
    if capacities is None:
        capacities = {"unary": capacity} if capacity is not None else {}
    aggregates = aggregate(cells, seed)
    repetitions: dict[str, int] = {}
    for cell in cells:
        repetitions[cell.workload] = max(repetitions.get(cell.workload, 0), cell.repetition + 1)
    bars = []
    for workload, systems in aggregates.items():
        labels = tuple(systems)
        bars.append(
            BarGroup(
                f"{workload}: p99",
                "ms (log)",
                labels,
                tuple(m["p99_ms"].median for m in systems.values()),
                log_scale=True,
            )
        )
        bars.append(
            BarGroup(
                f"{workload}: goodput",
                "req/s",
                labels,
                tuple(m["goodput_rps"].median for m in systems.values()),
            )
        )
    measured = ", ".join(
        f"{kind} {cell.summary.throughput_rps:.1f} req/s" for kind, cell in capacities.items()
    )
    return ScenarioResult(
        name="comparison",
        title="Comparison: Pointsman vs fair baselines, repeated and interleaved",
        tables=tuple(_tables(aggregates, repetitions)),
        bars=tuple(bars),
        targets=tuple(_goal_checks(aggregates)),
        notes=(
            f"Capacity (static split, closed loop, steady), per testbed: {measured or 'none'}; "
            "open loops offer a fraction of their testbed's.",
            "A timeout counts as an infinite latency in the percentiles (inf); failed and timed "
            "out requests stand beside them. Loads: models that became READY in the measured "
            "window, from the Tritons' repository indexes, the same for every system.",
            f"Cells that failed (not in the figures): {len(failures)}; cells whose system "
            f"needed a second start: {sum(c.start_attempts > 1 for c in cells)}.",
            *notes,
        ),
        data={
            "settings": dict(settings_data),
            "testbeds": dict(testbeds),
            "capacity": capacities["unary"].to_dict() if "unary" in capacities else None,
            "capacities": {kind: cell.to_dict() for kind, cell in capacities.items()},
            "aggregates": {
                w: {s: {k: i.to_dict() for k, i in m.items()} for s, m in systems.items()}
                for w, systems in aggregates.items()
            },
            "cells": [c.to_dict() for c in cells],
            "failed_cells": [dict(f) for f in failures],
        },
    )
