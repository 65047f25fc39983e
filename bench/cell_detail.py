"""What a cell records beyond its headline figures, to explain a result rather than state it.

- `phases`: on a shift workload, the window before and after the shift summarized apart
  (goodput, percentiles), and after the shift per model: a system that is hurt by the shift
  shows it here, one that is not shows the same figures on both sides.
- `timeline`: per second of the window, successful calls and their p50 / p99 (by start time):
  how long a transition lasts, and whether loads stall serving while they run.
- `served_by_model`: per model, successful calls per second by the time they ended: what a
  router that counts answered requests can see of each model's demand.
- `instances`: per instance, inferences and executions in the window (Triton's counters): how
  evenly a system spreads the work (herding shows as one instance far above the others).
- `placement_events`: every model that became or stopped being READY, seconds from the
  window's start: churn (a copy unloaded and loaded again) is visible one event at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bench.loadgen import OK, CallRecord
from bench.placement_watch import PlacementEvent
from bench.stats import percentile, summarize, summarize_by_tag

__all__ = [
    "instance_work",
    "phases",
    "placement_events",
    "served_by_model",
    "timeline",
]

# (instance metrics url, model) -> (inference count, execution count), cumulative.
Counters = Mapping[tuple[str, str], tuple[float, float]]


def _brief(records: Sequence[CallRecord], elapsed_s: float) -> dict[str, float]:
    summary = summarize(records, elapsed_s)
    return {
        "requests": summary.requests,
        "ok": summary.ok,
        "failed": summary.failed,
        "timed_out": summary.timed_out,
        "goodput_rps": summary.throughput_rps,
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
    }


def phases(
    records: Sequence[CallRecord], elapsed_s: float, shift_at_s: float | None
) -> dict[str, Any]:
    """The window before and after the shift (by each call's start), and per model after it;
    empty for a workload with no shift."""
    if shift_at_s is None or not 0 < shift_at_s < elapsed_s:
        return {}
    before = [r for r in records if r.started_s < shift_at_s]
    after = [r for r in records if r.started_s >= shift_at_s]
    after_s = elapsed_s - shift_at_s
    return {
        "shift_at_s": shift_at_s,
        "before": _brief(before, shift_at_s),
        "after": _brief(after, after_s),
        "after_by_model": {
            tag: {"ok": s.ok, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms}
            for tag, s in summarize_by_tag(after, after_s).items()
        },
    }


def timeline(
    records: Sequence[CallRecord], elapsed_s: float, bin_s: float = 1.0
) -> list[list[float]]:
    """[start of the bin (s), successful calls, their p50 ms, their p99 ms] per bin."""
    bins = max(1, math.ceil(elapsed_s / bin_s))
    latencies: list[list[float]] = [[] for _ in range(bins)]
    for record in records:
        if record.status == OK:
            index = min(bins - 1, max(0, int(record.started_s / bin_s)))
            latencies[index].append(record.latency_s * 1e3)
    return [
        [round(i * bin_s, 3), len(values), percentile(values, 50), percentile(values, 99)]
        for i, values in enumerate(latencies)
    ]


def served_by_model(
    records: Sequence[CallRecord], elapsed_s: float, bin_s: float = 1.0
) -> dict[str, list[int]]:
    """Per model (tag), successful calls per bin by their end time (later ones in the last)."""
    bins = max(1, math.ceil(elapsed_s / bin_s))
    served: dict[str, list[int]] = {}
    for record in records:
        if record.status == OK:
            index = min(bins - 1, int((record.started_s + record.latency_s) / bin_s))
            served.setdefault(record.tag, [0] * bins)[index] += 1
    return dict(sorted(served.items()))


def instance_work(
    before: Counters, after: Counters, instance_of_url: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Per instance: inferences and executions in the window, summed over its models (a series
    that restarted, its model reloaded, counts from zero)."""
    work: dict[str, dict[str, float]] = {
        name: {"inferences": 0.0, "executions": 0.0} for name in sorted(instance_of_url.values())
    }
    for (url, _model), (count, execs) in after.items():
        count0, execs0 = before.get((url, _model), (0.0, 0.0))
        if count < count0 or execs < execs0:
            count0 = execs0 = 0.0
        instance = instance_of_url.get(url, url)
        entry = work.setdefault(instance, {"inferences": 0.0, "executions": 0.0})
        entry["inferences"] += count - count0
        entry["executions"] += execs - execs0
    return work


def placement_events(
    events: Sequence[PlacementEvent], window_start: float, window_end: float
) -> list[tuple[float, str, str, str]]:
    """(seconds from the window's start, instance, model, "load" | "unload") for the events
    in the window."""
    return [
        (round(e.at_s - window_start, 2), e.instance, e.model, "load" if e.loaded else "unload")
        for e in events
        if window_start <= e.at_s <= window_end
    ]
