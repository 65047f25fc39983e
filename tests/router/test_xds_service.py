"""The ADS service over real gRPC: bytes that do not parse, requests no client may send,
incremental xDS, a NACK storm, and the end of streams when the router stops."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from router.routes import ModelRoutes, RouteEntry
from router.xds.cache import XdsCache
from router.xds.resources import ENDPOINT_TYPE, LISTENER_TYPE
from router.xds.service import ADS_SERVICE, XdsMetrics, XdsService, add_xds_service
from tests.support.fakes import FakeRouteBook

pytestmark = pytest.mark.asyncio

SOTW = f"/{ADS_SERVICE}/StreamAggregatedResources"
DELTA = f"/{ADS_SERVICE}/DeltaAggregatedResources"


class Served:
    def __init__(self) -> None:
        entries = (RouteEntry("a", "10.0.0.1:8001", ("1",), 1.0),)
        self.book = FakeRouteBook(ModelRoutes("codegen", entries, "1", 1))
        self.cache = XdsCache(self.book)
        self.registry = CollectorRegistry()
        self.server = grpc.aio.server()

    async def __aenter__(self) -> Served:
        async def ready() -> None:
            return None

        service = XdsService(self.cache, ready=ready, metrics=XdsMetrics(self.registry))
        add_xds_service(service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)

    def stream(self, method: str = SOTW) -> Any:
        call = self.channel.stream_stream(
            method,
            request_serializer=lambda raw: raw,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        return call()

    def counted(self, kind: str, type_label: str = "endpoint") -> float:
        value = self.registry.get_sample_value(
            "pointsman_router_xds_requests_total", {"type": type_label, "kind": kind}
        )
        return value or 0.0


def encoded(type_url: str, names: tuple[str, ...] = (), **fields: Any) -> bytes:
    message = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), **fields
    )
    return bytes(message.SerializeToString())


async def test_bytes_that_do_not_parse_end_the_stream_with_invalid_argument() -> None:
    async with Served() as served:
        call = served.stream()
        await call.write(b"\xff\xff\xff not a DiscoveryRequest")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "DiscoveryRequest" in (error.value.details() or "")
        assert served.counted("invalid", "other") == 1


async def test_a_request_without_a_type_is_invalid_argument() -> None:
    async with Served() as served:
        call = served.stream()
        await call.write(encoded("", ("codegen",)))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "type_url is required" in (error.value.details() or "")


async def test_incremental_xds_is_unimplemented() -> None:
    async with Served() as served:
        call = served.stream(DELTA)
        await call.write(encoded(LISTENER_TYPE))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_nack_storm_gets_no_answers_and_the_stream_still_serves_changes() -> None:
    async with Served() as served:
        call = served.stream()
        await call.write(encoded(ENDPOINT_TYPE, ("codegen",)))
        first = await call.read()
        nack = encoded(
            ENDPOINT_TYPE,
            ("codegen",),
            response_nonce=first.nonce,
            error_detail=status_pb2.Status(code=3, message="refused"),
        )
        for _ in range(2000):
            await call.write(nack)
        # The stream answered none of them; the next answer is the next change.
        for _ in range(200):
            if served.counted("nack") == 2000:
                break
            await asyncio.sleep(0.01)
        assert served.counted("nack") == 2000
        served.book.publish(ModelRoutes("codegen", (), "1", 2))
        pushed = await asyncio.wait_for(call.read(), 5)
        assert pushed.type_url == ENDPOINT_TYPE and pushed.nonce != first.nonce
        assert pushed.version_info != first.version_info
        call.cancel()


async def test_streams_end_with_ok_when_the_router_stops() -> None:
    async with Served() as served:
        call = served.stream()
        await call.write(encoded(LISTENER_TYPE, ("codegen",)))
        await call.read()
        served.cache.close()
        assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
