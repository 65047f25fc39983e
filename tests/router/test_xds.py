"""The xDS state machine and cache (router/xds/) with a fake RouteBook: versions, nonces,
ACK and NACK, unknown names and types, malformed requests, pushes on route changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from pointsman.errors import InvalidRequestError
from router.routes import ModelRoutes, RouteEntry
from router.xds.cache import XdsCache
from router.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    XdsSettings,
)
from router.xds.stream import MAX_NAMES, AdsStream, RequestKind
from tests.support.fakes import FakeRouteBook

pytestmark = pytest.mark.asyncio


def table(model: str, **weights: float) -> ModelRoutes:
    entries = tuple(
        RouteEntry(instance, f"10.0.0.{i + 1}:8001", ("1",), weight)
        for i, (instance, weight) in enumerate(sorted(weights.items()))
    )
    return ModelRoutes(model_name=model, candidates=entries, default_version="1", generation=1)


def request(
    type_url: str,
    names: tuple[str, ...] = (),
    *,
    version: str = "",
    nonce: str = "",
    error: str = "",
) -> Any:
    message = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
    )
    if error:
        message.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return message


def ack(response: Any, names: tuple[str, ...]) -> Any:
    return request(response.type_url, names, version=response.version_info, nonce=response.nonce)


def unpack(response: Any, message_class: type[Any]) -> list[Any]:
    out = []
    for packed in response.resources:
        message = message_class()
        assert packed.Unpack(message)
        out.append(message)
    return out


def weights(response: Any) -> dict[str, int]:
    (assignment,) = unpack(response, endpoint_pb2.ClusterLoadAssignment)
    return {
        locality.locality.sub_zone: locality.load_balancing_weight.value
        for locality in assignment.endpoints
    }


def attached(book: FakeRouteBook) -> tuple[XdsCache, list[int]]:
    """A cache following `book` for one stream, and the count of its wake-ups."""
    cache = XdsCache(book)
    woken = [0]

    def wake() -> None:
        woken[0] += 1

    cache.attach(wake)
    return cache, woken


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_listener_names_the_model_and_routes_to_its_cluster_with_retries() -> None:
    cache, _ = attached(FakeRouteBook(table("codegen", a=1.0, b=0.5)))
    stream = AdsStream(cache)
    kind, (response,) = stream.on_request(request(LISTENER_TYPE, ("codegen",)))
    assert kind is RequestKind.SUBSCRIBE
    assert response.type_url == LISTENER_TYPE and response.nonce and response.version_info
    (listener,) = unpack(response, listener_pb2.Listener)
    assert listener.name == "codegen"
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    (route,) = manager.route_config.virtual_hosts[0].routes
    assert route.route.cluster == "codegen"
    assert route.route.retry_policy.retry_on == "unavailable"
    assert route.route.retry_policy.num_retries.value == XdsSettings().retries
    assert manager.http_filters[-1].typed_config.type_url.endswith("filters.http.router.v3.Router")

    _, (response,) = stream.on_request(request(CLUSTER_TYPE, ("codegen",)))
    (cluster,) = unpack(response, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.EDS and cluster.eds_cluster_config.eds_config.ads
    assert cluster.outlier_detection.enforcing_failure_percentage.value == 100

    _, (response,) = stream.on_request(request(ENDPOINT_TYPE, ("codegen",)))
    assert weights(response) == {"a": 100, "b": 50}
    (assignment,) = unpack(response, endpoint_pb2.ClusterLoadAssignment)
    address = assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("10.0.0.1", 8001)


async def test_ack_gets_no_answer_and_nack_storm_gets_none_either() -> None:
    cache, _ = attached(FakeRouteBook(table("codegen", a=1.0)))
    stream = AdsStream(cache)
    _, (response,) = stream.on_request(request(ENDPOINT_TYPE, ("codegen",)))
    assert stream.on_request(ack(response, ("codegen",))) == (RequestKind.ACK, [])
    assert stream.acked_version(ENDPOINT_TYPE) == response.version_info
    nack = request(
        ENDPOINT_TYPE, ("codegen",), version="", nonce=response.nonce, error="weights refused"
    )
    for _ in range(10_000):  # the same refusal, over and over: never answered, never resent
        assert stream.on_request(nack) == (RequestKind.NACK, [])
    assert stream.last_nack(ENDPOINT_TYPE) == "weights refused"
    assert stream.acked_version(ENDPOINT_TYPE) == response.version_info


async def test_a_stale_nonce_is_ignored_even_with_other_names() -> None:
    cache, _ = attached(FakeRouteBook(table("codegen", a=1.0), table("echo", b=1.0)))
    stream = AdsStream(cache)
    _, (first,) = stream.on_request(request(LISTENER_TYPE, ("codegen",)))
    _, (second,) = stream.on_request(request(LISTENER_TYPE, ("codegen", "echo")))
    assert second.nonce != first.nonce
    assert [li.name for li in unpack(second, listener_pb2.Listener)] == ["codegen", "echo"]
    # The client answers the first response after we sent the second: stale, no effect.
    assert stream.on_request(ack(first, ("codegen",))) == (RequestKind.STALE, [])
    assert stream.on_request(ack(second, ("codegen", "echo"))) == (RequestKind.ACK, [])


async def test_unknown_names_and_types_get_empty_answers() -> None:
    cache, _ = attached(FakeRouteBook(table("codegen", a=1.0)))
    stream = AdsStream(cache)
    for type_url in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE):
        kind, (response,) = stream.on_request(request(type_url, ("nosuchmodel",)))
        assert kind is RequestKind.SUBSCRIBE and list(response.resources) == []
        assert response.nonce
    other = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    _, (response,) = stream.on_request(request(other, ("x",)))
    assert response.type_url == other and list(response.resources) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (discovery_pb2.DiscoveryRequest(resource_names=["codegen"]), "type_url is required"),
        (
            discovery_pb2.DiscoveryRequest(
                type_url=LISTENER_TYPE, resource_names=[str(i) for i in range(MAX_NAMES + 1)]
            ),
            "resource names in one request",
        ),
    ],
)
async def test_malformed_requests_are_invalid_argument(bad: Any, message: str) -> None:
    cache, _ = attached(FakeRouteBook(table("codegen", a=1.0)))
    with pytest.raises(InvalidRequestError, match=message):
        AdsStream(cache).on_request(bad)


async def test_too_many_types_on_one_stream_are_refused() -> None:
    cache, _ = attached(FakeRouteBook())
    stream = AdsStream(cache)
    with pytest.raises(InvalidRequestError, match="resource types"):
        for i in range(100):
            stream.on_request(request(f"type.googleapis.com/x.T{i}"))


async def test_a_weight_change_pushes_the_load_assignment_alone_with_a_new_version() -> None:
    book = FakeRouteBook(table("codegen", a=1.0, b=1.0))
    cache, woken = attached(book)
    stream = AdsStream(cache)
    sent = {}
    for type_url in (LISTENER_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE):
        _, (sent[type_url],) = stream.on_request(request(type_url, ("codegen",)))
        stream.on_request(ack(sent[type_url], ("codegen",)))
    book.publish(table("codegen", a=1.0, b=0.25))
    await settle()
    assert woken[0] == 1
    (pushed,) = stream.on_change()
    assert pushed.type_url == ENDPOINT_TYPE
    assert weights(pushed) == {"a": 100, "b": 25}
    assert int(pushed.version_info) > int(sent[ENDPOINT_TYPE].version_info)
    assert pushed.nonce not in {r.nonce for r in sent.values()}
    assert cache.version(LISTENER_TYPE) == sent[LISTENER_TYPE].version_info
    # The same table again changes nothing: no wake-up, nothing to send.
    book.publish(table("codegen", a=1.0, b=0.25))
    await settle()
    assert woken[0] == 1 and stream.on_change() == []


async def test_a_removed_model_leaves_the_listeners_and_an_instance_leaves_the_assignment() -> None:
    book = FakeRouteBook(table("codegen", a=1.0, b=1.0), table("echo", a=1.0))
    cache, _ = attached(book)
    stream = AdsStream(cache)
    _, (listeners,) = stream.on_request(request(LISTENER_TYPE))  # wildcard
    assert sorted(li.name for li in unpack(listeners, listener_pb2.Listener)) == [
        "codegen",
        "echo",
    ]
    _, _ = stream.on_request(request(ENDPOINT_TYPE, ("codegen",)))
    book.publish(table("codegen", a=1.0), removed=("echo",))
    await settle()
    pushed = {r.type_url: r for r in stream.on_change()}
    assert [li.name for li in unpack(pushed[LISTENER_TYPE], listener_pb2.Listener)] == ["codegen"]
    assert weights(pushed[ENDPOINT_TYPE]) == {"a": 100}


async def test_the_cache_follows_the_book_only_while_a_stream_is_attached() -> None:
    book = FakeRouteBook(table("codegen", a=1.0))
    cache = XdsCache(book)
    assert not book.queues and not cache.resources(LISTENER_TYPE)

    def wake() -> None:
        pass

    cache.attach(wake)
    assert len(book.queues) == 1 and set(cache.resources(LISTENER_TYPE)) == {"codegen"}
    cache.detach(wake)
    await settle()
    assert not book.queues
    # Changes while nobody follows are not missed: the next stream starts afresh.
    book.publish(table("echo", a=1.0), removed=("codegen",))
    cache.attach(wake)
    assert set(cache.resources(LISTENER_TYPE)) == {"echo"}
    cache.close()
    assert cache.closed


async def test_instances_named_by_host_are_resolved_before_they_are_published() -> None:
    entries = (
        RouteEntry("a", "triton-a.example:8001", ("1",), 1.0),
        RouteEntry("b", "10.0.0.2:8001", ("1",), 0.5),
        RouteEntry("c", "nowhere.example:8001", ("1",), 1.0),
    )
    book = FakeRouteBook(ModelRoutes("codegen", entries, "1", 1))
    names = {"triton-a.example": "10.0.0.1"}
    cache = XdsCache(book, resolve=names.get)
    woken = asyncio.Event()
    cache.attach(woken.set)
    stream = AdsStream(cache)
    _, (first,) = stream.on_request(request(ENDPOINT_TYPE, ("codegen",)))
    assert weights(first) == {"b": 50}  # names not resolved yet are left out
    await asyncio.wait_for(woken.wait(), 5)
    (pushed,) = stream.on_change()
    assert weights(pushed) == {"a": 100, "b": 50}
    cache.close()
