"""Where the router learns which Triton instances exist: the swap point for DNS and Kubernetes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.config import InstanceConfig, RouterConfig
from router.discovery_config import DiscoveryKind

__all__ = ["Discovery", "ManagedDiscovery", "StaticDiscovery", "discovery_for"]


class Discovery(Protocol):
    """Returns the instances that exist now; the collector calls it on every refresh round."""

    def instances(self) -> Sequence[InstanceConfig]: ...


class ManagedDiscovery(Discovery, Protocol):
    """A discovery with a background task of its own (a watch, a DNS poll)."""

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...


class StaticDiscovery:
    """A fixed list from the configuration."""

    def __init__(self, instances: Sequence[InstanceConfig]) -> None:
        self._instances = tuple(instances)

    def instances(self) -> Sequence[InstanceConfig]:
        return self._instances

    def start(self) -> None:
        pass

    def stop(self, timeout_s: float = 5.0) -> None:
        pass


def discovery_for(config: RouterConfig) -> ManagedDiscovery:
    """The discovery `config.discovery.kind` names, not yet started."""
    kind = config.discovery.kind
    if kind is DiscoveryKind.KUBERNETES:
        from router.discovery_kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(config.discovery)
    if kind is DiscoveryKind.DNS:
        from router.discovery_dns import DnsDiscovery

        return DnsDiscovery(config.discovery)
    return StaticDiscovery(config.instances)
