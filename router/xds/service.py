"""The Aggregated Discovery Service (xDS v3, state of the world) on the router's gRPC port.

`add_xds_service` registers `envoy.service.discovery.v3.AggregatedDiscoveryService` beside
RouterService, so a client's bootstrap names only the router's address (with the router's TLS).
Each stream reads its requests itself from raw bytes: bytes that do not parse end the stream
with INVALID_ARGUMENT (not grpc's UNKNOWN), as do requests no ADS client sends (no type URL,
absurd numbers of names). Incremental xDS (DeltaAggregatedResources) answers UNIMPLEMENTED:
gRPC's clients use the state of the world.

A stream is held until the router has its first view of the fleet (router/first_view.py), so
a client never learns from a half-read fleet that its model does not exist. When the router
stops, streams end with OK and clients reconnect to another replica (A71 fallback, or a
Service in front of several routers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge

from pointsman import errors
from router.xds.cache import XdsCache
from router.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from router.xds.stream import AdsStream, RequestKind

__all__ = ["ADS_SERVICE", "XdsMetrics", "XdsService", "add_xds_service"]

log = logging.getLogger(__name__)

ADS_SERVICE: Final = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# Requests a stream may have read ahead of its answers: more wait in HTTP/2 flow control.
_INBOX = 64
_TYPE_LABELS = {
    LISTENER_TYPE: "listener",
    ROUTE_TYPE: "route",
    CLUSTER_TYPE: "cluster",
    ENDPOINT_TYPE: "endpoint",
}


def _type_label(type_url: str) -> str:
    return _TYPE_LABELS.get(type_url, "other")


class XdsMetrics:
    """The xDS server's counters (listed in router/README.md, "Proxyless (xDS)")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Gauge(
            "pointsman_router_xds_streams",
            "Open ADS streams (proxyless clients)",
            registry=registry,
        )
        self.requests = Counter(
            "pointsman_router_xds_requests",
            "ADS requests by resource type and kind (subscribe, ack, nack, stale, invalid)",
            ["type", "kind"],
            registry=registry,
        )
        self.responses = Counter(
            "pointsman_router_xds_responses",
            "ADS responses sent, by resource type",
            ["type"],
            registry=registry,
        )


class _Changed:
    """Marks 'the cache changed' in a stream's inbox, at most once until it is handled."""


_CHANGED: Final = _Changed()
_Item = Any | _Changed | BaseException | None


class XdsService:
    """Serves ADS streams from one shared `XdsCache`."""

    def __init__(
        self,
        cache: XdsCache,
        *,
        ready: Callable[[], Awaitable[None]],
        metrics: XdsMetrics | None = None,
    ) -> None:
        self._cache = cache
        self._ready = ready
        self._metrics = metrics

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await self._ready()
        inbox: asyncio.Queue[_Item] = asyncio.Queue(maxsize=_INBOX)
        pending = False

        def wake() -> None:
            nonlocal pending
            if not pending:
                pending = True
                # A full inbox is being read: the flag alone gets the change handled.
                with contextlib.suppress(asyncio.QueueFull):
                    inbox.put_nowait(_CHANGED)

        stream = AdsStream(self._cache)
        reader = asyncio.create_task(_read(requests, inbox))
        self._cache.attach(wake)
        if self._metrics is not None:
            self._metrics.streams.inc()
        try:
            while not self._cache.closed:
                item = await inbox.get()
                if item is None or self._cache.closed:
                    return
                if isinstance(item, BaseException):
                    self._count(None, "invalid")
                    await errors.abort(context, item)
                responses: list[Any] = []
                if not isinstance(item, _Changed):
                    try:
                        responses += self._handle(stream, item, context.peer())
                    except errors.InvalidRequestError as error:
                        await errors.abort(context, error)
                if pending:
                    pending = False
                    responses += stream.on_change()
                for response in responses:
                    if self._metrics is not None:
                        self._metrics.responses.labels(_type_label(response.type_url)).inc()
                    yield response
        finally:
            self._cache.detach(wake)
            reader.cancel()
            if self._metrics is not None:
                self._metrics.streams.dec()

    def _handle(self, stream: AdsStream, request: Any, peer: str) -> list[Any]:
        try:
            kind, responses = stream.on_request(request)
        except errors.InvalidRequestError:
            self._count(request.type_url, "invalid")
            raise
        self._count(request.type_url, kind.value)
        if kind is RequestKind.NACK:
            # One line per refusal; a client NACKing in a loop gets no answers, so no loop.
            log.warning(
                "xDS: %s refused %s version %r: %s",
                peer,
                _type_label(request.type_url),
                request.version_info,
                request.error_detail.message[:500],
            )
        return responses

    def _count(self, type_url: str | None, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(_type_label(type_url or ""), kind).inc()

    async def DeltaAggregatedResources(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "incremental xDS is not served: use StreamAggregatedResources (state of the world)",
        )
        yield  # pragma: no cover - makes this an async generator, as grpc expects


async def _read(requests: AsyncIterator[bytes], inbox: asyncio.Queue[_Item]) -> None:
    """Parses the client's requests into the inbox; None when the client is done."""
    try:
        async for data in requests:
            try:
                request = discovery_pb2.DiscoveryRequest.FromString(data)
            except DecodeError as error:
                await inbox.put(errors.InvalidRequestError(f"not a DiscoveryRequest: {error}"))
                return
            await inbox.put(request)
    except asyncio.CancelledError:
        raise
    except Exception:  # the call ended (cancelled by the client, or the server stopping)
        log.debug("ADS request stream ended", exc_info=True)
    await inbox.put(None)


def add_xds_service(service: XdsService, server: grpc.aio.Server) -> None:
    """Registers the ADS methods on `server`; requests arrive as bytes (see module doc)."""
    serialize = discovery_pb2.DiscoveryResponse.SerializeToString
    handlers = {
        name: grpc.stream_stream_rpc_method_handler(
            getattr(service, name), response_serializer=serialize
        )
        for name in ("StreamAggregatedResources", "DeltaAggregatedResources")
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
    server.add_registered_method_handlers(ADS_SERVICE, handlers)
