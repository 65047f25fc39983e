"""The xDS resources of one model, built from its route table (pure functions, no I/O).

A gRPC client on `xds:///MODEL` asks for the Listener named MODEL (gRFC A27). Each model gets:

    Listener MODEL -- ApiListener: HttpConnectionManager, RouteConfiguration inline
        VirtualHost "*" -- Route prefix "" -> cluster MODEL, retry on UNAVAILABLE (A44)
    Cluster MODEL -- EDS over ADS, ROUND_ROBIN, outlier detection (A50)
    ClusterLoadAssignment MODEL -- one locality per instance, weight = route weight

Weights ride on localities because that is what gRPC's xDS client honours: with the default
policy (`xds_wrr_locality` over `round_robin`) localities are picked by weight (A27, A52)
and endpoints within one round robin, while an endpoint's own `load_balancing_weight` is
ignored ("always ignored" in gRPC's xds_features.md, except by ring_hash, A42). One instance
per locality makes each instance's share its route weight over the sum.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from router.routes import ModelRoutes, RouteEntry

__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "LISTENER_TYPE",
    "RESOURCE_TYPES",
    "ROUTE_TYPE",
    "UPSTREAM_CERTIFICATES",
    "XdsSettings",
    "endpoint_weight",
    "model_resources",
]

_PREFIX = "type.googleapis.com/"
LISTENER_TYPE = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE_TYPE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
# The four types a gRPC client asks for; routes travel inside the listeners (no RDS).
RESOURCE_TYPES = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)

# The certificate provider instance (in the client's bootstrap) that Clusters with upstream
# TLS name for the CA that verifies Triton and, for mutual TLS, the client's own identity.
UPSTREAM_CERTIFICATES = "pointsman-triton"
# Locality weights are integers: a route weight (0.05 .. 1.0, steps of 0.05) times this.
_WEIGHT_SCALE = 100


@dataclass(frozen=True, slots=True)
class XdsSettings:
    """What the client does beyond picking by weight: retries and outlier ejection."""

    # Attempts after the first on UNAVAILABLE (0 = no retry policy). gRPC caps it at 4.
    retries: int = 2
    retry_base_interval_s: float = 0.025
    retry_max_interval_s: float = 0.25
    # Outlier detection (A50, failure percentage only: success-rate statistics need more
    # instances than a model usually has). An instance whose share of failed calls is at or
    # over `eject_failure_percent`, with at least `eject_min_requests` calls in an interval,
    # is ejected for `eject_base_s` (times the number of ejections so far).
    outlier_detection: bool = True
    eject_interval_s: float = 1.0
    eject_base_s: float = 10.0
    eject_failure_percent: int = 50
    eject_min_requests: int = 10
    eject_max_percent: int = 50
    # TLS towards Triton (the router's triton_tls): Clusters carry an UpstreamTlsContext whose
    # certificates come from the client's bootstrap (UPSTREAM_CERTIFICATES, gRFC A29), used
    # by clients whose channel has xDS credentials (grpc.xds_channel_credentials).
    upstream_tls: bool = False
    upstream_identity: bool = False  # also present a client certificate (mutual TLS)


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def endpoint_weight(entry: RouteEntry) -> int:
    """The locality weight of an instance: its route weight in hundredths, at least 1."""
    return max(1, round(entry.weight * _WEIGHT_SCALE))


def _socket_address(grpc_address: str) -> address_pb2.SocketAddress | None:
    """host:port, or [v6]:port, as a SocketAddress; None when the host is not an IP literal
    (gRPC's EDS takes IP addresses only: the caller resolves names first)."""
    host, _, port = grpc_address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        port_value = int(port)
    except ValueError:
        return None
    if not 0 < port_value < 65536:
        return None
    return address_pb2.SocketAddress(address=host, port_value=port_value)


def _retry_policy(settings: XdsSettings) -> Any:
    return route_components_pb2.RetryPolicy(
        retry_on="unavailable",
        num_retries=wrappers_pb2.UInt32Value(value=settings.retries),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_duration(settings.retry_base_interval_s),
            max_interval=_duration(settings.retry_max_interval_s),
        ),
    )


def _route_configuration(model: str, settings: XdsSettings) -> Any:
    action = route_components_pb2.RouteAction(cluster=model)
    if settings.retries > 0:
        action.retry_policy.CopyFrom(_retry_policy(settings))
    return route_pb2.RouteConfiguration(
        name=model,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=model,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=""), route=action
                    )
                ],
            )
        ],
    )


def _listener(model: str, settings: XdsSettings) -> Any:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=model,
        route_config=_route_configuration(model, settings),
        # gRPC wants the router filter, last (A39).
        http_filters=[hcm_pb2.HttpFilter(name="router", typed_config=_packed(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=model, api_listener=api_listener_pb2.ApiListener(api_listener=_packed(manager))
    )


def _outlier_detection(settings: XdsSettings) -> Any:
    return outlier_detection_pb2.OutlierDetection(
        interval=_duration(settings.eject_interval_s),
        base_ejection_time=_duration(settings.eject_base_s),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=settings.eject_max_percent),
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
        failure_percentage_threshold=wrappers_pb2.UInt32Value(value=settings.eject_failure_percent),
        enforcing_failure_percentage=wrappers_pb2.UInt32Value(value=100),
        failure_percentage_minimum_hosts=wrappers_pb2.UInt32Value(value=1),
        failure_percentage_request_volume=wrappers_pb2.UInt32Value(
            value=settings.eject_min_requests
        ),
    )


def _upstream_tls(settings: XdsSettings) -> Any:
    provider = common_pb2.CertificateProviderPluginInstance(instance_name=UPSTREAM_CERTIFICATES)
    context = tls_pb2.CommonTlsContext(
        validation_context=common_pb2.CertificateValidationContext(
            ca_certificate_provider_instance=provider
        )
    )
    if settings.upstream_identity:
        context.tls_certificate_provider_instance.CopyFrom(provider)
    return tls_pb2.UpstreamTlsContext(common_tls_context=context)


def _cluster(model: str, settings: XdsSettings) -> Any:
    cluster = cluster_pb2.Cluster(
        name=model,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            )
        ),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if settings.outlier_detection:
        cluster.outlier_detection.CopyFrom(_outlier_detection(settings))
    if settings.upstream_tls:
        cluster.transport_socket.name = "envoy.transport_sockets.tls"
        cluster.transport_socket.typed_config.Pack(_upstream_tls(settings))
    return cluster


def _load_assignment(table: ModelRoutes, addresses: dict[str, str]) -> Any:
    localities = []
    for entry in table.candidates:
        socket_address = _socket_address(addresses.get(entry.grpc_address, entry.grpc_address))
        if socket_address is None:
            continue  # a name nobody resolved: better absent than a NACK of every cluster
        weight = endpoint_weight(entry)
        localities.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="pointsman", sub_zone=entry.instance_id),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(socket_address=socket_address)
                        ),
                        health_status=health_check_pb2.HEALTHY,
                    )
                ],
                load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
                priority=0,
            )
        )
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=table.model_name, endpoints=localities)


def model_resources(
    table: ModelRoutes, settings: XdsSettings, addresses: dict[str, str] | None = None
) -> dict[str, any_pb2.Any]:
    """The model's resources by type URL. `addresses` maps an instance's gRPC address to
    host:port with the host resolved, for instances that Discovery names by host name."""
    model = table.model_name
    return {
        LISTENER_TYPE: _packed(_listener(model, settings)),
        CLUSTER_TYPE: _packed(_cluster(model, settings)),
        ENDPOINT_TYPE: _packed(_load_assignment(table, addresses or {})),
    }
