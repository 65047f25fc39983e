"""The request path's own counts: plain numbers added without a lock, read when Prometheus
scrapes.

prometheus-client's Counter and Histogram take a lock on every increment (a ModelInfer made
six of them: duration sum and bucket, requests, routed, hits, attempt). Here each (model,
version, method) has a `RequestSeries` of plain numbers (its answers by status, its duration
buckets and sum, its routed and hit counts) and each instance its attempts by status
(`AttemptCounts`). They are added on the event loop's thread only, their one writer, and
`RequestCollector` sums them into the families, names and labels that Counter and Histogram
would export, `_created` samples included, when Prometheus scrapes. The scrape runs on the
metrics server's thread and reads copies, each made in one C call (a list's or a dict's copy
holds the GIL throughout), so an addition made meanwhile shows at the next scrape.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

import grpc
import prometheus_client.metrics
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["DURATION_BUCKETS_S", "AttemptCounts", "RequestCollector", "RequestSeries"]

# From 1 ms (a small request on a warm instance) to 30 s (a long generation or stream).
DURATION_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# The `le` labels, formatted as prometheus-client formats them.
_LE = (*(floatToGoString(b) for b in DURATION_BUCKETS_S), "+Inf")  # type: ignore[no-untyped-call]
_OK = grpc.StatusCode.OK
_OK_NAME = _OK.name
_DURATION_LABELS = ("model", "version", "method")
_K = TypeVar("_K", bound=Hashable)


def _now() -> float:
    return time.time()


class RequestSeries:
    """What the calls of one (model, version, method) add up to (labels as exported). The
    rare counts (retries, waits, queue-full resends) stay prometheus-client children."""

    __slots__ = ("buckets", "codes", "created", "held", "hits", "method", "model",
                 "queue_full_retries", "retries", "routed", "seconds", "version")  # fmt: skip

    def __init__(
        self, model: str, version: str, method: str, retries: Counter, held: Counter,
        queue_full_retries: Counter,
    ) -> None:  # fmt: skip
        self.model = model
        self.version = version
        self.method = method
        self.created = _now()
        # Calls by the duration bucket they fell in (the last: above every bound).
        self.buckets: list[int] = [0] * (len(DURATION_BUCKETS_S) + 1)
        self.seconds = 0.0
        # Status name -> [calls answered with it, when the first was].
        self.codes: dict[str, list[float]] = {}
        self.routed = 0
        self.hits = 0
        self.retries = retries
        self.held = held
        self.queue_full_retries = queue_full_retries

    def done(self, code: grpc.StatusCode, seconds: float) -> None:
        """One call ended with `code` after `seconds`."""
        self.buckets[bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        self.seconds += seconds
        name = _OK_NAME if code is _OK else code.name
        counted = self.codes.get(name)
        if counted is None:
            self.codes[name] = [1, _now()]
        else:
            counted[0] += 1


class AttemptCounts:
    """Attempts per (instance, status): `counts[(address, status name)] = [attempts, when the
    first was]`; the OK ones of an address, the hot path, one dict lookup away."""

    __slots__ = ("_ok", "counts")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[float]] = {}
        self._ok: dict[str, list[float]] = {}

    def add(self, address: str, code: grpc.StatusCode) -> None:
        """One attempt on `address` ended with `code`."""
        if code is _OK:
            counted = self._ok.get(address)
            if counted is not None:
                counted[0] += 1
                return
            counted = self._ok[address] = [0, _now()]
            self.counts[(address, _OK_NAME)] = counted
        else:
            key = (address, code.name)
            counted = self.counts.get(key)
            if counted is None:
                counted = self.counts[key] = [0, _now()]
        counted[0] += 1


class RequestCollector(Collector):
    """The request path's families (duration, requests, routed, hits, attempts), summed from
    the `series()` and `attempts` at scrape time."""

    def __init__(
        self, series: Callable[[], Iterable[RequestSeries]], attempts: AttemptCounts
    ) -> None:
        self._series = series
        self._attempts = attempts

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        duration, requests, routed, hits, attempts = self._families()
        created = getattr(prometheus_client.metrics, "_use_created", True)
        calls: dict[tuple[str, str, str], list[float]] = {}
        per_model: dict[str, list[float]] = {}
        for series in tuple(self._series()):
            labels = (series.model, series.version, series.method)
            duration.add_metric(labels, _cumulative(series.buckets.copy()), series.seconds)
            if created:
                duration.add_sample(
                    duration.name + "_created",
                    dict(zip(_DURATION_LABELS, labels, strict=True)),
                    series.created,
                )
            for code, (answered, first) in dict(series.codes).items():
                _add(calls, (series.model, series.method, code), answered, first)
            _add(per_model, series.model, series.routed, series.created, series.hits)
        for call, (answered, first) in calls.items():
            requests.add_metric(call, answered, first if created else None)
        for model, (sent, first, hit) in per_model.items():
            routed.add_metric((model,), sent, first if created else None)
            hits.add_metric((model,), hit, first if created else None)
        for attempt, (tried, first) in dict(self._attempts.counts).items():
            attempts.add_metric(attempt, tried, first if created else None)
        yield from (duration, requests, routed, hits, attempts)

    @staticmethod
    def _families() -> tuple[
        HistogramMetricFamily, CounterMetricFamily, CounterMetricFamily, CounterMetricFamily,
        CounterMetricFamily,
    ]:  # fmt: skip
        return (
            HistogramMetricFamily(
                "pointsman_sidecar_request_duration_seconds",
                "Time from a ModelInfer call (or a whole ModelStreamInfer stream) arriving to its "
                "answer, whatever the status; version is the requested one, 'default' if none",
                labels=_DURATION_LABELS,
            ),
            CounterMetricFamily(
                "pointsman_sidecar_requests",
                "ModelInfer calls and ModelStreamInfer streams answered, by gRPC status",
                labels=("model", "method", "code"),
            ),
            CounterMetricFamily(
                "pointsman_sidecar_routed",
                "Requests sent to an instance chosen by route table or router pick",
                labels=("model",),
            ),
            CounterMetricFamily(
                "pointsman_sidecar_affinity_hits",
                "Routed requests whose chosen instance had the model (and version) ready",
                labels=("model",),
            ),
            CounterMetricFamily(
                "pointsman_sidecar_upstream_attempts",
                "Inference calls and streams sent to a Triton instance, by the status it answered",
                labels=("instance", "code"),
            ),
        )


def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts as a histogram's cumulative `le` buckets."""
    total = 0
    out = []
    for le, counted in zip(_LE, buckets, strict=True):
        total += counted
        out.append((le, float(total)))
    return out


def _add(totals: dict[_K, list[float]], key: _K, n: float, first: float, *more: float) -> None:
    """Adds `n` (and `more`) to `totals[key]`, keeping the earliest `first` (`_created`)."""
    found = totals.get(key)
    if found is None:
        totals[key] = [n, first, *more]
        return
    found[0] += n
    found[1] = min(found[1], first)
    for i, extra in enumerate(more, 2):
        found[i] += extra
