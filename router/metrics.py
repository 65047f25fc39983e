"""The router's Prometheus metrics (names and meanings are listed in router/README.md).

Two kinds of figure live here:

- events the router counts as they happen (`RouterMetrics`): picks by model and status,
  scheduling time per pick and per route rebuild, model load times, route updates;
- the state of the fleet (`FleetView`): read from the latest `FleetSnapshot` at scrape time,
  so an instance that leaves the fleet leaves /metrics with it (no stale label sets).

Label values are bounded: instance ids and model names come from configuration and the
model repositories, never from requests (a pick for an unknown model counts as `_unknown`).
The registry is injected, so tests and embedders keep their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pointsman.clock import Clock
from router.contracts import FleetSnapshot
from router.routes import RouteBook

__all__ = ["SCORE_DURATION_BUCKETS", "UNKNOWN_MODEL", "FleetView", "RouterMetrics"]

# Model label of picks for a model no repository knows (or no model at all).
UNKNOWN_MODEL: Final = "_unknown"
# Fine around 50 ms, the alerting threshold of decision time, and down to 100 us, where
# picks over a handful of instances usually fall.
SCORE_DURATION_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.04,
    0.05,
    0.06,
    0.1,
    0.25,
    0.5,
    1.0,
)
# Model loads take from under a second (small CPU models) to minutes (large LLMs).
MODEL_LOAD_BUCKETS: Final = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class RouterMetrics:
    """The router's event metrics in `registry`. `timer` measures scheduling durations: real
    elapsed time, unlike the injected clock that scheduling decisions read."""

    def __init__(
        self, registry: CollectorRegistry, *, timer: Callable[[], float] = time.perf_counter
    ) -> None:
        self.registry = registry
        self.timer = timer
        self._picks = Counter(
            "pointsman_router_picks",
            "PickTarget calls by model and gRPC status code "
            f"(model '{UNKNOWN_MODEL}' for names no repository knows).",
            ["model", "code"],
            registry=registry,
        )
        score_duration = Histogram(
            "pointsman_router_score_duration_seconds",
            "Time spent scheduling: one PickTarget's filters, scorers and picker (operation "
            "'pick'), or rebuilding every route table (operation 'rebuild').",
            ["operation"],
            buckets=SCORE_DURATION_BUCKETS,
            registry=registry,
        )
        self._pick_duration = score_duration.labels("pick")
        self._rebuild_duration = score_duration.labels("rebuild")
        self._model_load = Histogram(
            "pointsman_router_model_load_duration_seconds",
            "Time a model version took to load. Until the router loads models itself this is "
            "the time between first seeing the version LOADING and first seeing it READY in "
            "an instance's repository index: exact to about one refresh interval.",
            ["model"],
            buckets=MODEL_LOAD_BUCKETS,
            registry=registry,
        )
        self._route_updates = Counter(
            "pointsman_router_route_updates",
            "Route table updates published to watchers (one per rebuild that changed tables).",
            registry=registry,
        )

    def count_pick(self, model_label: str, code: grpc.StatusCode) -> None:
        """One PickTarget answered with `code`; `model_label` must be a known model name or
        UNKNOWN_MODEL, to keep the label set bounded."""
        self._picks.labels(model_label, code.name).inc()

    def observe_pick(self, seconds: float) -> None:
        self._pick_duration.observe(seconds)

    def observe_rebuild(self, seconds: float) -> None:
        self._rebuild_duration.observe(seconds)

    def observe_model_load(self, model_name: str, seconds: float) -> None:
        """A model finished loading after `seconds`; placement calls this when it loads one."""
        self._model_load.labels(model_name).observe(seconds)

    def count_route_update(self) -> None:
        self._route_updates.inc()


class FleetView(Collector):
    """Per-instance and route figures, computed from the latest snapshot at scrape time.

    Runs on the metrics server's thread: it only reads an immutable snapshot and two
    integers of the route book, never the collectors' mutable state.
    """

    def __init__(self, snapshot: Callable[[], FleetSnapshot], book: RouteBook, clock: Clock):
        self._snapshot = snapshot
        self._book = book
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        (qps, batch, used, budget, healthy, age, pending, generation, watchers, hit_ratio) = (
            families
        )
        now = self._clock()
        # model -> (lookups, hits) over the instances, for the fleet-wide hit ratio
        cache: dict[str, tuple[float, float]] = {}
        for inst in self._snapshot().instances:
            labels = [inst.instance_id]
            qps.add_metric(labels, inst.inferences_per_second)
            for model in inst.models.values():
                batch.add_metric([inst.instance_id, model.name], model.average_batch_size)
                if model.prefix_cache_lookup_blocks > 0:
                    lookups, hits = cache.get(model.name, (0.0, 0.0))
                    cache[model.name] = (
                        lookups + model.prefix_cache_lookup_blocks,
                        hits + model.prefix_cache_hit_blocks,
                    )
            used.add_metric(labels, inst.memory_used_bytes)
            if inst.memory_budget_bytes:  # unknown budgets are absent, not 0 (ratios divide)
                budget.add_metric(labels, inst.memory_budget_bytes)
            healthy.add_metric(labels, 1.0 if inst.healthy else 0.0)
            age.add_metric(labels, now - inst.refreshed_at if inst.refreshed_at else math.inf)
            pending.add_metric(labels, inst.pending_requests)
        generation.add_metric([], self._book.generation)
        watchers.add_metric([], self._book.watcher_count)
        for name, (lookups, hits) in sorted(cache.items()):
            hit_ratio.add_metric([name], min(1.0, hits / lookups))
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        instance = ["instance"]
        return [
            GaugeMetricFamily(
                "pointsman_router_instance_inferences_per_second",
                "Inferences (batch items) per second on the instance, all models, over the "
                "last 5 s of Triton's nv_inference_count.",
                labels=instance,
            ),
            GaugeMetricFamily(
                "pointsman_router_batch_size",
                "Average batch size over the last 5 s: delta nv_inference_count / delta "
                "nv_inference_exec_count; 0 when the model did not execute.",
                labels=["instance", "model"],
            ),
            GaugeMetricFamily(
                "pointsman_router_memory_used_bytes",
                "Memory in use on the instance: GPU memory when Triton reports it, else the "
                "sum of the loaded models' declared footprints (see ListInstances).",
                labels=instance,
            ),
            GaugeMetricFamily(
                "pointsman_router_memory_budget_bytes",
                "Memory the instance may give to models; absent when unknown.",
                labels=instance,
            ),
            GaugeMetricFamily(
                "pointsman_router_instance_healthy",
                "1 when the instance's last repository index refresh succeeded, else 0.",
                labels=instance,
            ),
            GaugeMetricFamily(
                "pointsman_router_instance_data_age_seconds",
                "Seconds since the instance was last refreshed; +Inf if it never was.",
                labels=instance,
            ),
            GaugeMetricFamily(
                "pointsman_router_instance_pending_requests",
                "Requests queued inside Triton on the instance, all models.",
                labels=instance,
            ),
            GaugeMetricFamily(
                "pointsman_router_route_generation",
                "Generation of the newest route table update.",
            ),
            GaugeMetricFamily(
                "pointsman_router_route_watchers",
                "WatchRoutes streams (sidecars) currently following the route tables.",
            ),
            GaugeMetricFamily(
                "pointsman_router_prefix_cache_hit_ratio",
                "Share of prompt blocks the model found in its prefix caches over the last 5 s, "
                "all instances together (its custom metrics prefix_cache_hit_blocks_total over "
                "prefix_cache_lookup_blocks_total); absent for models without lookups.",
                labels=["model"],
            ),
        ]
