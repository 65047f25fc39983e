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
    policy_file: policy.yaml      # scheduling, placement, versions (router/policy.py);
                                  # relative to this file; hot-reloaded when it changes
    tls: {cert_file: server.pem, key_file: server.key}   # pointsman/tls.py; +ca_file and
                                  # require_client_cert: true for mutual TLS
    triton_tls: {ca_file: triton-ca.pem}                  # TLS towards Triton
    admin_token_file: /run/secrets/pointsman-admin  # else $POINTSMAN_ADMIN_TOKEN
    admin_identities: [ops-admin] # client-cert CN/SAN allowed admin RPCs (with mTLS)
    shutdown_grace_s: 5           # SIGTERM: NOT_SERVING, streams end, RPCs get this long

Every error names the field, e.g. "instances[1].grpc: must be host:port".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pointsman.errors import ConfigError
from pointsman.tls import (
    TlsConfig,
    check_calling,
    check_listening,
    resolved_against,
    tls_from_mapping,
)
from router.discovery_config import DiscoveryConfig, DiscoveryKind, parse_discovery_config
from router.election import LeaseSettings

__all__ = ["InstanceConfig", "RouterConfig", "load_router_config", "parse_router_config"]

DEFAULT_LISTEN = "127.0.0.1:8101"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_PLAINTEXT = TlsConfig(where="tls")
_PLAINTEXT_TO_TRITON = TlsConfig(where="triton_tls")


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    instance_id: str
    grpc_address: str
    metrics_url: str = ""
    # Memory the instance may give to models. 0 = unknown (GPU total when GPU metrics exist).
    memory_budget_bytes: int = 0


@dataclass(frozen=True, slots=True)
class RouterConfig:
    instances: tuple[InstanceConfig, ...]
    listen: str = DEFAULT_LISTEN
    refresh_interval_s: float = 0.1
    metrics_interval_s: float = 0.25
    route_ttl_ms: int = 5000
    heartbeat_interval_s: float = 1.0
    # Seed for the picker's random source; None seeds from the OS.
    seed: int | None = None
    # host:port serving Prometheus /metrics; empty = not served. Port 0 binds any free port.
    metrics_listen: str = ""
    # The policy file (router.policy); None = the built-in default policy.
    policy_file: Path | None = None
    # TLS of the listening port and of the channels to Triton (pointsman/tls.py); empty
    # blocks: plaintext.
    tls: TlsConfig = _PLAINTEXT
    triton_tls: TlsConfig = _PLAINTEXT_TO_TRITON
    # Admin RPCs (ReloadPolicy) need `authorization: Bearer <token>` with the token in this
    # file (else in $POINTSMAN_ADMIN_TOKEN), or a verified client certificate whose CN or a
    # SAN is in admin_identities (needs tls.require_client_cert). With neither configured
    # they are accepted only when `listen` is loopback, from this host (pointsman/auth.py).
    admin_token_file: Path | None = None
    admin_identities: tuple[str, ...] = ()
    # Seconds in-flight RPCs get on SIGTERM (WatchRoutes streams end at once).
    shutdown_grace_s: float = 5.0
    # Largest message received or sent, on the listening port and on channels to Triton.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Where instances come from (router/discovery_config.py); static = `instances`.
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    # Whether this replica loads and unloads models. With several replicas over one fleet
    # (active-active), leave it true on exactly one: two placement controllers would each
    # shrink a model by one copy at once (different copies: it can drop to none) and each
    # drain a copy only from their own route tables.
    placement_writer: bool = True
    # With Kubernetes discovery: every replica runs for this Lease (router/election.py) and
    # only its holder places models, so all replicas can keep placement_writer true. None:
    # no election (placement_writer alone decides).
    placement_lease: LeaseSettings | None = None


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str) or ":" not in value or not value.rsplit(":", 1)[1].isdigit():
        raise ConfigError(f"{where}: must be host:port, got {value!r}")
    return value


def _number(data: Mapping[str, Any], key: str, default: float, *, positive: bool = True) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    return float(value)


def _instance(item: Any, where: str) -> InstanceConfig:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = set(item) - {"id", "grpc", "metrics_url", "memory_budget_bytes"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown field")
    instance_id = item.get("id")
    if not isinstance(instance_id, str) or not instance_id:
        raise ConfigError(f"{where}.id: must be a non-empty string")
    metrics_url = item.get("metrics_url", "")
    if not isinstance(metrics_url, str) or (metrics_url and not metrics_url.startswith("http")):
        raise ConfigError(f"{where}.metrics_url: must be an http(s) URL, got {metrics_url!r}")
    budget = item.get("memory_budget_bytes", 0)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"{where}.memory_budget_bytes: must be an integer >= 0, got {budget!r}")
    return InstanceConfig(
        instance_id=instance_id,
        grpc_address=_address(item.get("grpc"), f"{where}.grpc"),
        metrics_url=metrics_url,
        memory_budget_bytes=budget,
    )


_TOP_LEVEL = {
    "listen",
    "instances",
    "refresh_interval_s",
    "metrics_interval_s",
    "route_ttl_ms",
    "heartbeat_interval_s",
    "seed",
    "metrics_listen",
    "policy_file",
    "tls",
    "triton_tls",
    "admin_token_file",
    "admin_identities",
    "placement_writer",
    "shutdown_grace_s",
    "max_message_bytes",
    "discovery",
    "placement_lease",
}


def parse_router_config(data: Mapping[str, Any]) -> RouterConfig:
    """Validates plain data (from YAML or flags) into a RouterConfig."""
    if not isinstance(data, Mapping):
        raise ConfigError("router config: must be a mapping")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown field")
    raw_instances = data.get("instances", [])
    if not isinstance(raw_instances, list):
        raise ConfigError("instances: must be a list")
    instances = tuple(_instance(item, f"instances[{i}]") for i, item in enumerate(raw_instances))
    ids = [inst.instance_id for inst in instances]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        raise ConfigError(f"instances: duplicate id {duplicate!r}")
    metrics_listen = data.get("metrics_listen")
    policy_file = data.get("policy_file")
    if policy_file is not None and (
        not isinstance(policy_file, str | Path) or not str(policy_file)
    ):
        raise ConfigError(f"policy_file: must be a file path, got {policy_file!r}")
    discovery = parse_discovery_config(data.get("discovery"))
    if discovery.kind is not DiscoveryKind.STATIC and instances:
        raise ConfigError(f"instances: must be empty when discovery.kind is {discovery.kind.value}")
    tls = tls_from_mapping(data.get("tls"), "tls")
    check_listening(tls)
    triton_tls = tls_from_mapping(data.get("triton_tls"), "triton_tls")
    check_calling(triton_tls)
    token_file = data.get("admin_token_file")
    if token_file is not None and (not isinstance(token_file, str | Path) or not str(token_file)):
        raise ConfigError(f"admin_token_file: must be a file path, got {token_file!r}")
    identities = data.get("admin_identities", ())
    if isinstance(identities, str):
        identities = [identities]
    if not isinstance(identities, list | tuple) or not all(
        isinstance(i, str) and i for i in identities
    ):
        raise ConfigError(f"admin_identities: must be a list of names, got {identities!r}")
    if identities and not tls.require_client_cert:
        raise ConfigError("admin_identities: needs tls.require_client_cert (verified client certs)")
    shutdown_grace_s = _number(data, "shutdown_grace_s", 5.0, positive=False)
    if shutdown_grace_s < 0:
        raise ConfigError(f"shutdown_grace_s: must be >= 0, got {shutdown_grace_s!r}")
    max_message_bytes = data.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    if (
        isinstance(max_message_bytes, bool)
        or not isinstance(max_message_bytes, int)
        or max_message_bytes <= 0
    ):
        raise ConfigError(f"max_message_bytes: must be an integer > 0, got {max_message_bytes!r}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    placement_writer = data.get("placement_writer", True)
    if not isinstance(placement_writer, bool):
        raise ConfigError(f"placement_writer: must be true or false, got {placement_writer!r}")
    placement_lease = _placement_lease(data.get("placement_lease"), discovery)
    return RouterConfig(
        instances=instances,
        listen=_address(data.get("listen", DEFAULT_LISTEN), "listen"),
        refresh_interval_s=_number(data, "refresh_interval_s", 0.1),
        metrics_interval_s=_number(data, "metrics_interval_s", 0.25),
        route_ttl_ms=int(_number(data, "route_ttl_ms", 5000)),
        heartbeat_interval_s=_number(data, "heartbeat_interval_s", 1.0),
        seed=seed,
        metrics_listen=(
            "" if metrics_listen in (None, "") else _address(metrics_listen, "metrics_listen")
        ),
        policy_file=None if policy_file is None else Path(policy_file),
        tls=tls,
        triton_tls=triton_tls,
        admin_token_file=None if token_file is None else Path(token_file),
        admin_identities=tuple(identities),
        shutdown_grace_s=shutdown_grace_s,
        max_message_bytes=max_message_bytes,
        discovery=discovery,
        placement_writer=placement_writer,
        placement_lease=placement_lease,
    )


_LEASE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _placement_lease(raw: Any, discovery: DiscoveryConfig) -> LeaseSettings | None:
    """`placement_lease: {name, namespace, duration_s, renew_deadline_s, retry_period_s}` (or
    just a name; the namespace defaults to discovery's); it needs Kubernetes discovery, whose
    API server holds the Lease."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"placement_lease: must be a Lease name or a mapping, got {raw!r}")
    fields = ("name", "namespace", "duration_s", "renew_deadline_s", "retry_period_s")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"placement_lease.{unknown[0]}: unknown field")
    if discovery.kind is not DiscoveryKind.KUBERNETES:
        raise ConfigError(
            "placement_lease: needs discovery.kind kubernetes (the Lease's API server)"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not _LEASE_NAME.fullmatch(name):
        raise ConfigError(f"placement_lease.name: must be a Kubernetes object name, got {name!r}")
    namespace = raw.get("namespace", discovery.namespace)
    if not isinstance(namespace, str) or not _LEASE_NAME.fullmatch(namespace):
        raise ConfigError(
            "placement_lease.namespace: a namespace is needed (here or as discovery.namespace), "
            f"got {namespace!r}"
        )
    timing: dict[str, int] = {}
    for key in fields[2:]:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"placement_lease.{key}: must be a whole number of seconds >= 1")
            timing[key] = value
    try:
        return LeaseSettings(name, namespace, **timing)
    except ValueError as exc:
        raise ConfigError(f"placement_lease: {exc}") from None


def load_router_config(path: Path) -> RouterConfig:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    config = parse_router_config(data)
    if config.policy_file is not None and not config.policy_file.is_absolute():
        # As written in the file: relative to the file, not to wherever the router starts.
        config = replace(config, policy_file=path.parent / config.policy_file)
    if config.admin_token_file is not None and not config.admin_token_file.is_absolute():
        config = replace(config, admin_token_file=path.parent / config.admin_token_file)
    return replace(
        config,
        tls=resolved_against(config.tls, path.parent),
        triton_tls=resolved_against(config.triton_tls, path.parent),
    )
