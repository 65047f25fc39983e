"""The router's xDS resources, kept current from the route book, shared by every ADS stream.

One `XdsCache` follows the `RouteBook` the way a sidecar's WatchRoutes stream does (a
`watch()` queue: a full snapshot first, then each update), but only while some ADS stream is
open, so a router without proxyless clients builds nothing. Each update rebuilds the
resources of the models it names; a resource whose bytes did not change keeps its version,
so a weight change re-sends the model's ClusterLoadAssignment and nothing else. Every stream
is woken (`attach(wake)`) and decides itself what its client must be sent (router/xds/stream.py).

gRPC's EDS takes IP addresses only. Instances named by host (static configuration, DNS
discovery) are resolved here, in a thread, and re-resolved every `RESOLVE_EVERY_S`; until a
name resolves its instance is left out of the load assignment (and a warning says why).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import any_pb2

from pointsman.clock import Clock, monotonic
from router.routes import ModelRoutes, RouteUpdate
from router.xds.resources import RESOURCE_TYPES, XdsSettings, model_resources

__all__ = ["RESOLVE_EVERY_S", "RouteSource", "Versioned", "XdsCache", "resolve_host"]

log = logging.getLogger(__name__)

RESOLVE_EVERY_S = 30.0


class RouteSource(Protocol):
    """What the cache needs of a RouteBook."""

    def watch(self) -> asyncio.Queue[RouteUpdate | None]: ...

    def unwatch(self, queue: asyncio.Queue[RouteUpdate | None]) -> None: ...


@dataclass(frozen=True, slots=True)
class Versioned:
    """One resource and the cache's version of it (bumped only when its bytes change)."""

    version: int
    resource: any_pb2.Any


def resolve_host(host: str) -> str | None:
    """The first address of `host`, or None when it does not resolve (blocking)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


def _host_of(grpc_address: str) -> tuple[str, str]:
    host, _, port = grpc_address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), port


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


class XdsCache:
    """Current resources per type URL, each with a version; streams are woken on changes."""

    def __init__(
        self,
        book: RouteSource,
        settings: XdsSettings | None = None,
        *,
        resolve: Callable[[str], str | None] = resolve_host,
        clock: Clock = monotonic,
    ) -> None:
        self._book = book
        self.settings = settings or XdsSettings()
        self._resolve = resolve
        self._clock = clock
        self._tables: dict[str, ModelRoutes] = {}
        self._resources: dict[str, dict[str, Versioned]] = {t: {} for t in RESOURCE_TYPES}
        self._next_version = 1
        self._type_versions: dict[str, int] = dict.fromkeys(RESOURCE_TYPES, 0)
        self._wakes: set[Callable[[], None]] = set()
        self._queue: asyncio.Queue[RouteUpdate | None] | None = None
        self._pump: asyncio.Task[None] | None = None
        # host -> (address, resolved at); a host that did not resolve maps to None.
        self._hosts: dict[str, tuple[str | None, float]] = {}
        self._resolving: asyncio.Task[None] | None = None
        self.closed = False

    # -- what streams read ---------------------------------------------------------------

    def resources(self, type_url: str) -> Mapping[str, Versioned]:
        """Every resource of the type by name (empty for a type the router does not serve)."""
        return self._resources.get(type_url, {})

    def version(self, type_url: str) -> str:
        """The version of the type's resources as a whole, for DiscoveryResponse.version_info."""
        return str(self._type_versions.get(type_url, 0))

    def attach(self, wake: Callable[[], None]) -> None:
        """Calls `wake()` after every change; the first stream starts following the book."""
        if self._queue is None and not self.closed:
            self._queue = self._book.watch()
            first = self._queue.get_nowait()  # watch() puts the full snapshot in at once
            if first is not None:
                self._apply(first)
            self._pump = asyncio.create_task(self._follow(self._queue))
        self._wakes.add(wake)

    def detach(self, wake: Callable[[], None]) -> None:
        """The last stream to leave stops following the book."""
        self._wakes.discard(wake)
        if not self._wakes:
            self._stop_following()

    def close(self) -> None:
        """The router is stopping: every stream is woken to find `closed` set."""
        self.closed = True
        self._stop_following()
        self._wake_all()

    # -- following the book --------------------------------------------------------------

    def _stop_following(self) -> None:
        for task in (self._pump, self._resolving):
            if task is not None:
                task.cancel()
        if self._queue is not None:
            self._book.unwatch(self._queue)
        self._queue, self._pump, self._resolving = None, None, None
        # Forget everything: the next stream starts from a full snapshot of the book.
        self._tables.clear()
        for resources in self._resources.values():
            resources.clear()

    async def _follow(self, queue: asyncio.Queue[RouteUpdate | None]) -> None:
        while True:
            update = await queue.get()
            if update is None:  # the book closed its watchers: the router is stopping
                self.close()
                return
            self._apply(update)

    def _apply(self, update: RouteUpdate) -> None:
        if update.full:
            removed = set(self._tables) - {t.model_name for t in update.tables}
        else:
            removed = set(update.removed)
        for name in removed:
            self._tables.pop(name, None)
        for table in update.tables:
            self._tables[table.model_name] = table
        self._rebuild({t.model_name for t in update.tables} | removed)

    def _rebuild(self, models: set[str]) -> None:
        """Rebuilds the resources of `models`; bumps versions of what changed; wakes streams."""
        addresses = self._addresses()
        changed: set[str] = set()
        for model in models:
            table = self._tables.get(model)
            built = model_resources(table, self.settings, addresses) if table else {}
            for type_url in RESOURCE_TYPES:
                if self._store(type_url, model, built.get(type_url)):
                    changed.add(type_url)
        for type_url in changed:
            self._type_versions[type_url] = self._bump()
        if changed:
            self._wake_all()

    def _store(self, type_url: str, name: str, resource: any_pb2.Any | None) -> bool:
        current = self._resources[type_url].get(name)
        if resource is None:
            return self._resources[type_url].pop(name, None) is not None
        if current is not None and current.resource == resource:
            return False
        self._resources[type_url][name] = Versioned(self._bump(), resource)
        return True

    def _bump(self) -> int:
        self._next_version += 1
        return self._next_version

    def _wake_all(self) -> None:
        for wake in list(self._wakes):
            wake()

    # -- host names ----------------------------------------------------------------------

    def _addresses(self) -> dict[str, str]:
        """gRPC address -> ip:port for instances named by host; starts resolving new names."""
        now = self._clock()
        addresses: dict[str, str] = {}
        wanted: set[str] = set()
        for table in self._tables.values():
            for entry in table.candidates:
                host, port = _host_of(entry.grpc_address)
                if _is_ip(host):
                    continue
                known = self._hosts.get(host)
                if known is None or now - known[1] > RESOLVE_EVERY_S:
                    wanted.add(host)
                if known is not None and known[0] is not None:
                    ip = f"[{known[0]}]" if ":" in known[0] else known[0]
                    addresses[entry.grpc_address] = f"{ip}:{port}"
        if wanted and self._resolving is None and self._queue is not None:
            self._resolving = asyncio.create_task(self._resolve_hosts(wanted))
        return addresses

    async def _resolve_hosts(self, hosts: set[str]) -> None:
        try:
            for host in sorted(hosts):
                address = await asyncio.to_thread(self._resolve, host)
                if address is None:
                    log.warning("xDS: instance host %r does not resolve; left out of EDS", host)
                self._hosts[host] = (address, self._clock())
        finally:
            self._resolving = None
        self._rebuild(set(self._tables))
