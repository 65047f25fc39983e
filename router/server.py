"""Builds and runs the router: collectors, route book, gRPC service, health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pointsman.clock import Clock, monotonic
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from router.config import RouterConfig
from router.contracts import FleetSnapshot
from router.datalayer.collector import FleetCollector
from router.discovery import Discovery, StaticDiscovery
from router.plugins.registry import build_profile, default_registry
from router.routes import AssumedLoad, RouteBook
from router.scheduling import Scheduler
from router.service import RouterServicer

__all__ = ["RouterServer", "start_router"]

log = logging.getLogger(__name__)
SERVICE_NAME = "pointsman.router.v1.RouterService"


@dataclass
class RouterServer:
    """A running router. `port` is the bound port (tests bind port 0)."""

    server: grpc.aio.Server
    port: int
    collector: FleetCollector
    book: RouteBook
    health: health_aio.HealthServicer
    stopping: asyncio.Event
    router_id: str
    snapshot: FleetSnapshot
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        self.stopping.set()
        self.book.close_watchers()
        await self.server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.collector.stop()


async def _keep_routes(router: RouterServer, refresh_interval_s: float, clock: Clock) -> None:
    """Rebuilds route tables on every change, and at least every refresh interval (staleness)."""
    collector, book = router.collector, router.book
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collector.changed.wait(), refresh_interval_s)
        collector.changed.clear()
        router.snapshot = collector.snapshot()
        try:
            book.rebuild(router.snapshot, clock())
        except Exception:  # a bad plugin must not stop route publishing
            log.exception("rebuilding route tables failed")
        # Coalesce bursts of changes (several instances refreshing at once).
        await asyncio.sleep(0.02)


async def start_router(
    config: RouterConfig,
    *,
    discovery: Discovery | None = None,
    clock: Clock = monotonic,
    rng: random.Random | None = None,
) -> RouterServer:
    # Sections left out of the config take the default profile's.
    profile = build_profile(config.scheduling, default_registry(), path="scheduling")
    scheduler = Scheduler(profile)
    book = RouteBook(scheduler, ttl_ms=config.route_ttl_ms)
    collector = FleetCollector(config, discovery or StaticDiscovery(config.instances), clock=clock)
    assumed = AssumedLoad(window_s=2 * config.metrics_interval_s)
    stopping = asyncio.Event()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_servicer = health_aio.HealthServicer()
    router = RouterServer(
        server=server,
        port=0,
        collector=collector,
        book=book,
        health=health_servicer,
        stopping=stopping,
        router_id=uuid.uuid4().hex[:12],
        snapshot=FleetSnapshot(taken_at=clock()),
    )
    servicer = RouterServicer(
        book=book,
        snapshot=lambda: router.snapshot,
        assumed=assumed,
        clock=clock,
        rng=rng or random.Random(config.seed),
        router_id=router.router_id,
        heartbeat_interval_s=config.heartbeat_interval_s,
        stopping=stopping,
    )
    pb_grpc.add_RouterServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    router.port = server.add_insecure_port(config.listen)
    if router.port == 0:
        raise OSError(f"router cannot bind {config.listen}")
    await collector.start()
    await server.start()
    router._tasks.append(
        asyncio.create_task(_keep_routes(router, config.refresh_interval_s, clock))
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("router %s listening on port %d", router.router_id, router.port)
    return router
