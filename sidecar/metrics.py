"""The sidecar's Prometheus metrics: what operators alert on and dashboards draw.

All of them live in one `CollectorRegistry` per sidecar (injected, so tests use their own) and
are served at /metrics when `metrics_listen` is set. README.md lists every metric.

Label values stay bounded whatever callers send: a model is named only if a route table (or a
static route) knows it, and a version only if some candidate lists it as ready; anything else
is `_unknown`. Request ids never become labels. On the request path a request costs one dict
lookup for its pre-resolved series (per model, version and method) and a few additions to
plain numbers, no lock (`sidecar.request_counts`: summed into the exported families at scrape
time); the gauges (in flight per instance, route-table age) are read from the pool and the
route cache when Prometheus scrapes, so the request path does not touch them.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.request_counts import (
    DURATION_BUCKETS_S,
    AttemptCounts,
    RequestCollector,
    RequestSeries,
)
from sidecar.routes import RouteCache
from sidecar.upstream import UpstreamPool

__all__ = [
    "DURATION_BUCKETS_S",
    "STORE_OPERATIONS",
    "UNKNOWN",
    "IdempotencyMetrics",
    "RequestSeries",
    "SidecarMetrics",
]

# The label value for a model or version no route knows (typos, probes, malformed requests).
UNKNOWN = "_unknown"
# The version label of a request that pins no version.
DEFAULT_VERSION = "default"
# Priorities with their own `shed_total` label value; any other is "_other".
_PRIORITY_LABELS = frozenset(str(p) for p in range(10))
_OTHER = "_other"
# The `operation` label of idempotency store errors (sidecar/idempotency_redis.py).
STORE_OPERATIONS = ("acquire", "renew", "finish", "probe", "subscribe")


class SidecarMetrics:
    """Every metric of one sidecar, registered in `registry`.

    `cache` and `pool` are read when Prometheus scrapes (route-table age, in-flight counts).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        cache: RouteCache,
        pool: UpstreamPool,
    ) -> None:
        self.registry = registry
        self._cache = cache
        self.retries = Counter(
            "pointsman_sidecar_retries",
            "Extra attempts on another instance after an attempt failed before any response "
            "(unreachable, reset, UNAVAILABLE, NOT_FOUND from a model unloading there)",
            ("model",),
            registry=registry,
        )
        self.retry_budget_exhausted = Counter(
            "pointsman_sidecar_retry_budget_exhausted",
            "Failed attempts not retried because the retry budget was spent",
            ("model",),
            registry=registry,
        )
        self.outlier_ejections = Counter(
            "pointsman_sidecar_outlier_ejections",
            "Times an instance was ejected from picks after failing repeatedly",
            ("instance",),
            registry=registry,
        )
        self.shed = Counter(
            "pointsman_sidecar_shed",
            "Requests refused by the sidecar to protect the fleet, by priority",
            ("model", "priority"),
            registry=registry,
        )
        self.triton_queue_full = Counter(
            "pointsman_sidecar_triton_queue_full",
            "Requests Triton refused because the model's queue was full (Triton counts none)",
            ("model",),
            registry=registry,
        )
        self.held = Counter(
            "pointsman_sidecar_held",
            "Times a request waited in the sidecar's queue because every instance it could go "
            "to had as many of this sidecar's requests as Triton's queue takes (flow control)",
            ("model",),
            registry=registry,
        )
        self.queue_full_retries = Counter(
            "pointsman_sidecar_queue_full_retries",
            "Requests sent again after Triton refused them because the model's queue was full",
            ("model",),
            registry=registry,
        )
        self.idempotent = Counter(
            "pointsman_sidecar_idempotent_requests",
            "Requests with an id, by how they were answered: executed, coalesced onto a "
            "running duplicate, replayed from a finished one, or bypassed (executed without "
            "the shared store, which was unreachable)",
            ("outcome",),
            registry=registry,
        )
        self.idempotency = IdempotencyMetrics(registry)
        self.cold_starts = Counter(
            "pointsman_sidecar_cold_starts",
            "Requests that had to wait for their model to be loaded somewhere",
            ("model",),
            registry=registry,
        )
        self.prefix_routing = Counter(
            "pointsman_sidecar_prefix_routing",
            "Requests of models with prefix routing by how their instance was chosen: the "
            "prefix's first holder, a later one for load, the usual pick (no key) or the "
            "router's PickTarget (cold loads not counted)",
            ("model", "outcome"),
            registry=registry,
        )
        self.sequence_probes = Counter(
            "pointsman_sidecar_sequence_probes",
            "Steps of a sequence sent to an instance that did not hold it (refused there "
            "without running, or unreachable) while looking for the one that does",
            ("model",),
            registry=registry,
        )
        self.sequence_failures = Counter(
            "pointsman_sidecar_sequence_failures",
            "Steps of a sequence that no instance held: ABORTED when its instance failed, "
            "FAILED_PRECONDITION when it never started, ended or idled out",
            ("model", "code"),
            registry=registry,
        )
        self.session_moves = Counter(
            "pointsman_sidecar_session_moves",
            "Sessions moved to another holder because theirs was saturated",
            ("model",),
            registry=registry,
        )
        registry.register(_LiveGauges(cache, pool))
        self._series: dict[tuple[str, str, str], RequestSeries] = {}
        self._by_labels: dict[tuple[str, str, str], RequestSeries] = {}
        self.attempts = AttemptCounts()
        self._idempotent: dict[str, Counter] = {}
        registry.register(RequestCollector(self._by_labels.values, self.attempts))
        self._prefix: dict[tuple[str, str], Counter] = {}
        # A model or version that leaves the tables must fall back to `_unknown`.
        cache.subscribe(self._series.clear)
        cache.subscribe(self._prefix.clear)

    def series(self, model: str, version: str, method: str) -> RequestSeries:
        """Where a request for (model, version) by `method` records; cheap after the first."""
        found = self._series.get((model, version, method))
        if found is not None:
            return found
        return self._resolve(model, version, method)

    def model_label(self, model: str) -> str:
        """`model` if a route knows it, else `_unknown`."""
        return model if model and model in self._cache.routes else UNKNOWN

    def _resolve(self, model: str, version: str, method: str) -> RequestSeries:
        route = self._cache.routes.get(model) if model else None
        model_label = model if route is not None else UNKNOWN
        if not version:
            version_label = DEFAULT_VERSION
        elif route is not None and version in route.by_version:
            version_label = version
        else:
            version_label = UNKNOWN
        labels = (model_label, version_label, method)
        series = self._by_labels.get(labels)
        if series is None:
            series = self._by_labels[labels] = RequestSeries(
                *labels,
                retries=self.retries.labels(model_label),
                held=self.held.labels(model_label),
                queue_full_retries=self.queue_full_retries.labels(model_label),
            )
        if UNKNOWN not in labels:
            # Only names a route knows are remembered: bogus names cannot grow this dict.
            self._series[(model, version, method)] = series
        return series

    def attempt(self, instance: str, code: grpc.StatusCode) -> None:
        """One attempt on `instance` (a Triton address from a route) ended with `code`."""
        self.attempts.add(instance, code)

    def idempotent_request(self, outcome: str) -> None:
        """A request with an id was answered by `outcome` (executed, coalesced, ...)."""
        counter = self._idempotent.get(outcome)
        if counter is None:
            counter = self._idempotent[outcome] = self.idempotent.labels(outcome)
        counter.inc()

    def prefix_routed(self, model: str, outcome: str) -> None:
        """A request of `model` (one with prefix routing, so a route knows it) was routed with
        `outcome` (one of sidecar.prefix_routing.OUTCOMES)."""
        counter = self._prefix.get((model, outcome))
        if counter is None:
            counter = self._prefix[(model, outcome)] = self.prefix_routing.labels(
                self.model_label(model), outcome
            )
        counter.inc()

    def budget_exhausted(self, model: str) -> None:
        """A failed attempt that the retry budget did not let the sidecar retry."""
        self.retry_budget_exhausted.labels(self.model_label(model)).inc()

    def ejection(self, instance: str) -> None:
        """`instance` (an address from a route) was ejected by outlier detection."""
        self.outlier_ejections.labels(instance).inc()

    def shed_request(self, model: str, priority: int) -> None:
        """A request refused to protect the fleet (counted from the issue that sheds)."""
        label = str(priority)
        self.shed.labels(
            self.model_label(model), label if label in _PRIORITY_LABELS else _OTHER
        ).inc()

    def queue_full(self, model: str) -> None:
        """Triton answered "Exceeds maximum queue size" for a request of `model`."""
        self.triton_queue_full.labels(self.model_label(model)).inc()

    def sequence_probe(self, model: str) -> None:
        """A sequence step went on to the next instance: the last one did not hold it."""
        self.sequence_probes.labels(self.model_label(model)).inc()

    def sequence_failed(self, model: str, code: grpc.StatusCode) -> None:
        """A sequence step failed because no instance held its sequence."""
        self.sequence_failures.labels(self.model_label(model), code.name).inc()

    def session_move(self, model: str) -> None:
        """A session left its saturated holder for another."""
        self.session_moves.labels(self.model_label(model)).inc()

    def cold_start(self, model: str) -> None:
        """A request that waited for its model to load (counted once the sidecar can wait)."""
        self.cold_starts.labels(self.model_label(model)).inc()


class IdempotencyMetrics:
    """The idempotency store's own series (the requests are counted by `idempotent`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.store_errors = Counter(
            "pointsman_sidecar_idempotency_store_errors",
            "Calls to the shared idempotency store (Redis) that failed or timed out, by "
            "operation; while it is down requests run without it",
            ("operation",),
            registry=registry,
        )
        # Whether the shared store answers; None (no series) with the in-memory store.
        self.store_up: bool | None = None
        registry.register(_StoreUpGauge(self))
        self.too_large = Counter(
            "pointsman_sidecar_idempotency_too_large",
            "Finished outcomes not kept for replay because they were larger than the limit "
            "(max_value_bytes in Redis, the whole budget in memory)",
            registry=registry,
        )
        self.takeovers = Counter(
            "pointsman_sidecar_idempotency_takeovers",
            "Duplicates that waited on another sidecar's execution and then ran the request "
            "themselves: that execution was not run or not kept, or its lease expired",
            registry=registry,
        )
        self._errors = {op: self.store_errors.labels(op) for op in STORE_OPERATIONS}

    def store_error(self, operation: str) -> None:
        """A store call of `operation` (one of STORE_OPERATIONS) failed."""
        self._errors[operation].inc()


class _StoreUpGauge(Collector):
    """`pointsman_sidecar_idempotency_store_up`, read at scrape time."""

    def __init__(self, metrics: IdempotencyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        up = self._metrics.store_up
        if up is not None:
            family.add_metric([], 1.0 if up else 0.0)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "pointsman_sidecar_idempotency_store_up",
            "1 while the shared idempotency store (Redis) answers, 0 while requests bypass "
            "it; absent with the in-memory store",
        )


class _LiveGauges(Collector):
    """Gauges read at scrape time, so the request path never updates them."""

    def __init__(self, cache: RouteCache, pool: UpstreamPool) -> None:
        self._cache = cache
        self._pool = pool

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        in_flight, age, stale, connected = self._families()
        for upstream in self._pool.upstreams():
            in_flight.add_metric([upstream.address], upstream.in_flight)
        route_age = self._cache.route_age_s()
        if route_age is not None:
            age.add_metric([], route_age)
        stale.add_metric([], 1.0 if self._cache.stale else 0.0)
        connected.add_metric([], 1.0 if self._cache.connected else 0.0)
        yield from (in_flight, age, stale, connected)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "pointsman_sidecar_in_flight_requests",
                "Inference calls and streams this sidecar has sent to the instance and not yet "
                "seen answered",
                labels=("instance",),
            ),
            GaugeMetricFamily(
                "pointsman_sidecar_route_table_age_seconds",
                "Seconds since the last message (snapshot, change or heartbeat) from the "
                "router, or since start if none yet; absent without a router",
            ),
            GaugeMetricFamily(
                "pointsman_sidecar_route_tables_stale",
                "1 while a router is configured but its route stream is down",
            ),
            GaugeMetricFamily(
                "pointsman_sidecar_router_connected",
                "1 while a route stream from a router is up",
            ),
        ]
