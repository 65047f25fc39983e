"""Collectors: keep a fresh view of every Triton instance and publish immutable snapshots.

Per instance, one task polls the model repository index over gRPC (readiness and model
states; `refresh_interval_s`) and one scrapes Prometheus metrics (`metrics_interval_s`), over
one kept-alive connection (scrape.py), reading only the families routing uses
(triton_metrics.py), at a phase of the interval fixed per instance (`scrape_phase`) so that a
large fleet's scrapes are spread over time.
Rates (inferences per second, average batch size) come from counter deltas over a window of
recent scrapes. A model version seen LOADING and later READY is reported to `on_model_loaded`
with the time between the two sightings: its load time, give or take one poll interval.
Each newly ready version's config is read once (ModelConfig; `model_config.model_facts`).
A change wakes whoever waits on `FleetCollector.changed`; `snapshot()` copies the current
state into a `FleetSnapshot` that scheduling reads without locks or I/O.

For placement, each scrape also yields the requests Triton answered since the previous scrape,
per model version (`RequestDelta`, from nv_inference_request_success + failure, timed at the
scrape), which `FleetCollector.take_request_deltas` hands over, and the latest GPU memory
reading per instance (`FleetCollector.gpu_memory`), to measure what a load takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from pointsman.clock import Clock
from pointsman.tls import TlsConfig, aio_channel
from router.config import InstanceConfig, RouterConfig
from router.contracts import FleetSnapshot, InstanceSnapshot, MemorySource, ModelOnInstance
from router.datalayer.counters import (
    CounterWindow,
    GpuMemoryReading,
    RequestDelta,
    request_increases,
)
from router.datalayer.model_config import ModelFacts, combined, facts_of, model_facts
from router.datalayer.scrape import MetricsConnection, MetricsFetchError
from router.datalayer.triton_metrics import TritonMetrics, parse_triton_metrics
from router.discovery import Discovery

__all__ = [
    "FleetCollector",
    "GpuMemoryReading",
    "InstanceWatcher",
    "ModelLoadedHook",
    "RequestDelta",
    "request_increases",
]

log = logging.getLogger(__name__)

# Throughput and batch sizes are measured over this many seconds of counter history.
_RATE_WINDOW_S = 5.0

# Request deltas kept for `take_request_deltas` when nobody takes them: the oldest go first.
_REQUEST_DELTAS_KEPT = 10_000

# Told (model name, seconds) when a model version that was seen loading is seen ready.
ModelLoadedHook = Callable[[str, float], None]


def _ignore_load(model_name: str, seconds: float) -> None:
    pass


def scrape_phase(instance_id: str) -> float:
    """Where in each metrics interval this instance is scraped, in [0, 1): spread evenly
    over instances (a hash of the id), so a large fleet's scrapes do not come in bursts."""
    return zlib.crc32(instance_id.encode()) / 2**32


@dataclass
class _ModelStates:
    ready: set[str] = field(default_factory=set)
    loading: set[str] = field(default_factory=set)


class InstanceWatcher:
    """Refreshes one instance; `snapshot()` is its latest view."""

    def __init__(
        self,
        config: InstanceConfig,
        *,
        clock: Clock,
        refresh_interval_s: float,
        metrics_interval_s: float,
        on_change: Callable[[], None],
        on_model_loaded: ModelLoadedHook = _ignore_load,
        on_requests: Callable[[list[RequestDelta]], None] | None = None,
        tls: TlsConfig | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.config = config
        self._clock = clock
        self._refresh_interval_s = refresh_interval_s
        self._metrics_interval_s = metrics_interval_s
        self._on_change = on_change
        self._on_model_loaded = on_model_loaded
        self._on_requests = on_requests
        # Request counters at the previous scrape; None before the first, which is only a
        # baseline (when its requests came is unknown).
        self._request_totals: Mapping[tuple[str, str], float] | None = None
        self.gpu_memory: GpuMemoryReading | None = None
        self._channel = aio_channel(
            config.grpc_address,
            tls,
            (
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ),
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._states: dict[str, _ModelStates] = {}
        self.known_models: frozenset[str] = frozenset()
        # (model, version) -> what its config says (router/datalayer/model_config.py).
        self._facts: dict[tuple[str, str], ModelFacts] = {}
        self._metrics = TritonMetrics()
        self._counters = CounterWindow(_RATE_WINDOW_S)
        # (model, version) -> clock time it was first seen LOADING.
        self._loading_since: dict[tuple[str, str], float] = {}
        self._healthy = False
        self._refreshed_at = 0.0
        self._last_error = ""
        self._tasks: list[asyncio.Task[None]] = []
        # One kept-alive connection to the metrics page (router/datalayer/scrape.py).
        self._scraper: MetricsConnection | None = None
        try:
            self._scraper = MetricsConnection(config.metrics_url) if config.metrics_url else None
        except ValueError as exc:  # not an http(s) URL: reported, the index still refreshes
            self._last_error = f"metrics: {exc}"

    def start(self) -> None:
        phase_s = scrape_phase(self.config.instance_id) * self._metrics_interval_s
        self._tasks = [
            asyncio.create_task(self._loop(self.refresh_index, self._refresh_interval_s)),
            asyncio.create_task(
                self._loop(self.refresh_metrics, self._metrics_interval_s, phase_s)
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._scraper is not None:
            self._scraper.close()
        await self._channel.close()

    async def _loop(
        self, refresh: Callable[[], object], interval_s: float, phase_s: float = 0.0
    ) -> None:
        await asyncio.sleep(phase_s)
        while True:
            started = self._clock()
            try:
                await refresh()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the watcher; it shows as last_error
                log.exception("refreshing %s failed", self.config.instance_id)
            await asyncio.sleep(max(0.0, interval_s - (self._clock() - started)))

    async def refresh_index(self) -> None:
        timeout = max(0.5, 4 * self._refresh_interval_s)
        try:
            index = await self._stub.RepositoryIndex(
                service_pb2.RepositoryIndexRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            changed = self._healthy
            self._healthy = False
            self._last_error = f"repository index: {exc.code().name}: {exc.details()}"
            if changed:
                self._on_change()
            return
        self._time_loads(index)
        states: dict[str, _ModelStates] = {}
        known: set[str] = set()
        for entry in index.models:
            known.add(entry.name)
            if entry.state == "READY":
                states.setdefault(entry.name, _ModelStates()).ready.add(entry.version or "1")
            elif entry.state == "LOADING":
                states.setdefault(entry.name, _ModelStates()).loading.add(entry.version or "")
        await self._learn_model_facts(states)
        changed = (
            not self._healthy or states != self._states or frozenset(known) != self.known_models
        )
        self._states, self.known_models = states, frozenset(known)
        self._healthy, self._last_error = True, ""
        self._refreshed_at = self._clock()
        if changed:
            self._on_change()

    def _time_loads(self, index: service_pb2.RepositoryIndexResponse) -> None:
        now = self._clock()
        loading: set[tuple[str, str]] = set()
        for entry in index.models:
            key = (entry.name, entry.version)
            if entry.state == "LOADING":
                loading.add(key)
                self._loading_since.setdefault(key, now)
            elif entry.state == "READY" and key in self._loading_since:
                since = self._loading_since.pop(key)
                log.info(
                    "%s: model %s version %s ready after %.2f s loading",
                    self.config.instance_id,
                    entry.name,
                    entry.version,
                    now - since,
                )
                self._on_model_loaded(entry.name, now - since)
        # A version that stopped loading without becoming ready failed or was unloaded.
        for key in self._loading_since.keys() - loading:
            del self._loading_since[key]

    async def _learn_model_facts(self, states: dict[str, _ModelStates]) -> None:
        """Reads the config of every newly ready version (ModelConfig), once; forgets the
        versions no longer ready, so a model loaded again with a new config is read again."""
        ready = {(name, version) for name, model in states.items() for version in model.ready}
        self._facts = {key: facts for key, facts in self._facts.items() if key in ready}
        for name, model in states.items():
            for version in model.ready:
                if (name, version) in self._facts:
                    continue
                try:
                    response = await self._stub.ModelConfig(
                        service_pb2.ModelConfigRequest(name=name, version=version), timeout=2.0
                    )
                except grpc.aio.AioRpcError:
                    continue  # unloaded meanwhile; learnt on the next refresh
                self._facts[(name, version)] = model_facts(response.config)

    async def refresh_metrics(self) -> None:
        if self._scraper is None:
            return
        try:
            text = await self._scraper.get(timeout_s=max(1.0, 4 * self._metrics_interval_s))
            metrics = parse_triton_metrics(text)
        except (MetricsFetchError, ValueError) as exc:
            self._last_error = f"metrics: {exc}"
            return
        now = self._clock()
        self._count_requests(metrics.requests_by_version, now)
        if metrics.gpu_memory_used_bytes is not None:
            self.gpu_memory = GpuMemoryReading(now, metrics.gpu_memory_used_bytes)
        self._counters.add(now, metrics.inference_count_by_model, metrics.exec_count_by_model)
        pending_changed = metrics.pending_by_model != self._metrics.pending_by_model
        self._metrics = metrics
        if pending_changed:
            self._on_change()

    def _count_requests(self, totals: Mapping[tuple[str, str], float], now: float) -> None:
        previous = self._request_totals
        # Last values of every series seen, those gone from this scrape included.
        self._request_totals = {**(previous or {}), **totals}
        if previous is None or self._on_requests is None:
            return
        deltas = [
            RequestDelta(self.config.instance_id, model, version, count, now)
            for (model, version), count in sorted(request_increases(previous, totals).items())
        ]
        if deltas:
            self._on_requests(deltas)

    def snapshot(self) -> InstanceSnapshot:
        metrics = self._metrics
        seconds, inferences, executions = self._counters.increases()
        models: dict[str, ModelOnInstance] = {}
        declared_total = 0
        for name, st in self._states.items():
            facts = combined(f for v in st.ready if (f := self._facts.get((name, v))))
            declared_total += facts.declared_memory_bytes
            batches = executions.get(name, 0.0)
            models[name] = ModelOnInstance(
                name=name,
                ready_versions=frozenset(st.ready),
                loading_versions=frozenset(st.loading),
                pending_requests=metrics.pending_by_model.get(name, 0),
                average_batch_size=inferences.get(name, 0.0) / batches if batches else 0.0,
                **facts_of(facts),
            )
        if metrics.gpu_memory_used_bytes is not None:
            used, source = metrics.gpu_memory_used_bytes, MemorySource.GPU_METRICS
            budget = self.config.memory_budget_bytes or (metrics.gpu_memory_total_bytes or 0)
        else:
            used, source = declared_total, MemorySource.DECLARED
            budget = self.config.memory_budget_bytes
        return InstanceSnapshot(
            instance_id=self.config.instance_id,
            grpc_address=self.config.grpc_address,
            metrics_url=self.config.metrics_url,
            healthy=self._healthy,
            refreshed_at=self._refreshed_at,
            models=models,
            memory_used_bytes=used,
            memory_budget_bytes=budget,
            memory_source=source,
            inferences_per_second=sum(inferences.values()) / seconds if seconds else 0.0,
            pending_requests=metrics.pending_requests,
            gpu_utilization=metrics.gpu_utilization,
            last_error=self._last_error,
        )


class FleetCollector:
    """Runs one `InstanceWatcher` per discovered instance and publishes fleet snapshots."""

    def __init__(
        self,
        config: RouterConfig,
        discovery: Discovery,
        *,
        clock: Clock,
        on_model_loaded: ModelLoadedHook = _ignore_load,
    ) -> None:
        self._config = config
        self._on_model_loaded = on_model_loaded
        self._discovery = discovery
        self._clock = clock
        self._watchers: dict[str, InstanceWatcher] = {}
        self._discovery_task: asyncio.Task[None] | None = None
        # Set whenever any instance's view changed; the route builder clears it.
        self.changed = asyncio.Event()
        self._request_deltas: deque[RequestDelta] = deque(maxlen=_REQUEST_DELTAS_KEPT)

    async def start(self) -> None:
        self._sync_watchers()
        self._discovery_task = asyncio.create_task(self._rediscover())

    async def stop(self) -> None:
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery_task
        for watcher in self._watchers.values():
            await watcher.stop()
        self._watchers.clear()

    async def _rediscover(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._sync_watchers()

    def _sync_watchers(self) -> None:
        wanted = {inst.instance_id: inst for inst in self._discovery.instances()}
        for instance_id in list(self._watchers):
            watcher = self._watchers[instance_id]
            if wanted.get(instance_id) != watcher.config:
                del self._watchers[instance_id]
                asyncio.create_task(watcher.stop())  # noqa: RUF006 - stop() cancels its own tasks
                self.changed.set()
        for instance_id, inst in wanted.items():
            if instance_id not in self._watchers:
                watcher = InstanceWatcher(
                    inst,
                    clock=self._clock,
                    refresh_interval_s=self._config.refresh_interval_s,
                    metrics_interval_s=self._config.metrics_interval_s,
                    on_change=self.changed.set,
                    on_model_loaded=self._on_model_loaded,
                    on_requests=self._request_deltas.extend,
                    tls=self._config.triton_tls,
                    max_message_bytes=self._config.max_message_bytes,
                )
                self._watchers[instance_id] = watcher
                watcher.start()

    def snapshot(self) -> FleetSnapshot:
        known: set[str] = set()
        for watcher in self._watchers.values():
            known |= watcher.known_models
        return FleetSnapshot(
            taken_at=self._clock(),
            instances=tuple(w.snapshot() for w in self._watchers.values()),
            known_models=frozenset(known),
        )

    def take_request_deltas(self) -> list[RequestDelta]:
        """The requests Triton answered since the last call, per instance and model version,
        oldest first (at most the latest 10,000 deltas are kept between calls)."""
        deltas = list(self._request_deltas)
        self._request_deltas.clear()
        return deltas

    def gpu_memory(self, instance_id: str) -> GpuMemoryReading | None:
        """The instance's latest GPU memory reading; None without GPU metrics."""
        watcher = self._watchers.get(instance_id)
        return watcher.gpu_memory if watcher is not None else None
