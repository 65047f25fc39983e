"""Where the router learns which Triton instances exist: the swap point for DNS and Kubernetes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.config import InstanceConfig

__all__ = ["Discovery", "StaticDiscovery"]


class Discovery(Protocol):
    """Returns the instances that exist now; the collector calls it on every refresh round."""

    def instances(self) -> Sequence[InstanceConfig]: ...


class StaticDiscovery:
    """A fixed list from the configuration."""

    def __init__(self, instances: Sequence[InstanceConfig]) -> None:
        self._instances = tuple(instances)

    def instances(self) -> Sequence[InstanceConfig]:
        return self._instances
