"""The `discovery:` block of the router's file: where the router finds Triton instances.

    discovery:
      kind: kubernetes            # static (default: the `instances:` list) | kubernetes | dns
      pool: triton                # label of the autoscaling figures (desired replicas)
      memory_budget_bytes: 0      # given to every discovered instance (0 = GPU total)
      # kind: kubernetes -- EndpointSlices, list + watch
      namespace: pointsman        # "" = every namespace the router may read
      label_selector: app.kubernetes.io/name=triton
      grpc_port_name: grpc        # the Service's port names
      metrics_port_name: metrics  # "" = no metrics scraping
      address_type: IPv4          # IPv4 | IPv6 (dual-stack Services have a slice of each)
      kubeconfig: ""              # "" = in-cluster service account, else ~/.kube/config
      api_server: ""              # overrides the server, e.g. http://127.0.0.1:8001 (kubectl proxy)
      watch_timeout_s: 240        # the server ends each watch after this; the router re-watches
      # kind: dns -- a headless Service
      service: triton.pointsman.svc.cluster.local
      record: srv                 # srv: _<grpc_port_name>._tcp.<service> | a: A records + grpc_port
      grpc_port: 8001             # record a only
      metrics_port: 8002          # 0 = no metrics scraping
      nameserver: ""              # host:port; "" = the system resolver (/etc/resolv.conf)
      interval_s: 5.0             # how often DNS is asked again

Every error names the field, e.g. "discovery.kind: must be one of dns, kubernetes, static".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pointsman.errors import ConfigError

__all__ = ["DiscoveryConfig", "DiscoveryKind", "DnsRecord", "parse_discovery_config"]


class DiscoveryKind(enum.Enum):
    STATIC = "static"
    KUBERNETES = "kubernetes"
    DNS = "dns"


class DnsRecord(enum.Enum):
    SRV = "srv"
    A = "a"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    kind: DiscoveryKind = DiscoveryKind.STATIC
    pool: str = "default"
    memory_budget_bytes: int = 0
    namespace: str = ""
    label_selector: str = ""
    grpc_port_name: str = "grpc"
    metrics_port_name: str = "metrics"
    address_type: str = "IPv4"
    kubeconfig: str = ""
    api_server: str = ""
    watch_timeout_s: int = 240
    service: str = ""
    record: DnsRecord = DnsRecord.SRV
    grpc_port: int = 8001
    metrics_port: int = 8002
    nameserver: str = ""
    interval_s: float = 5.0


_FIELDS = {
    "kind",
    "pool",
    "memory_budget_bytes",
    "namespace",
    "label_selector",
    "grpc_port_name",
    "metrics_port_name",
    "address_type",
    "kubeconfig",
    "api_server",
    "watch_timeout_s",
    "service",
    "record",
    "grpc_port",
    "metrics_port",
    "nameserver",
    "interval_s",
}


def _text(data: Mapping[str, Any], key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"discovery.{key}: must be a string, got {value!r}")
    return value


def _integer(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"discovery.{key}: must be an integer in [{low}, {high}], got {value!r}")
    return value


def _choice(data: Mapping[str, Any], key: str, enum_type: type[enum.Enum], default: str) -> Any:
    value = data.get(key, default)
    choices = sorted(str(member.value) for member in enum_type)
    try:
        return enum_type(value)
    except ValueError:
        raise ConfigError(
            f"discovery.{key}: must be one of {', '.join(choices)}, got {value!r}"
        ) from None


def parse_discovery_config(data: Any) -> DiscoveryConfig:
    """Validates the `discovery:` mapping; None (absent) is the static list."""
    if data is None:
        return DiscoveryConfig()
    if isinstance(data, DiscoveryConfig):  # already parsed (flags merged over a file)
        return data
    if not isinstance(data, Mapping):
        raise ConfigError("discovery: must be a mapping")
    unknown = set(data) - _FIELDS
    if unknown:
        raise ConfigError(f"discovery.{sorted(unknown)[0]}: unknown field")
    kind = _choice(data, "kind", DiscoveryKind, "static")
    interval = data.get("interval_s", 5.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigError(f"discovery.interval_s: must be a number > 0, got {interval!r}")
    address_type = _text(data, "address_type", "IPv4")
    if address_type not in ("IPv4", "IPv6"):
        raise ConfigError(f"discovery.address_type: must be IPv4 or IPv6, got {address_type!r}")
    api_server = _text(data, "api_server", "")
    if api_server and not api_server.startswith(("http://", "https://")):
        raise ConfigError(f"discovery.api_server: must be an http(s) URL, got {api_server!r}")
    nameserver = _text(data, "nameserver", "")
    if nameserver and not nameserver.rpartition(":")[2].isdigit():
        raise ConfigError(f"discovery.nameserver: must be host:port, got {nameserver!r}")
    config = DiscoveryConfig(
        kind=kind,
        pool=_text(data, "pool", "default") or "default",
        memory_budget_bytes=_integer(data, "memory_budget_bytes", 0, 0, 2**62),
        namespace=_text(data, "namespace", ""),
        label_selector=_text(data, "label_selector", ""),
        grpc_port_name=_text(data, "grpc_port_name", "grpc"),
        metrics_port_name=_text(data, "metrics_port_name", "metrics"),
        address_type=address_type,
        kubeconfig=_text(data, "kubeconfig", ""),
        api_server=api_server,
        watch_timeout_s=_integer(data, "watch_timeout_s", 240, 1, 3600),
        service=_text(data, "service", ""),
        record=_choice(data, "record", DnsRecord, "srv"),
        grpc_port=_integer(data, "grpc_port", 8001, 1, 65535),
        metrics_port=_integer(data, "metrics_port", 8002, 0, 65535),
        nameserver=nameserver,
        interval_s=float(interval),
    )
    if kind is DiscoveryKind.KUBERNETES and not config.grpc_port_name:
        raise ConfigError("discovery.grpc_port_name: must name the Service's gRPC port")
    if kind is DiscoveryKind.DNS and not config.service:
        raise ConfigError("discovery.service: required when discovery.kind is dns")
    return config
