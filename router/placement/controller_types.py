"""What the placement controller reads (`FleetSource`), how it is set (`ControllerSettings`,
`SpecProvider`), and what it reports (`PlacementDecision`, `ModelPlacement` for ListModels)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from router.contracts import FleetSnapshot
from router.datalayer.collector import GpuMemoryReading, RequestDelta
from router.placement.inputs import ModelSpec

__all__ = [
    "ControllerSettings",
    "FleetSource",
    "ModelPlacement",
    "PlacementDecision",
    "SpecProvider",
]

# (model, footprint bytes) -> how it is placed; None: not placed by the controller.
SpecProvider = Callable[[str, int], ModelSpec | None]


class FleetSource(Protocol):
    """What the controller reads of the data layer; `FleetCollector` is one."""

    def snapshot(self) -> FleetSnapshot: ...

    def take_request_deltas(self) -> list[RequestDelta]: ...

    def gpu_memory(self, instance_id: str) -> GpuMemoryReading | None: ...


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    # An instance not refreshed for this long is not healthy for placement.
    stale_after_s: float = 2.0
    # How far ahead the demand forecast looks.
    forecast_horizon_s: float = 30.0
    # Footprint of a model neither measured nor declared (never seen loaded, or no
    # pointsman.memory_bytes): the policy file should name it (spec_for).
    unknown_footprint_bytes: int = 1 << 30
    # Per-copy capacity when no spec provider is given.
    default_capacity_rps: float = 50.0
    # How long a cold request keeps its model requested while no instance has it ready.
    cold_request_ttl_s: float = 30.0
    poll_interval_s: float = 0.05

    def __post_init__(self) -> None:
        if self.stale_after_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("stale_after_s and poll_interval_s must be > 0")
        if self.unknown_footprint_bytes < 0 or self.cold_request_ttl_s < 0:
            raise ValueError("unknown_footprint_bytes and cold_request_ttl_s must be >= 0")


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    """One decision about a model, as ListModels shows it."""

    model: str
    # "load", "unload", "keep" (copies stay as they are) or "none" (loaded nowhere, no action).
    action: str
    # The instance acted on; "" for keep and none.
    instance_id: str
    reason: str
    # Injected clock, and Unix time in milliseconds.
    decided_at: float
    decided_unix_ms: int


@dataclass(frozen=True, slots=True)
class ModelPlacement:
    """ListModels' placement figures for one model."""

    model: str
    # Copies on healthy instances, loads in progress included (the planner's count).
    copies: int
    target_copies: int
    # Requests per second over the tracker's short window (1 minute by default), and forecast.
    demand_rps: float
    forecast_rps: float
    # The latest decision that acted on the model; else what the latest plan concluded.
    last_decision: PlacementDecision
