"""Baseline `everything-everywhere`: identical replicas, per-request round robin.

What a Kubernetes Service with a gRPC-aware balancer (Envoy, Linkerd, a gRPC client-side
round-robin policy) gives over Tritons that all serve the same model repository: every
instance loads every model that fits in its budget, and requests go round robin over the
instances, whatever the model. When the budget holds every model (an unconstrained testbed)
this is the natural, strong choice. When it does not, identical replicas can only hold the
same K models: they load the K most popular by expectation, and a request for any other model
fails with Triton's own error (counted by status, as for every system).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from bench.baselines.client_side import ClientSideDeployment, SendTo, started
from bench.loadgen import Responses
from bench.testbed import Testbed, TritonGroup, popularity_order

__all__ = ["EverythingEverywhere", "RoundRobin", "replica_models"]


def replica_models(bed: Testbed) -> list[str]:
    """What every replica loads: the most popular models that fit in one budget."""
    return popularity_order(bed)[: bed.slots_per_instance]


class RoundRobin:
    """Per-request round robin over every instance."""

    def __init__(self, addresses: list[str]) -> None:
        self._next = itertools.cycle(addresses)

    async def send(self, model: str, send_to: SendTo) -> Responses:
        return await send_to(next(self._next))()

    def delayed_requests(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class EverythingEverywhere:
    name: str = "everything-everywhere"
    description: str = (
        "every model that fits loaded on every instance; per-request round robin "
        "(a gRPC client-side balancer, Envoy, Linkerd)"
    )

    def start(self, bed: Testbed, workdir: Path) -> ClientSideDeployment:
        models = replica_models(bed)
        group = TritonGroup(bed, workdir, [models] * bed.instances, prefix="ee")
        return started(self.name, group, RoundRobin(group.addresses))
