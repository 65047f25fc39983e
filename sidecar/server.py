"""Building and stopping the sidecar's gRPC server.

`start_sidecar` wires the parts together (pool of upstream channels, route cache and its
source, the inference service, grpc.health.v1, metrics and tracing) and returns a running
`SidecarServer` with its bound ports, so tests bind port 0.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from pointsman.drain import DrainingHealthServicer
from pointsman.errors import ConfigError
from pointsman.telemetry import MetricsEndpoint, Tracing, serve_metrics
from pointsman.tls import add_port
from sidecar.config import SidecarConfig
from sidecar.idempotency import IdempotencyStore
from sidecar.metrics import SidecarMetrics
from sidecar.router_picker import RouterPicker
from sidecar.router_watch import RouterWatch, RouteSource
from sidecar.routes import RouteCache
from sidecar.service import InferenceProxy
from sidecar.tracing import RpcTracer
from sidecar.upstream import SERVICE, Connect, UpstreamPool

__all__ = ["SidecarServer", "start_sidecar"]

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class SidecarServer:
    """A running sidecar: its ports, its route cache and metrics, and `stop`."""

    def __init__(
        self,
        *,
        server: grpc.aio.Server,
        port: int,
        config: SidecarConfig,
        cache: RouteCache,
        pool: UpstreamPool,
        health: health_aio.HealthServicer,
        picker: RouterPicker | None,
        metrics: SidecarMetrics,
        metrics_endpoint: MetricsEndpoint | None,
        idempotency: IdempotencyStore | None = None,
    ) -> None:
        self.port = port
        self.config = config
        self.cache = cache
        self.pool = pool
        self.health = health
        self.metrics = metrics
        # Where /metrics is served (the bound port, also for `metrics_listen` port 0); None
        # when `metrics_listen` is empty. `stop` closes it.
        self._metrics_endpoint = metrics_endpoint
        self.metrics_port = metrics_endpoint.port if metrics_endpoint else None
        self._server = server
        self._picker = picker
        self._idempotency = idempotency
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.config.listen_host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        host = self.config.metrics_listen.rpartition(":")[0]
        return f"http://{host}:{self.metrics_port}/metrics"

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task that `stop` cancels (kept referenced so it is not collected)."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def set_not_serving(self) -> None:
        """Health NOT_SERVING for every service, so load balancers drain this pod."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, then stop the server (in-flight RPCs get `grace` seconds)."""
        if self._stopped:
            return
        self._stopped = True
        await self.set_not_serving()
        await self._server.stop(grace)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._picker is not None:
            await self._picker.close()
        if self._idempotency is not None:
            await self._idempotency.close()
        await self.pool.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def _health_follows_routes(health: health_aio.HealthServicer, cache: RouteCache) -> None:
    await health.set(SERVICE, _SERVING if cache.ready else _NOT_SERVING)


async def _reap_idle_upstreams(pool: UpstreamPool, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        closed = await pool.reap()
        if closed:
            log.info("closed channels to instances no table names: %s", ", ".join(closed))


async def start_sidecar(
    config: SidecarConfig,
    *,
    route_source: RouteSource | None = None,
    rng: random.Random | None = None,
    registry: CollectorRegistry | None = None,
    tracing: Tracing | None = None,
    connect: Connect | None = None,
) -> SidecarServer:
    """Starts the sidecar on `config.listen` and returns it running.

    `route_source` feeds the route cache; by default a RouterWatch over `config.routers`
    (none, with no routers: static routes only). `rng` drives every random choice.
    `registry` receives the metrics (a new one by default), served on `config.metrics_listen`
    if set. `tracing` records spans when enabled (`pointsman.telemetry.setup_tracing`).
    `connect` makes the upstream of a Triton address (by default a grpc channel;
    `sidecar.testing.MockTransport` for tests that need no Triton).
    """
    rng = rng or random.Random()
    pool = UpstreamPool(
        max_message_bytes=config.max_message_bytes,
        idle_close_s=config.upstream_idle_close_s,
        tls=config.triton_tls,
        connect=connect,
    )
    # Full route snapshots of a large fleet can pass gRPC's 4 MiB default.
    router_channel = (
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    )
    if route_source is None and config.routers:
        route_source = RouterWatch(
            config.routers,
            client_id=config.client_id,
            models=config.watch_models,
            initial_backoff_s=config.reconnect_initial_s,
            max_backoff_s=config.reconnect_max_s,
            idle_timeout_s=config.router_idle_timeout_s,
            # Its own stream, so reconnect jitter does not shift the balancer's draws.
            rng=random.Random(rng.getrandbits(64)),
            tls=config.router_tls,
            channel_options=router_channel,
        )
    cache = RouteCache(
        pool,
        static_routes=config.static_routes,
        fallback_instances=config.fallback_instances,
        expects_router=route_source is not None,
    )
    picker = (
        RouterPicker(
            config.routers,
            timeout_s=config.pick_timeout_s,
            tls=config.router_tls,
            channel_options=router_channel,
        )
        if config.pick_mode == "per-request"
        else None
    )
    # Table mode asks the router only on the cold path (a model loaded nowhere).
    cold_picker = (
        picker
        if picker is not None or not config.routers or config.cold_start_wait_s <= 0
        else RouterPicker(
            config.routers,
            timeout_s=config.pick_timeout_s,
            tls=config.router_tls,
            channel_options=router_channel,
        )
    )
    metrics = SidecarMetrics(registry or CollectorRegistry(), cache=cache, pool=pool)
    tracer = RpcTracer(tracing.tracer) if tracing is not None and tracing.enabled else None
    proxy = InferenceProxy(
        config,
        cache,
        pool,
        rng=rng,
        metrics=metrics,
        tracer=tracer,
        picker=picker,
        cold_picker=cold_picker,
    )

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Two sidecars on one port would split traffic silently; fail to bind instead.
            ("grpc.so_reuseport", 0),
        ]
    )
    handlers = proxy.method_handlers()
    # Registered methods skip the generic lookup per call; the generic handler covers
    # callers that do not use registered-method stubs.
    server.add_registered_method_handlers(SERVICE, handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # Watch streams end once they said NOT_SERVING, so a drain waits only for real work.
    health = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = add_port(server, config.listen, config.tls)
    except RuntimeError as error:
        raise ConfigError(
            f"sidecar config field 'listen': cannot bind {config.listen}: {error}"
        ) from None
    metrics_endpoint = None
    if config.metrics_listen:
        try:
            metrics_endpoint = serve_metrics(config.metrics_listen, metrics.registry)
        except OSError as error:
            await server.stop(None)
            raise ConfigError(
                f"sidecar config field 'metrics_listen': cannot bind {config.metrics_listen}: "
                f"{error}"
            ) from None
    await server.start()

    sidecar = SidecarServer(
        server=server,
        port=port,
        config=config,
        cache=cache,
        pool=pool,
        health=health,
        picker=cold_picker,  # closed on stop
        metrics=metrics,
        metrics_endpoint=metrics_endpoint,
        idempotency=proxy.idempotency,
    )
    if proxy.idempotency is not None:
        proxy.idempotency.start()
    await health.set("", _SERVING)
    await _health_follows_routes(health, cache)

    def on_routes_changed() -> None:
        sidecar.spawn(_health_follows_routes(health, cache), "sidecar-health")

    cache.subscribe(on_routes_changed)
    if route_source is not None:
        sidecar.spawn(route_source.run(cache), "sidecar-routes")
    sidecar.spawn(
        _reap_idle_upstreams(pool, max(0.05, min(30.0, config.upstream_idle_close_s / 2))),
        "sidecar-reaper",
    )
    return sidecar
