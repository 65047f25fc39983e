"""What the planner is given: instances, model specs, policy, backoffs, all frozen.

Times are seconds on the router's injected clock. Memory is bytes. Every type validates what it
can on its own; the policy file's reader (pointsman/config/) checks each PlacementPolicy field
by its metadata, naming the field, before building one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pointsman.config import rule
from router.demand import DemandSnapshot
from router.placement.actions import Action

__all__ = [
    "InstanceState",
    "LoadBackoff",
    "LoadedModel",
    "ModelSpec",
    "PlacementPolicy",
    "PlanInputs",
]


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One model present (ready or loading) on one instance."""

    name: str
    # Bytes it takes there: measured (GPU memory before and after its load) or declared.
    memory_bytes: int
    # When its load started; the churn guard reads it.
    loaded_at: float
    # When it last served a request there; the LRU order reads it. Use `loaded_at` if never.
    last_used: float

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ValueError(f"model '{self.name}': memory_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One Triton instance as placement sees it."""

    instance_id: str
    # Memory the instance may use for models; 0 means unknown, and the planner never loads
    # onto an instance whose budget it cannot check.
    memory_budget_bytes: int
    # Memory in use as measured (e.g. nv_gpu_memory_used_bytes); 0 when only the models'
    # own bytes are known. The planner counts max(this, sum of the models' bytes).
    memory_used_bytes: int = 0
    models: tuple[LoadedModel, ...] = ()
    # Work the instance is doing now, in any unit used alike across the fleet (the router passes
    # inferences per second); only ratios between instances matter.
    load: float = 0.0
    healthy: bool = True

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"instance '{self.instance_id}': a model is listed twice: {names}")
        if self.memory_budget_bytes < 0 or self.memory_used_bytes < 0:
            raise ValueError(f"instance '{self.instance_id}': memory figures must be >= 0")
        if not (math.isfinite(self.load) and self.load >= 0):
            raise ValueError(f"instance '{self.instance_id}': load must be finite and >= 0")

    def model(self, name: str) -> LoadedModel | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def committed_bytes(self) -> int:
        """max(measured use, sum of the models' bytes): the measurement includes what no model
        declares (runtime, CUDA context), the sum covers a measurement that lags a load."""
        return max(self.memory_used_bytes, sum(m.memory_bytes for m in self.models))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """How one model is placed: its footprint and how many copies demand calls for."""

    name: str
    # Bytes one copy takes: measured when GPU metrics gave a figure, else declared.
    footprint_bytes: int
    # Requests per second one copy serves; demand / this = copies needed.
    per_copy_capacity_rps: float
    min_copies: int = 0
    # None: as many as there are healthy instances.
    max_copies: int | None = None

    def __post_init__(self) -> None:
        if self.footprint_bytes < 0:
            raise ValueError(f"model '{self.name}': footprint_bytes must be >= 0")
        if not (math.isfinite(self.per_copy_capacity_rps) and self.per_copy_capacity_rps > 0):
            raise ValueError(f"model '{self.name}': per_copy_capacity_rps must be > 0")
        if self.min_copies < 0:
            raise ValueError(f"model '{self.name}': min_copies must be >= 0")
        if self.max_copies is not None and self.max_copies < self.min_copies:
            raise ValueError(f"model '{self.name}': max_copies must be >= min_copies")


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """The planner's knobs."""

    # A model with a request this recent keeps at least one copy, and its last copy is never
    # evicted. Keep it within the demand tracker's span, which forgets older requests.
    keep_warm_s: float = field(default=300.0, metadata=rule(minimum=0))
    # Never unload a copy loaded less than this ago: a load costs more than it frees at once.
    churn_guard_s: float = field(default=60.0, metadata=rule(minimum=0))
    # Shrink by one copy at most once per this long, and only after demand stayed below the
    # lower threshold for this long.
    scale_down_cooldown_s: float = field(default=300.0, metadata=rule(minimum=0))
    # Lower threshold: shrink from n copies only when demand <= (n - 1) x capacity x this, so
    # the copies that stay run at most this busy. Growth starts above n x capacity: the gap
    # between the two is the hysteresis band.
    scale_down_utilisation: float = field(default=0.8, metadata=rule(above=0, maximum=1))
    # Instances scoring within this fraction of the best are shortlisted; one is drawn at random.
    shortlist_tolerance: float = field(default=0.1, metadata=rule(minimum=0, maximum=1))
    # Free memory to keep after a load (activations, a load's transient peak). A load may eat
    # into it only when no instance has room for the copy with the buffer intact; evictions
    # come only after that, when no instance has room at all.
    headroom_buffer_bytes: int = field(default=0, metadata=rule(minimum=0))
    # Weights of the placement score: free memory after the load, and low load.
    headroom_weight: float = field(default=1.0, metadata=rule(minimum=0))
    load_weight: float = field(default=1.0, metadata=rule(minimum=0))

    def __post_init__(self) -> None:
        for name in ("keep_warm_s", "churn_guard_s", "scale_down_cooldown_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0")
        if not 0 < self.scale_down_utilisation <= 1:
            raise ValueError("scale_down_utilisation must be in (0, 1]")
        if not 0 <= self.shortlist_tolerance <= 1:
            raise ValueError("shortlist_tolerance must be in [0, 1]")
        if self.headroom_buffer_bytes < 0:
            raise ValueError("headroom_buffer_bytes must be >= 0")
        weights = (self.headroom_weight, self.load_weight)
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) == 0:
            raise ValueError("headroom_weight and load_weight must be >= 0, not both 0")


@dataclass(frozen=True, slots=True)
class LoadBackoff:
    """A load of `model` on `instance_id` failed: do not try that pair again before `until`."""

    model: str
    instance_id: str
    until: float


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """Everything one planning round reads."""

    now: float
    instances: tuple[InstanceState, ...]
    specs: tuple[ModelSpec, ...]
    demand: DemandSnapshot
    # Models a real request asked for while no instance held them (the cold path). Their
    # first copy is loaded ahead of every proactive load.
    requested_while_absent: frozenset[str] = frozenset()
    backoffs: tuple[LoadBackoff, ...] = ()
    # Actions handed to the executor and not finished: a Load counts as a copy (and its
    # footprint as used); an Unload's copy no longer counts, but its memory is not free yet.
    in_progress: tuple[Action, ...] = ()
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)

    def __post_init__(self) -> None:
        ids = [i.instance_id for i in self.instances]
        if len(set(ids)) != len(ids):
            raise ValueError(f"instance ids must be unique: {ids}")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"model specs must be unique by name: {names}")
