"""Builds and runs the router: collectors, route book, gRPC service, health, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from pointsman.auth import AdminAuth, AdminAuthInterceptor, is_loopback_host, load_admin_token
from pointsman.clock import Clock, monotonic
from pointsman.drain import DrainingHealthServicer
from pointsman.telemetry import MetricsEndpoint, Tracing, serve_metrics
from pointsman.tls import add_port
from router.autoscale import DesiredReplicasView, measure_router
from router.config import RouterConfig
from router.contracts import FleetSnapshot
from router.datalayer.collector import FleetCollector
from router.datalayer.fields import CollectedFields, collected_fields
from router.decision import AssumedLoad, DecisionPolicy, check_inputs
from router.discovery import Discovery, StaticDiscovery
from router.election import LeaseElection
from router.first_view import FirstView
from router.metrics import FleetView, RouterMetrics
from router.placement.control import TritonModelControl
from router.placement.controller import ControllerSettings, PlacementController
from router.policy import Policy, PolicyCheck, PolicyStore
from router.routes import RouteBook
from router.service import RouterServicer
from router.strict_decoding import add_router_service
from router.xds.cache import XdsCache
from router.xds.resources import XdsSettings
from router.xds.service import XdsMetrics, XdsService, add_xds_service

__all__ = ["RouterServer", "decision_policy", "inputs_check", "start_router"]

log = logging.getLogger(__name__)
SERVICE_NAME = "pointsman.router.v1.RouterService"
# RPCs that change what the fleet does: they need a token or an allowed mTLS identity.
ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/ReloadPolicy"})


def admin_auth_from_config(config: RouterConfig) -> AdminAuth:
    """The token from admin_token_file or $POINTSMAN_ADMIN_TOKEN, and the allowed identities."""
    return AdminAuth(
        token=load_admin_token(config.admin_token_file, where="admin_token_file"),
        identities=frozenset(config.admin_identities),
        loopback_listener=is_loopback_host(config.listen),
    )


def decision_policy(policy: Policy) -> DecisionPolicy:
    """What routing decisions take from `policy`: its profile, version rules, prefix routing."""
    rules = {name: model.versions for name, model in policy.models.items()}
    return DecisionPolicy(
        policy.profile,
        {name: r for name, r in rules.items() if not r.is_empty},
        policy.prefix_routing(),
    )


def inputs_check(collected: CollectedFields) -> PolicyCheck:
    """A policy check that refuses filters and scorers reading a snapshot field that no running
    collector fills (router/datalayer/fields.py): at start, on ReloadPolicy (INVALID_ARGUMENT
    naming the plugin and the field) and when the watched file changes."""
    return lambda policy: check_inputs(policy.profile, collected)


@dataclass
class RouterServer:
    """A running router. `port` is the bound port (tests bind port 0); `metrics_port` the
    bound port of /metrics, None when metrics are not served."""

    server: grpc.aio.Server
    port: int
    collector: FleetCollector
    book: RouteBook
    health: health_aio.HealthServicer
    stopping: asyncio.Event
    router_id: str
    snapshot: FleetSnapshot
    metrics: RouterMetrics
    metrics_port: int | None = None
    placement: PlacementController | None = None
    _control: TritonModelControl | None = None
    _metrics_endpoint: MetricsEndpoint | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The config's placement_writer, and the placement Lease this replica runs for (None
    # without an election).
    placement_writer: bool = True
    election: LeaseElection | None = None
    # The xDS resources proxyless clients follow (router/xds/).
    xds: XdsCache | None = None

    def places_models(self) -> bool:
        """Whether this replica's controller loads and unloads now (config and Lease)."""
        return (
            self.placement_writer
            and self.placement is not None
            and (self.election is None or self.election.is_leader())
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        self.stopping.set()
        if self.xds is not None:
            self.xds.close()  # ADS streams end with OK: clients move to another replica
        self.book.close_watchers()
        await self.server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.election is not None:
            await asyncio.to_thread(self.election.stop)
        if self.placement is not None:
            await self.placement.stop()
        if self._control is not None:
            await self._control.close()
        await self.collector.stop()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()


async def _keep_routes(router: RouterServer, refresh_interval_s: float, clock: Clock) -> None:
    """Rebuilds route tables on every change, and at least every refresh interval (staleness):
    only the tables whose inputs changed, without holding the event loop for long."""
    collector, book, metrics = router.collector, router.book, router.metrics
    while True:
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: see PlacementController.run
            async with asyncio.timeout(refresh_interval_s):
                await collector.changed.wait()
        collector.changed.clear()
        router.snapshot = collector.snapshot()
        try:
            # In slices: PickTarget and WatchRoutes are served between them.
            update = await book.rebuild_async(router.snapshot, clock(), timer=metrics.timer)
        except Exception:  # a bad plugin must not stop route publishing
            log.exception("rebuilding route tables failed")
        else:
            metrics.observe_rebuild(book.last_rebuild.busy_s)
            if update is not None:
                metrics.count_route_update()
        # Coalesce bursts of changes (several instances refreshing at once).
        await asyncio.sleep(0.02)


async def start_router(
    config: RouterConfig,
    *,
    discovery: Discovery | None = None,
    clock: Clock = monotonic,
    rng: random.Random | None = None,
    registry: CollectorRegistry | None = None,
    tracing: Tracing | None = None,
    policy_store: PolicyStore | None = None,
    admin_auth: AdminAuth | None = None,
) -> RouterServer:
    """Starts the router. Metrics go to `registry` (a private one when None), served over
    HTTP when `config.metrics_listen` is set; spans go to `tracing` when it is enabled.
    `admin_auth` admits admin RPCs (default: from the config and $POINTSMAN_ADMIN_TOKEN)."""
    auth = admin_auth if admin_auth is not None else admin_auth_from_config(config)
    collected = collected_fields(config)
    # Before anything starts: a scorer over a field nobody fills would score blind for ever.
    policy = policy_store or PolicyStore(config.policy_file, check=inputs_check(collected))
    book = RouteBook(decision_policy(policy.current), ttl_ms=config.route_ttl_ms)
    metrics = RouterMetrics(registry if registry is not None else CollectorRegistry())
    controller: PlacementController | None = None

    def model_seen_loaded(model: str, seconds: float) -> None:
        # The controller times its own loads exactly and filters them out of these sightings.
        if controller is not None:
            controller.on_model_seen_loaded(model, seconds)
        else:
            metrics.observe_model_load(model, seconds)

    collector = FleetCollector(
        config,
        discovery or StaticDiscovery(config.instances),
        clock=clock,
        on_model_loaded=model_seen_loaded,
    )
    control = TritonModelControl(tls=config.triton_tls, max_message_bytes=config.max_message_bytes)
    controller = PlacementController(
        collector,
        book,
        control,
        clock=clock,
        metrics=metrics,
        spec_for=lambda model, footprint: policy.current.model_spec(model, footprint),
        placement_policy=lambda: policy.current.placement,
        demand_windows=lambda: policy.current.demand,
        on_routes_changed=collector.changed.set,
        settings=ControllerSettings(stale_after_s=max(2.0, 5 * config.refresh_interval_s)),
        tracer=tracing.tracer if tracing is not None and tracing.enabled else None,
    )
    assumed = AssumedLoad(window_s=2 * config.metrics_interval_s)
    stopping = asyncio.Event()
    server = grpc.aio.server(
        interceptors=[
            AdminAuthInterceptor(
                auth, ADMIN_METHODS, trust_peer_certs=config.tls.require_client_cert
            )
        ],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    # Watch streams end once they said NOT_SERVING, so a drain waits only for real work.
    health_servicer = DrainingHealthServicer()
    router = RouterServer(
        server=server,
        port=0,
        collector=collector,
        book=book,
        health=health_servicer,
        stopping=stopping,
        router_id=uuid.uuid4().hex[:12],
        snapshot=FleetSnapshot(taken_at=clock()),
        metrics=metrics,
    )
    metrics.registry.register(FleetView(lambda: router.snapshot, book, clock))
    # The autoscaling signal (router/autoscale.py), computed at each scrape.
    metrics.registry.register(
        DesiredReplicasView(lambda: measure_router(router, policy, config.discovery.pool))
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
        metrics=metrics,
        policy=policy,
        # A replica that does not place has no cold path: PickTarget answers at once.
        placement=controller if config.placement_writer else None,
        tracing=tracing,
        placement_active=lambda: router.places_models(),
    )
    # Parses requests itself: bytes that do not parse get INVALID_ARGUMENT, not UNKNOWN.
    add_router_service(servicer, server)
    # xDS for proxyless clients, on the same port (router/xds/).
    # With TLS towards Triton, Clusters ask proxyless clients for it too (xDS credentials).
    router.xds = XdsCache(
        book,
        XdsSettings(
            upstream_tls=config.triton_tls.enabled,
            upstream_identity=bool(config.triton_tls.cert_file),
        ),
    )
    first_view = FirstView(lambda: router.snapshot)
    add_xds_service(
        XdsService(
            router.xds,
            ready=lambda: first_view.wait(stopping),
            metrics=XdsMetrics(metrics.registry),
        ),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    router.port = add_port(server, config.listen, config.tls)
    if router.port == 0:
        raise OSError(f"router cannot bind {config.listen}")
    if config.metrics_listen:
        try:
            router._metrics_endpoint = serve_metrics(config.metrics_listen, metrics.registry)
        except OSError as exc:
            raise OSError(f"router cannot serve metrics on {config.metrics_listen}: {exc}") from exc
        router.metrics_port = router._metrics_endpoint.port
    await collector.start()
    await server.start()
    router._tasks.append(
        asyncio.create_task(_keep_routes(router, config.refresh_interval_s, clock))
    )

    def apply_policy(new: Policy) -> None:
        # Swapped whole between cycles: a pick or rebuild sees either policy, never a mix.
        book.policy = decision_policy(new)
        collector.changed.set()  # republish tables (version rules) at once
        log.info("policy %s from %s is active", new.version, new.source)

    policy.subscribe(apply_policy)
    router.placement = controller
    router._control = control
    router.placement_writer = config.placement_writer
    if config.placement_lease is not None and config.placement_writer:
        from router.discovery_kubernetes import api_client_for

        # In a pod the hostname is the pod's name: `kubectl get lease` shows who places.
        identity = f"{socket.gethostname()}-{router.router_id}"
        router.election = LeaseElection(
            config.placement_lease, identity, api_client_for(config.discovery)
        )
        router.election.start()
    router._tasks.append(
        asyncio.create_task(
            controller.run(
                lambda: policy.current.placement_interval_s,
                enabled=lambda: router.places_models() and policy.current.placement_enabled,
            )
        )
    )
    if config.policy_file is not None:
        router._tasks.append(asyncio.create_task(policy.watch()))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("router %s listening on port %d", router.router_id, router.port)
    if router.metrics_port is not None:
        log.info("router metrics on port %d", router.metrics_port)
    return router
