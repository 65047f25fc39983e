"""Synthetic router snapshots for the scale scenarios: no processes, the contracts' own types."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.contracts import InstanceSnapshot, MemorySource, ModelOnInstance

__all__ = ["FOOTPRINT", "synthetic_instance"]

FOOTPRINT = 64 * 1024**2


def synthetic_instance(
    index: int, names: Sequence[str], rng: random.Random, now: float
) -> InstanceSnapshot:
    """Instance `index`, healthy and refreshed at `now`, holding `names` (version 1 ready),
    with random queues, batch sizes and rate, room for two more models in its budget."""
    models = {
        name: ModelOnInstance(
            name=name,
            ready_versions=frozenset({"1"}),
            pending_requests=rng.randrange(0, 8),
            declared_memory_bytes=FOOTPRINT,
            average_batch_size=rng.uniform(1, 8),
        )
        for name in names
    }
    return InstanceSnapshot(
        instance_id=f"triton-{index}",
        grpc_address=f"10.0.{index // 250}.{index % 250}:8001",
        healthy=True,
        refreshed_at=now,
        models=models,
        memory_used_bytes=FOOTPRINT * len(models),
        memory_budget_bytes=FOOTPRINT * (len(models) + 2),
        memory_source=MemorySource.DECLARED,
        inferences_per_second=rng.uniform(0, 500),
        pending_requests=sum(m.pending_requests for m in models.values()),
    )
