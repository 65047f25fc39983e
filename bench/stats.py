"""Statistics of a load run: percentiles with timeouts in the tail, and bootstrap intervals.

A timed-out request has no latency, but leaving it out would make an overloaded system look
fast: so a timeout counts as an infinite latency in every percentile (`inf` when the
percentile falls on or beyond it), and the failed and timed-out counts stand beside every
percentile. Other failures (refused, shed, unavailable) are counted by status, never averaged
into the latencies. Time to first response and the gaps between responses come from streams.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.loadgen import OK, TIMEOUT, CallRecord

__all__ = [
    "Interval",
    "LoadSummary",
    "bootstrap_median",
    "percentile",
    "summarize",
    "summarize_by_tag",
]

# Percentiles are taken with timeouts as this stand-in, then mapped back to inf: numpy's linear
# interpolation would give NaN between two infinities.
_TIMEOUT_STANDIN = 1e300


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default); inf when it touches an
    infinite value; NaN for no values."""
    if not values:
        return math.nan
    finite = np.array([min(v, _TIMEOUT_STANDIN) for v in values], dtype=float)
    value = float(np.percentile(finite, q))
    return math.inf if value >= _TIMEOUT_STANDIN / 2 else value


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """What a run measured. Latencies in milliseconds, over successful calls plus timeouts
    (as inf); `mean_ms` over successful calls only."""

    requests: int
    ok: int
    timed_out: int
    failed: int  # neither OK nor timed out
    errors_by_status: Mapping[str, int]
    elapsed_s: float
    throughput_rps: float  # successful calls per second (goodput)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    ttft_p50_ms: float = math.nan  # time to the first response (streams)
    ttft_p99_ms: float = math.nan
    itl_p50_ms: float = math.nan  # gap between successive responses (streams)
    itl_p99_ms: float = math.nan
    retry_hints: int = 0  # failed answers that carried a retry-after-ms hint
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "timed_out": self.timed_out,
            "failed": self.failed,
            "errors_by_status": dict(self.errors_by_status),
            "elapsed_s": self.elapsed_s,
            "throughput_rps": self.throughput_rps,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
            "ttft_p50_ms": self.ttft_p50_ms,
            "ttft_p99_ms": self.ttft_p99_ms,
            "itl_p50_ms": self.itl_p50_ms,
            "itl_p99_ms": self.itl_p99_ms,
            "retry_hints": self.retry_hints,
            **dict(self.extra),
        }


def summarize(records: Sequence[CallRecord], elapsed_s: float) -> LoadSummary:
    """Counts by status, percentiles over OK calls with timeouts as inf, stream timings over
    OK calls, throughput = OK calls / `elapsed_s`."""
    ok_ms = [r.latency_s * 1e3 for r in records if r.status == OK]
    timed_out = sum(r.status == TIMEOUT for r in records)
    tail = ok_ms + [math.inf] * timed_out
    errors = Counter(r.status for r in records if r.status != OK)
    ttft = [r.first_response_s * 1e3 for r in records if r.status == OK and r.streamed]
    gaps = [g * 1e3 for r in records if r.status == OK for g in r.inter_response_s]
    return LoadSummary(
        requests=len(records),
        ok=len(ok_ms),
        timed_out=timed_out,
        failed=len(records) - len(ok_ms) - timed_out,
        errors_by_status=dict(sorted(errors.items())),
        elapsed_s=elapsed_s,
        throughput_rps=len(ok_ms) / elapsed_s if elapsed_s > 0 else math.nan,
        p50_ms=percentile(tail, 50),
        p90_ms=percentile(tail, 90),
        p99_ms=percentile(tail, 99),
        max_ms=max(tail) if tail else math.nan,
        mean_ms=float(np.mean(ok_ms)) if ok_ms else math.nan,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        itl_p50_ms=percentile(gaps, 50),
        itl_p99_ms=percentile(gaps, 99),
        retry_hints=sum(r.status != OK and r.retry_after_ms is not None for r in records),
    )


def summarize_by_tag(records: Iterable[CallRecord], elapsed_s: float) -> dict[str, LoadSummary]:
    """One summary per tag (a model, a priority class), tags in sorted order."""
    grouped: dict[str, list[CallRecord]] = {}
    for record in records:
        grouped.setdefault(record.tag, []).append(record)
    return {tag: summarize(grouped[tag], elapsed_s) for tag in sorted(grouped)}


@dataclass(frozen=True, slots=True)
class Interval:
    """A median with its bootstrap confidence interval, over repetitions."""

    median: float
    low: float
    high: float
    samples: int

    def overlaps(self, other: Interval) -> bool:
        return not (self.high < other.low or other.high < self.low)

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "ci_low": self.low, "ci_high": self.high, "n": self.samples}

    def text(self) -> str:
        """`median [low, high]`, three significant digits; the median alone from one sample,
        "-" from none."""
        if self.samples == 0:
            return "-"
        if self.samples == 1:
            return f"{self.median:.3g}"
        return f"{self.median:.3g} [{self.low:.3g}, {self.high:.3g}]"


def bootstrap_median(
    values: Sequence[float],
    rng: random.Random,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
) -> Interval:
    """The median of `values` and a percentile-bootstrap interval for it: the median of
    `resamples` resamples with replacement, cut at (1 - confidence) / 2 at each end. An
    infinite value (a repetition whose p99 was a timeout) is kept as inf; NaN values (not
    measured) are dropped."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return Interval(math.nan, math.nan, math.nan, 0)
    centre = percentile(kept, 50)
    if len(kept) == 1:
        return Interval(centre, centre, centre, 1)
    values_array = np.array(kept, dtype=float)
    draws = np.random.default_rng(rng.getrandbits(64)).integers(
        0, len(kept), size=(resamples, len(kept))
    )
    # np.median of a resample holding inf is inf (inf + finite and inf + inf are both inf).
    medians = np.sort(np.median(values_array[draws], axis=1))
    cut = (1 - confidence) / 2
    return Interval(
        centre,
        float(medians[int(cut * (resamples - 1))]),
        float(medians[math.ceil((1 - cut) * (resamples - 1))]),
        len(kept),
    )
