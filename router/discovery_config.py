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

Read by the one config reader (pointsman/config/); every error names the field, e.g.
"discovery.kind: must be one of dns, kubernetes, static".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from pointsman.config import host_port, http_url, or_empty, read, rule
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
    # "" reads as "default".
    pool: str = "default"
    memory_budget_bytes: int = field(default=0, metadata=rule(minimum=0, maximum=2**62))
    namespace: str = ""
    label_selector: str = ""
    grpc_port_name: str = "grpc"
    metrics_port_name: str = "metrics"
    address_type: Literal["IPv4", "IPv6"] = "IPv4"
    kubeconfig: str = ""
    api_server: str = field(default="", metadata=rule(check=or_empty(http_url)))
    watch_timeout_s: int = field(default=240, metadata=rule(minimum=1, maximum=3600))
    service: str = ""
    record: DnsRecord = DnsRecord.SRV
    grpc_port: int = field(default=8001, metadata=rule(minimum=1, maximum=65535))
    metrics_port: int = field(default=8002, metadata=rule(minimum=0, maximum=65535))
    nameserver: str = field(default="", metadata=rule(check=or_empty(host_port)))
    interval_s: float = field(default=5.0, metadata=rule(above=0))

    def __post_init__(self) -> None:
        if not self.pool:
            object.__setattr__(self, "pool", "default")
        if self.kind is DiscoveryKind.KUBERNETES and not self.grpc_port_name:
            raise ConfigError("grpc_port_name: must name the Service's gRPC port")
        if self.kind is DiscoveryKind.DNS and not self.service:
            raise ConfigError("service: required when discovery.kind is dns")


def parse_discovery_config(data: Any) -> DiscoveryConfig:
    """Validates the `discovery:` mapping; None (absent) is the static list."""
    return read(DiscoveryConfig, data, "discovery")
