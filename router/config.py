"""Typed, frozen configuration of the router, parsed and validated once.

A file looks like:

    listen: 127.0.0.1:8101
    metrics_listen: 127.0.0.1:9101  # Prometheus /metrics; absent = not served; port 0 = any
    refresh_interval_s: 0.1       # repository index and readiness, per instance
    metrics_interval_s: 0.25      # Prometheus metrics, per instance
    route_ttl_ms: 5000
    instances:
      - id: triton-0
        grpc: 127.0.0.1:8001
        metrics_url: http://127.0.0.1:8002/metrics
        memory_budget_bytes: 2147483648
    policy_file: policy.yaml      # scheduling, placement, versions (router/policy/);
                                  # relative to this file; hot-reloaded when it changes
    tls: {cert_file: server.pem, key_file: server.key}   # pointsman/tls.py; +ca_file and
                                  # require_client_cert: true for mutual TLS
    triton_tls: {ca_file: triton-ca.pem}                  # TLS towards Triton
    admin_token_file: /run/secrets/pointsman-admin  # else $POINTSMAN_ADMIN_TOKEN
    admin_identities: [ops-admin] # client-cert CN/SAN allowed admin RPCs (with mTLS)
    shutdown_grace_s: 5           # SIGTERM: NOT_SERVING, streams end, RPCs get this long

Read by the one config reader (pointsman/config/): duplicate keys are refused, and every
error names the field, e.g. "instances[1].grpc: must be host:port". Command-line flags are
laid over the file's data before it is read (router/main.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pointsman.config import host_port, http_url, non_empty, or_empty, read, relative_files, rule
from pointsman.config import load_yaml_file as _load_yaml_file
from pointsman.errors import ConfigError
from pointsman.tls import TlsConfig, check_calling, check_listening, tls_from_mapping
from router.discovery_config import DiscoveryConfig, DiscoveryKind
from router.election import LeaseSettings

__all__ = [
    "InstanceConfig",
    "RouterConfig",
    "load_router_config",
    "parse_router_config",
    "router_config_data",
]

DEFAULT_LISTEN = "127.0.0.1:8101"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_PLAINTEXT = TlsConfig(where="tls")
_PLAINTEXT_TO_TRITON = TlsConfig(where="triton_tls")


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    instance_id: str = field(metadata=rule(key="id", check=non_empty))
    grpc_address: str = field(metadata=rule(key="grpc", check=host_port))
    metrics_url: str = field(default="", metadata=rule(check=or_empty(http_url)))
    # Memory the instance may give to models. 0 = unknown (GPU total when GPU metrics exist).
    memory_budget_bytes: int = field(default=0, metadata=rule(minimum=0))


def _placement_lease(value: Any, where: str) -> LeaseSettings:
    """`placement_lease: NAME` or `{name, namespace, duration_s, renew_deadline_s,
    retry_period_s}`; the namespace defaults to discovery's (RouterConfig fills it in)."""
    return read(LeaseSettings, {"name": value} if isinstance(value, str) else value, where)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    instances: tuple[InstanceConfig, ...] = ()
    listen: str = field(default=DEFAULT_LISTEN, metadata=rule(check=host_port))
    refresh_interval_s: float = field(default=0.1, metadata=rule(above=0))
    metrics_interval_s: float = field(default=0.25, metadata=rule(above=0))
    # Sent to sidecars as a route table's ttl_ms, a uint32.
    route_ttl_ms: int = field(default=5000, metadata=rule(above=0, maximum=2**32 - 1))
    heartbeat_interval_s: float = field(default=1.0, metadata=rule(above=0))
    # Seed for the picker's random source; None seeds from the OS.
    seed: int | None = None
    # host:port serving Prometheus /metrics; empty = not served. Port 0 binds any free port.
    metrics_listen: str = field(default="", metadata=rule(check=or_empty(host_port)))
    # The policy file (router.policy); None = the built-in default policy.
    policy_file: Path | None = None
    # TLS of the listening port and of the channels to Triton (pointsman/tls.py); empty
    # blocks: plaintext.
    tls: TlsConfig = field(default=_PLAINTEXT, metadata=rule(parse=tls_from_mapping))
    triton_tls: TlsConfig = field(
        default=_PLAINTEXT_TO_TRITON, metadata=rule(parse=tls_from_mapping)
    )
    # Admin RPCs (ReloadPolicy) need `authorization: Bearer <token>` with the token in this
    # file (else in $POINTSMAN_ADMIN_TOKEN), or a verified client certificate whose CN or a
    # SAN is in admin_identities (needs tls.require_client_cert). With neither configured
    # they are accepted only when `listen` is loopback, from this host (pointsman/auth.py).
    admin_token_file: Path | None = None
    admin_identities: tuple[str, ...] = field(default=(), metadata=rule(check=non_empty))
    # Seconds in-flight RPCs get on SIGTERM (WatchRoutes streams end at once).
    shutdown_grace_s: float = field(default=5.0, metadata=rule(minimum=0))
    # Largest message received or sent, on the listening port and on channels to Triton.
    max_message_bytes: int = field(default=DEFAULT_MAX_MESSAGE_BYTES, metadata=rule(above=0))
    # Where instances come from (router/discovery_config.py); static = `instances`.
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    # Whether this replica loads and unloads models. With several replicas over one fleet
    # (active-active), leave it true on exactly one: two placement controllers would each
    # shrink a model by one copy at once (different copies: it can drop to none) and each
    # drain a copy only from their own route tables.
    placement_writer: bool = True
    # With Kubernetes discovery: every replica runs for this Lease (router/election.py) and
    # only its holder places models, so all replicas can keep placement_writer true. None:
    # no election (placement_writer alone decides). A name alone is a Lease in discovery's
    # namespace.
    placement_lease: LeaseSettings | None = field(
        default=None, metadata=rule(parse=_placement_lease)
    )

    def __post_init__(self) -> None:
        """The rules across fields; each field's own were checked when it was read."""
        ids = [instance.instance_id for instance in self.instances]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate:
            raise ConfigError(f"instances: duplicate id {duplicate!r}")
        kind = self.discovery.kind
        if kind is not DiscoveryKind.STATIC and self.instances:
            raise ConfigError(f"instances: must be empty when discovery.kind is {kind.value}")
        check_listening(self.tls)
        check_calling(self.triton_tls)
        if self.admin_identities and not self.tls.require_client_cert:
            raise ConfigError(
                "admin_identities: needs tls.require_client_cert (verified client certs)"
            )
        lease = self.placement_lease
        if lease is not None:
            if kind is not DiscoveryKind.KUBERNETES:
                raise ConfigError(
                    "placement_lease: needs discovery.kind kubernetes (the Lease's API server)"
                )
            if not lease.namespace:
                if not self.discovery.namespace:
                    raise ConfigError(
                        "placement_lease.namespace: a namespace is needed (here or as "
                        "discovery.namespace)"
                    )
                lease = dataclasses.replace(lease, namespace=self.discovery.namespace)
                object.__setattr__(self, "placement_lease", lease)


def parse_router_config(data: Mapping[str, Any] | Any) -> RouterConfig:
    """Validates plain data (from YAML, with flags laid over it) into a RouterConfig."""
    return read(RouterConfig, data, root="router config")


def router_config_data(path: Path) -> Any:
    """The plain data of the file at `path`, with the file paths it names (policy, token,
    certificates) taken relative to the file, not to wherever the router starts."""
    return relative_files(RouterConfig, _load_yaml_file(path), path.parent)


def load_router_config(path: Path) -> RouterConfig:
    return parse_router_config(router_config_data(path))
