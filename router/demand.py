"""Demand tracking: request rates per model and version over sliding windows, and a short forecast.

Pure bookkeeping with an injected clock: no I/O, no tasks, no threads (the router calls it from
its one event loop). The router feeds it with `record` from two sources: requests it routes itself
and the deltas of Triton's inference counters. The placement planner reads an immutable
`DemandSnapshot`.

Memory is bounded: each (model, version) series is a ring of `span_s / bucket_s` counters (300
one-second buckets by default) indexed by absolute bucket number, so a slot is reused when time
comes round to it again. A series with no record for longer than `span_s` is dropped.

Formulas (b = bucket length, B(t) = floor(t / b), now = the clock):
    rate(window w)  = sum of counts in buckets B(now) - k + 1 .. B(now), k = ceil(w / b),
                      divided by the time those buckets cover up to now, which is
                      now - max(start of the first bucket, tracker start) and at least b:
                      a fresh tracker does not report a fifth of the true rate for its first
                      minute, and the current, partial bucket counts for the time it has lasted.
    forecast(h)     = least-squares line through the per-bucket rates (count / b at each bucket's
                      midpoint) of the complete buckets of the fit window, evaluated h seconds
                      after now, floored at 0. The current bucket is left out: it is partial, and
                      its low count would read as a fall.
    recent          = rate(recent window) + queued / recent window: what was answered lately,
                      plus the requests waiting now (Triton's queue, `queued` in `snapshot`),
                      to be answered within the same window.

Why `recent`: Triton counts the requests it ANSWERED, so a model whose copies are all busy shows
what they serve, not what is asked, and the short window trails a sudden rise by most of its
length (after a popularity shift the new hot model gained one copy per window at best). The
recent window sees the rise within a few buckets (Knative's "panic" window is a tenth of its
stable one for the same reason) and the queue shows what the busy copies could not answer.
Shrinking still needs the short window and the planner's cool-down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pointsman.clock import Clock
from pointsman.config import rule

__all__ = ["DemandSnapshot", "DemandTracker", "DemandWindows", "ModelDemand"]


# How far above the observed rate a forecast may size copies.
FORECAST_CAP = 2.0


@dataclass(frozen=True, slots=True)
class DemandWindows:
    """How demand is measured: bucket length, memory, the windows rates are taken over, and
    how far ahead the forecast looks. The policy file's `demand:` section sets them; the
    defaults suit production traffic (minutes), tests and demos shrink them to seconds."""

    bucket_s: float = field(default=1.0, metadata=rule(above=0))
    # How much history the tracker keeps; every window must fit in it.
    span_s: float = field(default=300.0, metadata=rule(above=0))
    short_window_s: float = field(default=60.0, metadata=rule(above=0))
    long_window_s: float = field(default=300.0, metadata=rule(above=0))
    # The trend behind the forecast is fitted over this window.
    fit_window_s: float = field(default=60.0, metadata=rule(above=0))
    # A rise shows within this window, and the requests waiting are counted over it.
    recent_window_s: float = field(default=6.0, metadata=rule(above=0))
    # A zero horizon forecasts the rate of now.
    horizon_s: float = field(default=30.0, metadata=rule(minimum=0))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bucket_s) and self.bucket_s > 0):
            raise ValueError("bucket_s must be finite and > 0")
        if not (math.isfinite(self.span_s) and self.span_s >= 2 * self.bucket_s):
            raise ValueError("span_s must be finite and at least two buckets")
        for name in ("short_window_s", "long_window_s", "fit_window_s", "recent_window_s"):
            window = getattr(self, name)
            if not (math.isfinite(window) and 0 < window <= self.span_s):
                raise ValueError(f"{name} must be in (0, span_s={self.span_s:g}], got {window}")
        if not (math.isfinite(self.horizon_s) and self.horizon_s >= 0):
            raise ValueError("horizon_s must be finite and >= 0")


@dataclass(frozen=True, slots=True)
class ModelDemand:
    """The demand for one model, all versions together, at one moment."""

    model: str
    # Requests per second over the short window (1 minute by default).
    rate_rps: float = 0.0
    # Requests per second over the long window (5 minutes by default).
    long_rate_rps: float = 0.0
    # Requests per second expected `horizon_s` from now (trend of the fit window, floored at 0).
    forecast_rps: float = 0.0
    # Requests per second over the recent window, plus those queued now spread over it.
    recent_rps: float = 0.0
    # Requests waiting in Triton's queues for the model now (all instances).
    queued: int = 0
    # Clock time of the latest request; None when none in the tracker's memory.
    last_seen: float | None = None
    # Short-window rate per version; "" is requests that pinned no version.
    version_rates_rps: Mapping[str, float] = field(default_factory=dict)

    @property
    def sizing_rps(self) -> float:
        """The rate that copies are sized for: max(rate, forecast, recent), so a rising wave
        counts before it peaks, a sudden rise and a queue count within the recent window, and
        a forecast fall never hides the traffic of now."""
        return max(self.rate_rps, self.forecast_rps, self.recent_rps)

    def seen_within(self, now: float, seconds: float) -> bool:
        """True if a request came in the last `seconds` before `now`."""
        return self.last_seen is not None and now - self.last_seen <= seconds


@dataclass(frozen=True, slots=True)
class DemandSnapshot:
    """Every tracked model's demand at `taken_at`; models absent have no demand."""

    taken_at: float
    short_window_s: float = 60.0
    long_window_s: float = 300.0
    horizon_s: float = 30.0
    recent_window_s: float = 6.0
    models: Mapping[str, ModelDemand] = field(default_factory=dict)

    def of(self, model: str) -> ModelDemand:
        """The model's demand, or zero demand when it has none."""
        return self.models.get(model) or ModelDemand(model)


class _Series:
    """One (model, version) ring: `counts[i]` belongs to absolute bucket `buckets[i]`."""

    __slots__ = ("buckets", "counts", "last_seen")

    def __init__(self, slots: int) -> None:
        self.counts = [0] * slots
        self.buckets = [-1] * slots
        self.last_seen = -math.inf

    def add(self, bucket: int, count: int) -> None:
        slot = bucket % len(self.counts)
        if self.buckets[slot] != bucket:
            # The slot still holds a bucket one lap old (or none): it starts afresh.
            self.buckets[slot] = bucket
            self.counts[slot] = 0
        self.counts[slot] += count

    def count_between(self, first_bucket: int, last_bucket: int) -> int:
        return sum(
            count
            for count, bucket in zip(self.counts, self.buckets, strict=True)
            if first_bucket <= bucket <= last_bucket
        )

    def count_at(self, bucket: int) -> int:
        slot = bucket % len(self.counts)
        return self.counts[slot] if self.buckets[slot] == bucket else 0


class DemandTracker:
    """Request counts per (model, version) in a ring of time buckets; rates, trend and snapshot.

    `version` is the version a request pinned, or "" for none. Queries with `version=None` sum
    every version of the model. Not thread-safe: one event loop owns it.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        bucket_s: float = 1.0,
        span_s: float = 300.0,
        short_window_s: float = 60.0,
        long_window_s: float = 300.0,
        fit_window_s: float = 60.0,
        horizon_s: float = 30.0,
        recent_window_s: float = 6.0,
    ) -> None:
        self._clock = clock
        self._started_at = clock()
        self._series: dict[str, dict[str, _Series]] = {}
        self._configure(
            DemandWindows(
                bucket_s=bucket_s,
                span_s=span_s,
                short_window_s=short_window_s,
                long_window_s=long_window_s,
                fit_window_s=fit_window_s,
                horizon_s=horizon_s,
                recent_window_s=recent_window_s,
            )
        )

    def _configure(self, windows: DemandWindows) -> None:
        """Measures with `windows` (validated by DemandWindows) from now on."""
        self._windows = windows
        self._bucket_s = windows.bucket_s
        self._slots = math.ceil(windows.span_s / windows.bucket_s - 1e-9)
        self._span_s = self._slots * windows.bucket_s  # the span the ring holds: whole buckets
        self._pruned_at_bucket = self._bucket(self._clock())

    def reconfigure(self, windows: DemandWindows) -> bool:
        """Measures with `windows` from now on (a policy reload); True if anything changed.

        The history is kept: with the same bucket length and span the rings stay as they
        are, otherwise each old bucket's count is re-recorded at its midpoint in new rings.
        """
        if windows == self._windows:
            return False
        old_series, old_bucket_s, old_slots = self._series, self._bucket_s, self._slots
        self._configure(windows)
        if self._bucket_s == old_bucket_s and self._slots == old_slots:
            return True
        self._series = {}
        for model, versions in old_series.items():
            for version, series in versions.items():
                for bucket, count in zip(series.buckets, series.counts, strict=True):
                    if bucket >= 0 and count > 0:
                        self.record(model, version, count, at=(bucket + 0.5) * old_bucket_s)
                kept = self._series.get(model, {}).get(version)
                if kept is not None:
                    kept.last_seen = series.last_seen  # exact, not its bucket's midpoint
        return True

    @property
    def windows(self) -> DemandWindows:
        """The windows measured with, and the snapshot's default forecast horizon."""
        return self._windows

    # --- feeding ---------------------------------------------------------------------------

    def record(
        self, model: str, version: str = "", count: int = 1, at: float | None = None
    ) -> None:
        """Counts `count` requests of `model` (pinned `version`, "" for none) at `at` (now if None).

        A time in the future counts as now; one older than the span is dropped, as the ring no
        longer holds its bucket. A negative count is refused: a counter that went backwards was
        reset (Triton restarted) and the caller must not turn that into negative demand.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        now = self._clock()
        when = now if at is None else min(at, now)
        self._prune(now)
        bucket = self._bucket(when)
        if count == 0 or bucket <= self._bucket(now) - self._slots:
            return
        versions = self._series.setdefault(model, {})
        series = versions.get(version)
        if series is None:
            series = versions[version] = _Series(self._slots)
        series.add(bucket, count)
        series.last_seen = max(series.last_seen, when)

    # --- queries ---------------------------------------------------------------------------

    def rate(self, model: str, window_s: float, *, version: str | None = None) -> float:
        """Requests per second over the last `window_s` seconds (see the module's formula)."""
        self._check_window("window_s", window_s)
        now = self._clock()
        last = self._bucket(now)
        first = last - self._buckets_in(window_s) + 1
        covered = now - max(first * self._bucket_s, self._started_at)
        total = sum(s.count_between(first, last) for s in self._matching(model, version))
        return total / max(covered, self._bucket_s)

    def forecast(
        self,
        model: str,
        horizon_s: float,
        *,
        version: str | None = None,
        fit_window_s: float | None = None,
    ) -> float:
        """Requests per second expected `horizon_s` from now: the fit window's least-squares
        trend extrapolated, floored at 0. With fewer than two complete buckets observed (a
        fresh tracker) it is the window's plain rate."""
        if not (math.isfinite(horizon_s) and horizon_s >= 0):
            raise ValueError("horizon_s must be finite and >= 0")
        window_s = self._windows.fit_window_s if fit_window_s is None else fit_window_s
        self._check_window("fit_window_s", window_s)
        now = self._clock()
        now_bucket = self._bucket(now)
        series = list(self._matching(model, version))
        xs: list[float] = []
        ys: list[float] = []
        for bucket in range(now_bucket - self._buckets_in(window_s), now_bucket):
            if bucket * self._bucket_s < self._started_at:
                continue  # before the tracker started: unobserved, not zero
            midpoint = (bucket + 0.5) * self._bucket_s - now  # relative: keeps sums small
            xs.append(midpoint)
            ys.append(sum(s.count_at(bucket) for s in series) / self._bucket_s)
        if len(xs) < 2:
            return self.rate(model, window_s, version=version)
        return max(0.0, _least_squares_at(xs, ys, horizon_s))

    def last_seen(self, model: str, *, version: str | None = None) -> float | None:
        """Clock time of the model's latest recorded request, or None when none is remembered."""
        times = [s.last_seen for s in self._matching(model, version)]
        return max(times) if times else None

    def models_with_demand(self, since_s: float) -> frozenset[str]:
        """Models with a request in the last `since_s` seconds."""
        cutoff = self._clock() - since_s
        return frozenset(
            model
            for model, versions in self._series.items()
            if any(s.last_seen >= cutoff for s in versions.values())
        )

    def snapshot(
        self, horizon_s: float | None = None, queued: Mapping[str, int] | None = None
    ) -> DemandSnapshot:
        """Every tracked model's rates, forecast `horizon_s` ahead (default: the windows'
        horizon), recent demand with the requests `queued` per model now, and last request,
        frozen. A model with requests queued and none answered in memory is included."""
        if horizon_s is None:
            horizon_s = self._windows.horizon_s
        queued = {m: n for m, n in (queued or {}).items() if n > 0}
        now = self._clock()
        self._prune(now)
        recent_s = self._windows.recent_window_s
        models: dict[str, ModelDemand] = {}
        for model in sorted(set(self._series) | set(queued)):
            versions = sorted(self._series.get(model, {}))
            rate = self.rate(model, self._windows.short_window_s)
            long_rate = self.rate(model, self._windows.long_window_s)
            waiting = queued.get(model, 0)
            models[model] = ModelDemand(
                model=model,
                rate_rps=rate,
                long_rate_rps=long_rate,
                # At most FORECAST_CAP x the observed rate: a line fitted over a step (traffic
                # that starts at once) or over bursty scrapes would otherwise ask for every
                # instance, as `make demo` showed (forecast 578 rps at an observed 14).
                forecast_rps=min(
                    self.forecast(model, horizon_s), FORECAST_CAP * max(rate, long_rate)
                ),
                recent_rps=self.rate(model, recent_s) + waiting / recent_s,
                queued=waiting,
                last_seen=self.last_seen(model),
                version_rates_rps={
                    v: self.rate(model, self._windows.short_window_s, version=v) for v in versions
                },
            )
        return DemandSnapshot(
            taken_at=now,
            short_window_s=self._windows.short_window_s,
            long_window_s=self._windows.long_window_s,
            horizon_s=horizon_s,
            recent_window_s=recent_s,
            models=models,
        )

    # --- memory ----------------------------------------------------------------------------

    @property
    def series_count(self) -> int:
        """How many (model, version) series are held."""
        return sum(len(versions) for versions in self._series.values())

    @property
    def buckets_held(self) -> int:
        """Counters held in all: `series_count` x buckets per series, whatever the traffic."""
        return self.series_count * self._slots

    # --- internals -------------------------------------------------------------------------

    def _bucket(self, t: float) -> int:
        return math.floor(t / self._bucket_s)

    def _buckets_in(self, window_s: float) -> int:
        # The epsilon keeps 60 / 1.0 at 60 buckets despite float division.
        return math.ceil(window_s / self._bucket_s - 1e-9)

    def _check_window(self, name: str, window_s: float) -> None:
        if not (math.isfinite(window_s) and 0 < window_s <= self._span_s):
            raise ValueError(f"{name} must be in (0, {self._span_s:g}] (the span), got {window_s}")

    def _matching(self, model: str, version: str | None) -> Iterable[_Series]:
        versions = self._series.get(model, {})
        if version is None:
            return versions.values()
        series = versions.get(version)
        return () if series is None else (series,)

    def _prune(self, now: float) -> None:
        """Drops series silent for a whole span; at most once per bucket, so `record` stays
        O(1) amortised."""
        bucket = self._bucket(now)
        if bucket == self._pruned_at_bucket:
            return
        self._pruned_at_bucket = bucket
        cutoff = now - self._span_s
        for model in list(self._series):
            versions = self._series[model]
            for version in [v for v, s in versions.items() if s.last_seen < cutoff]:
                del versions[version]
            if not versions:
                del self._series[model]


def _least_squares_at(xs: list[float], ys: list[float], x: float) -> float:
    """The least-squares line through (xs, ys) evaluated at x:
    slope = sum((xi - mean_x)(yi - mean_y)) / sum((xi - mean_x)^2)
    y(x)  = mean_y + slope (x - mean_x)
    """
    n = len(xs)
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    spread = sum((xi - mean_x) ** 2 for xi in xs)
    if spread == 0:
        return mean_y
    slope = sum((xi - mean_x) * (yi - mean_y) for xi, yi in zip(xs, ys, strict=True)) / spread
    return mean_y + slope * (x - mean_x)
