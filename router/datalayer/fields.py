"""Which snapshot fields the data layer fills, collector by collector.

Filters and scorers declare the fields they read (`CONSUMES`, router/contracts.py); a policy
whose plugin reads a field that no running collector fills is refused, at start-up and at a
reload (router/decision.py, `check_inputs`), instead of scoring every instance the same for
ever. A new collector, or a new figure an existing one reads, adds its fields here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from router.config import RouterConfig
from router.contracts import SnapshotField
from router.discovery_config import DiscoveryKind

__all__ = [
    "ALWAYS_FILLED",
    "INDEX_FILLS",
    "METRICS_FILLS",
    "CollectedFields",
    "collected_fields",
    "metrics_off_reason",
]

# InstanceWatcher.refresh_index: the repository index every refresh_interval_s, and the
# config of each ready version (its declared footprint, pointsman.memory_bytes; its batch size,
# instance count, queue bound and sequence batching). Memory used is the GPU figure
# where Triton reports one, else the declared sum; the budget is configured or the GPU total.
INDEX_FILLS: Final = frozenset(
    {
        SnapshotField.HEALTHY,
        SnapshotField.REFRESHED_AT,
        SnapshotField.READY_VERSIONS,
        SnapshotField.LOADING_VERSIONS,
        SnapshotField.DECLARED_MEMORY,
        SnapshotField.MAX_BATCH_SIZE,
        SnapshotField.INSTANCE_COUNT,
        SnapshotField.MAX_QUEUE_SIZE,
        SnapshotField.SEQUENCE_BATCHING,
        SnapshotField.MAX_SEQUENCE_IDLE,
        SnapshotField.MEMORY_USED,
        SnapshotField.MEMORY_BUDGET,
    }
)
# InstanceWatcher.refresh_metrics: Triton's Prometheus page every metrics_interval_s, where an
# instance has a metrics URL. gpu_utilization stays None on a Triton without GPUs.
METRICS_FILLS: Final = frozenset(
    {
        SnapshotField.MODEL_PENDING_REQUESTS,
        SnapshotField.PENDING_REQUESTS,
        SnapshotField.INFERENCES_PER_SECOND,
        SnapshotField.AVERAGE_BATCH_SIZE,
        SnapshotField.GPU_UTILIZATION,
    }
)
# Filled whatever the configuration: the index always runs, and the router counts its own
# picks (router.decision.AssumedLoad).
ALWAYS_FILLED: Final = INDEX_FILLS | {SnapshotField.ASSUMED_INFLIGHT}


@dataclass(frozen=True, slots=True)
class CollectedFields:
    """The fields the running collectors fill, and why each of the others is not filled."""

    filled: frozenset[SnapshotField]
    # Field -> why no running collector fills it, e.g. "metrics scraping is off: ...".
    unfilled_because: Mapping[SnapshotField, str]

    @classmethod
    def everything(cls) -> CollectedFields:
        """Every field filled (benchmarks and tests of scheduling alone)."""
        return cls(frozenset(SnapshotField), {})


def metrics_off_reason(config: RouterConfig) -> str:
    """Why this configuration can scrape no instance's metrics, or "" when it can.

    A static list that names no instance says nothing (instances may come from an injected
    discovery), so only a list whose every instance lacks a metrics URL turns scraping off.
    """
    discovery = config.discovery
    if discovery.kind is DiscoveryKind.KUBERNETES and not discovery.metrics_port_name:
        return "discovery.metrics_port_name is empty"
    if discovery.kind is DiscoveryKind.DNS and not discovery.metrics_port:
        return "discovery.metrics_port is 0"
    listed = config.instances
    if discovery.kind is DiscoveryKind.STATIC and listed and not any(i.metrics_url for i in listed):
        return "no instance in `instances` has a metrics_url"
    return ""


def collected_fields(config: RouterConfig) -> CollectedFields:
    """What the collectors this configuration runs will fill."""
    off = metrics_off_reason(config)
    if not off:
        return CollectedFields(ALWAYS_FILLED | METRICS_FILLS, {})
    reason = f"metrics scraping is off: {off}"
    return CollectedFields(ALWAYS_FILLED, {field: reason for field in METRICS_FILLS})
