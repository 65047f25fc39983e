"""Route tables: what the sidecar knows about where each model can be served.

The router streams per-model tables over `RouterService.WatchRoutes`: a full snapshot first
(it replaces everything), then changed tables and removed models, and heartbeats (messages with
no tables) while nothing changes. `RouterWatch` (sidecar.router_watch) keeps that stream open
across router restarts and feeds a `RouteCache`.

The cache compiles each table once into a `Route`, so a request costs one dict lookup and a
`pick`: no router round trip.

Fail-static: when the route stream is down the cache keeps its last tables, marks them stale
and goes on routing with them, but with the router's weights dropped (every candidate weight
1), so picks balance by the sidecar's own in-flight counts alone: weights computed from a fleet
view that is no longer refreshed would keep steering traffic by old queue depths. The weights
come back with the next table from a router. Static routes from the config cover models the
router has no table for; `fallback_instances` cover every model while no router table has
arrived at all (a sidecar started while every router is down still serves).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from pointsman.errors import ModelNotFoundError, NoReadyInstanceError, PointsmanError
from pointsman.router.v1 import router_pb2
from pointsman.sessions import SessionPolicy
from pointsman.versions import VersionRules, rules_from_proto
from sidecar.admission import NO_CLASSES, PriorityClasses, priority_classes_from_proto
from sidecar.balancer import CandidateSet
from sidecar.upstream import UpstreamPool

__all__ = [
    "NoRouteTablesError",
    "Route",
    "RouteCache",
    "compile_fallback",
    "session_policy_from_proto",
    "without_weights",
]

log = logging.getLogger(__name__)


class NoRouteTablesError(NoReadyInstanceError):
    """Nothing has been heard from any router yet, so no model can be placed."""

    def __init__(self) -> None:
        PointsmanError.__init__(
            self, "no route tables yet: the sidecar has not reached a Pointsman router"
        )
        self.model_name = ""


class Route:
    """One model's compiled table: candidate sets per ready version."""

    __slots__ = (
        "by_version",
        "default_version",
        "fallback",
        "generation",
        "model_name",
        "static",
        "version_rules",
        "versions",
    )

    def __init__(
        self,
        model_name: str,
        by_version: Mapping[str, CandidateSet],
        *,
        fallback: CandidateSet | None = None,
        generation: int = 0,
        default_version: str = "",
        static: bool = False,
        version_rules: VersionRules | None = None,
    ) -> None:
        self.model_name = model_name
        # "" (any version) maps to every candidate with some version ready.
        self.by_version: dict[str, CandidateSet] = dict(by_version)
        # The versions some candidate has ready (what a canary split may choose from).
        self.versions = frozenset(v for v in self.by_version if v)
        # For a version no candidate lists: instances whose versions are unknown (static).
        self.fallback = fallback
        self.generation = generation
        self.default_version = default_version
        self.static = static
        # The policy's canary split and header rules for unpinned requests; None: none.
        self.version_rules = version_rules

    def candidates(self, version: str) -> CandidateSet | None:
        return self.by_version.get(version, self.fallback)

    @property
    def has_candidates(self) -> bool:
        return bool(self.by_version) or self.fallback is not None

    def addresses(self) -> set[str]:
        sets = [*self.by_version.values(), *([self.fallback] if self.fallback else [])]
        return {u.address for s in sets for u in s.upstreams}


def compile_table(table: router_pb2.RouteTable, pool: UpstreamPool) -> Route:
    """A Route from the router's table: one CandidateSet per version some candidate has ready."""
    members: dict[str, list[tuple[str, float]]] = {}
    for candidate in table.candidates:
        target = candidate.target
        if not target.grpc_address:
            continue
        versions = set(target.ready_versions)
        if not versions:
            continue  # listed but nothing ready: not a candidate for any request
        for version in (*versions, ""):
            members.setdefault(version, []).append((target.grpc_address, candidate.weight))
    by_version = {
        version: CandidateSet([pool.get(a) for a, _ in pairs], [w for _, w in pairs])
        for version, pairs in members.items()
    }
    rules: VersionRules | None = None
    if table.HasField("version_policy"):
        try:
            rules = rules_from_proto(table.version_policy)
        except ValueError as error:  # the router validates; a bad table must not stop routing
            log.warning("ignoring the version policy of %s: %s", table.model_name, error)
    return Route(
        table.model_name,
        by_version,
        generation=table.generation,
        default_version=table.default_version,
        version_rules=None if rules is None or rules.is_empty else rules,
    )


def compile_static(model_name: str, addresses: Sequence[str], pool: UpstreamPool) -> Route:
    """A Route from the config's static list: every address, any version, equal weights."""
    candidates = CandidateSet([pool.get(a) for a in addresses], [1.0] * len(addresses))
    return Route(model_name, {"": candidates}, fallback=candidates, static=True)


def compile_fallback(addresses: Sequence[str], pool: UpstreamPool) -> Route:
    """The route of any model without a table: the config's fallback instances, any version."""
    return compile_static("*", addresses, pool)


def without_weights(route: Route) -> Route:
    """`route` with every candidate weighted 1, for routing on stale tables: the pick then
    balances by the sidecar's own in-flight counts alone."""

    def flat(candidates: CandidateSet) -> CandidateSet:
        return CandidateSet(candidates.upstreams, [1.0] * len(candidates))

    return Route(
        route.model_name,
        {version: flat(c) for version, c in route.by_version.items()},
        fallback=None if route.fallback is None else flat(route.fallback),
        generation=route.generation,
        default_version=route.default_version,
        static=route.static,
        version_rules=route.version_rules,
    )


def session_policy_from_proto(message: router_pb2.SessionPolicy) -> SessionPolicy:
    """The session policy a WatchRoutes message carries; unset numbers take the defaults."""
    default = SessionPolicy()
    return SessionPolicy(
        header=message.header,
        max_in_flight=message.max_in_flight or default.max_in_flight,
        move_ttl_s=message.move_ttl_s if message.move_ttl_s > 0 else default.move_ttl_s,
    )


class _FallbackRoutes(dict[str, Route]):
    """A routes dict whose `get` answers the fallback route for a model it lacks.

    Used only while fallback instances apply (no router table yet), so the hot path's plain
    dict lookup is unchanged otherwise. `in` is not overridden: metrics keep unknown names
    under their bounded `_unknown` label.
    """

    __slots__ = ("fallback",)

    def __init__(self, routes: Mapping[str, Route], fallback: Route) -> None:
        super().__init__(routes)
        self.fallback = fallback

    def get(self, key: str, default: Route | None = None) -> Route | None:  # type: ignore[override]
        route = dict.get(self, key)
        return self.fallback if route is None else route


class RouteCache:
    """The current routes, read on every request, replaced as the router's updates arrive.

    `routes` is a plain dict replaced wholesale on each change, so a request always sees one
    consistent generation without locks.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        static_routes: Mapping[str, Sequence[str]] | None = None,
        fallback_instances: Sequence[str] = (),
        expects_router: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._expects_router = expects_router
        self._static = {
            name: compile_static(name, addresses, pool)
            for name, addresses in (static_routes or {}).items()
        }
        self._fallback = compile_fallback(fallback_instances, pool) if fallback_instances else None
        self._router: dict[str, Route] = {}
        # The router's routes with weights dropped, made when the stream goes down.
        self._router_unweighted: dict[str, Route] | None = None
        self._listeners: list[Callable[[], None]] = []
        # What requests read: router routes over static ones.
        self.routes: dict[str, Route] = dict(self._static)
        # True once any snapshot has arrived from a router.
        self.has_router_tables = False
        self.connected = False
        self.generation = 0
        self.router_id = ""
        self.last_message_at: float | None = None
        # The policy's priority classes, as the router last sent them (kept while it is away).
        self.priorities: PriorityClasses = NO_CLASSES
        # The policy's session affinity (the defaults until a router sends its own).
        self.sessions = SessionPolicy()
        self._created_at = clock()
        self._refresh()

    # -- what requests and RPCs ask ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True when some model has at least one candidate."""
        return self._ready

    @property
    def stale(self) -> bool:
        """True when the router tables are not being kept current (the stream is down)."""
        return self._expects_router and not self.connected

    @property
    def awaiting_router(self) -> bool:
        """True while a router is configured but no snapshot from it has arrived yet."""
        return self._expects_router and not self.has_router_tables

    def route_age_s(self) -> float | None:
        """Seconds since the router's last message (since this cache was made, if none yet);
        None when no router is configured."""
        if not self._expects_router:
            return None
        last = self.last_message_at
        return self._clock() - (self._created_at if last is None else last)

    def missing(self, model_name: str, version: str = "") -> PointsmanError:
        """The error for a model with no route: NOT_FOUND, or UNAVAILABLE before any table."""
        if self.awaiting_router:
            return NoRouteTablesError()
        return ModelNotFoundError(model_name, version)

    def addresses(self) -> set[str]:
        """Every Triton address any route names: the fleet, as far as this sidecar knows."""
        return set(self._addresses)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` after every change of the routes (not on heartbeats)."""
        self._listeners.append(listener)

    # -- what the route source feeds -----------------------------------------------------------

    def apply(self, message: router_pb2.WatchRoutesResponse) -> None:
        """Applies one WatchRoutes message: a snapshot, changed tables, removals or a heartbeat."""
        self.last_message_at = self._clock()
        self.generation = message.generation
        if message.router_id != self.router_id:
            if self.router_id:
                log.info("router changed from %s to %s", self.router_id, message.router_id)
            self.router_id = message.router_id
        if message.HasField("priority_policy"):
            self.priorities = priority_classes_from_proto(message.priority_policy)
        if message.HasField("session_policy"):
            self.sessions = session_policy_from_proto(message.session_policy)
        if not message.full_snapshot and not message.tables and not message.removed_models:
            return  # heartbeat
        routes = {} if message.full_snapshot else dict(self._router)
        for table in message.tables:
            routes[table.model_name] = compile_table(table, self._pool)
        for name in message.removed_models:
            routes.pop(name, None)
        self._router = routes
        self._router_unweighted = None
        if message.full_snapshot:
            self.has_router_tables = True
        self._refresh()

    @property
    def using_fallback(self) -> bool:
        """True while models without a route go to the config's fallback instances: they are
        configured and no router table has arrived (or no router is configured)."""
        return self._fallback is not None and not self.has_router_tables

    def set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if not connected and self.has_router_tables:
                log.warning(
                    "router stream down: routing with the last tables (stale), balanced by "
                    "this sidecar's in-flight counts"
                )
            self._refresh()  # weights off while stale, back on with a live stream

    def _refresh(self) -> None:
        router = self._router
        if self.stale and router:
            if self._router_unweighted is None:
                self._router_unweighted = {n: without_weights(r) for n, r in router.items()}
            router = self._router_unweighted
        else:
            self._router_unweighted = None
        routes = {**self._static, **router}
        if self._fallback is not None and self.using_fallback:
            self.routes = _FallbackRoutes(routes, self._fallback)
            routes[""] = self._fallback  # counted in readiness and the fleet's addresses
        else:
            self.routes = routes
        self._ready = any(route.has_candidates for route in routes.values())
        self._addresses = frozenset(a for route in routes.values() for a in route.addresses())
        self._pool.retain(self._addresses)
        for listener in self._listeners:
            listener()
