"""Contracts of the router: immutable views of the fleet and the plugin protocols.

The data layer produces `FleetSnapshot`s; scheduling reads them and never does I/O.
A scheduling cycle is: filters narrow the candidates, each scorer scores all remaining
candidates at once in [0, 1] (1 is best), the engine weights and sums, a picker chooses
(router/decision.py runs it). Filters and scorers declare the snapshot fields they read
(`CONSUMES`, a set of `SnapshotField`); the data layer declares which fields its collectors
fill (router/datalayer/fields.py), so a plugin over a field nobody fills is refused at start.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = [
    "Candidate",
    "Filter",
    "FleetSnapshot",
    "InstanceSnapshot",
    "MemorySource",
    "ModelFacts",
    "ModelOnInstance",
    "Picker",
    "PluginFactory",
    "RoutingRequest",
    "SchedulingCycle",
    "ScoredCandidate",
    "Scorer",
    "SnapshotField",
]


class MemorySource(enum.Enum):
    """Where an instance's memory use comes from."""

    UNKNOWN = "unknown"
    GPU_METRICS = "gpu_metrics"  # nv_gpu_memory_used_bytes
    DECLARED = "declared"  # sum of loaded models' declared footprints


class SnapshotField(enum.StrEnum):
    """A field of the snapshot that a plugin may read, named by where it lives.

    `instance.*` is an `InstanceSnapshot` attribute, `model.*` a `ModelOnInstance` attribute of
    the requested model, `candidate.*` a `Candidate` attribute (the router's own bookkeeping).
    """

    HEALTHY = "instance.healthy"
    REFRESHED_AT = "instance.refreshed_at"
    MEMORY_USED = "instance.memory_used_bytes"
    MEMORY_BUDGET = "instance.memory_budget_bytes"
    INFERENCES_PER_SECOND = "instance.inferences_per_second"
    PENDING_REQUESTS = "instance.pending_requests"
    GPU_UTILIZATION = "instance.gpu_utilization"
    READY_VERSIONS = "model.ready_versions"
    LOADING_VERSIONS = "model.loading_versions"
    MODEL_PENDING_REQUESTS = "model.pending_requests"
    DECLARED_MEMORY = "model.declared_memory_bytes"
    AVERAGE_BATCH_SIZE = "model.average_batch_size"
    MAX_BATCH_SIZE = "model.max_batch_size"
    INSTANCE_COUNT = "model.instance_count"
    MAX_QUEUE_SIZE = "model.max_queue_size"
    SEQUENCE_BATCHING = "model.sequence_batching"
    MAX_SEQUENCE_IDLE = "model.max_sequence_idle_s"
    ASSUMED_INFLIGHT = "candidate.assumed_inflight"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFacts:
    """What a model's config says, as far as routing and placement need it: read once per
    ready version (router/datalayer/model_config.py; several versions ready on one instance:
    the smallest capacity among them)."""

    # Declared footprint, bytes (config parameter pointsman.memory_bytes; of all ready versions).
    declared_memory_bytes: int = 0
    # 0: the model does not batch (each request is one execution).
    max_batch_size: int = 0
    # Model instances Triton runs; 0: not known (no config read yet).
    instance_count: int = 0
    # The dynamic batcher's queue bound (default_queue_policy.max_queue_size); 0: unbounded.
    max_queue_size: int = 0
    sequence_batching: bool = False
    # How long Triton keeps an idle sequence (max_sequence_idle_microseconds), seconds.
    max_sequence_idle_s: float = 0.0

    @property
    def concurrency(self) -> int:
        """Requests the model executes at once: max_batch_size x instance count, at least the
        instance count (a model that does not batch runs one request per instance); 0 when
        the instance count is not known."""
        return max(self.instance_count, self.max_batch_size * self.instance_count)


@dataclass(frozen=True, slots=True)
class ModelOnInstance(ModelFacts):
    """One model on one instance, all versions together (its config's facts: `ModelFacts`,
    keyword-only)."""

    name: str
    ready_versions: frozenset[str] = frozenset()
    loading_versions: frozenset[str] = frozenset()
    # Requests of this model queued inside Triton (nv_inference_pending_request_count).
    pending_requests: int = 0
    # Inferences per model execution over the recent window (nv_inference_count delta over
    # nv_inference_exec_count delta): how well Triton's batcher is batching. 0 = no executions.
    average_batch_size: float = 0.0

    @property
    def is_ready(self) -> bool:
        return bool(self.ready_versions)

    @property
    def is_loading(self) -> bool:
        return bool(self.loading_versions)

    def serves(self, version: str) -> bool:
        """True if `version` is ready here; an empty version means any ready version."""
        return bool(self.ready_versions) if not version else version in self.ready_versions


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """The router's view of one Triton instance at one refresh."""

    instance_id: str
    grpc_address: str
    metrics_url: str = ""
    healthy: bool = False
    # Clock time (seconds, the injected clock) of the last successful refresh; 0 = never.
    refreshed_at: float = 0.0
    # Models by name that have some version ready or loading here.
    models: Mapping[str, ModelOnInstance] = field(default_factory=dict)
    memory_used_bytes: int = 0
    memory_budget_bytes: int = 0
    memory_source: MemorySource = MemorySource.UNKNOWN
    # Inferences per second over the recent window, all models.
    inferences_per_second: float = 0.0
    # Requests queued in Triton across all models.
    pending_requests: int = 0
    # GPU utilisation in [0, 1] when Triton reports nv_gpu_utilization, else None.
    gpu_utilization: float | None = None
    last_error: str = ""

    def model(self, name: str) -> ModelOnInstance | None:
        return self.models.get(name)

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_budget_bytes - self.memory_used_bytes)


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Every instance at one moment, plus every model any repository index lists."""

    taken_at: float
    instances: tuple[InstanceSnapshot, ...] = ()
    # Models present in some instance's model repository, loaded or not.
    known_models: frozenset[str] = frozenset()
    # model -> the instances listing it (ready or loading), in `instances` order; built once
    # per snapshot so a decision on a large fleet starts from a model's holders, not them all.
    _holders: Mapping[str, tuple[InstanceSnapshot, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        holders: dict[str, list[InstanceSnapshot]] = {}
        for inst in self.instances:
            for name in inst.models:
                holders.setdefault(name, []).append(inst)
        object.__setattr__(self, "_holders", {k: tuple(v) for k, v in holders.items()})

    def holders(self, model_name: str) -> tuple[InstanceSnapshot, ...]:
        """The instances where `model_name` is ready or loading."""
        return self._holders.get(model_name, ())

    def instance(self, instance_id: str) -> InstanceSnapshot | None:
        for inst in self.instances:
            if inst.instance_id == instance_id:
                return inst
        return None


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """What scheduling knows of a request: the model, a pinned version, routing headers, and
    a key for affinity plugins.

    `headers` are lower-cased gRPC metadata (version rules read them; a session-affinity plugin
    would read its header here). `affinity_key` is a value computed from the request for
    plugins that send alike requests to one instance, e.g. a hash of the prompt's prefix; ""
    when the request carries none.
    """

    model_name: str
    # "" = any ready version (decide() fills in the version an unpinned request gets).
    model_version: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    affinity_key: str = ""


@dataclass(frozen=True, slots=True)
class Candidate:
    """An instance considered for a request, with load the router knows Triton has not shown yet."""

    instance: InstanceSnapshot
    # Requests the router routed here for this model since the instance was last refreshed.
    assumed_inflight: int = 0

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id


@dataclass(frozen=True, slots=True)
class ScoredCandidate:
    candidate: Candidate
    # Weighted sum of the scorers' scores.
    total: float
    # Each scorer's raw score in [0, 1], by scorer name (for decisions made visible).
    scores: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SchedulingCycle:
    """Inputs shared by every plugin in one cycle. `now` comes from the injected clock."""

    request: RoutingRequest
    now: float


@runtime_checkable
class Filter(Protocol):
    """Removes candidates that must not serve the request. Pure, synchronous.

    A filter may declare `KEEPS_ONLY_HOLDERS = True` (a class attribute) when every candidate
    it keeps has the requested model ready or loading. The engine then starts a cycle from the
    model's holders alone (`FleetSnapshot.holders`), which is only sound because every filter
    judges each candidate on its own, never relative to the others: keep it that way.
    """

    # The snapshot fields it reads; a policy using it is refused where no collector fills one.
    CONSUMES: ClassVar[frozenset[SnapshotField]]

    @property
    def name(self) -> str: ...

    def filter(
        self, cycle: SchedulingCycle, candidates: Sequence[Candidate]
    ) -> list[Candidate]: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores all candidates at once: one value in [0, 1] per candidate, 1 the best.

    Relative scores (min-max over the candidates) are normal; all-equal candidates get 1.0.
    The engine applies the weight and clamps out-of-range values.
    """

    # The snapshot fields it reads; a policy using it is refused where no collector fills one.
    CONSUMES: ClassVar[frozenset[SnapshotField]]

    @property
    def name(self) -> str: ...

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]: ...


@runtime_checkable
class Picker(Protocol):
    """Orders scored candidates: the first is the pick, the rest are fallbacks in order.

    Must not herd: choose at random among the best, using only the given random source.
    A picker reads the totals only, never the snapshot, so it declares no inputs.
    """

    @property
    def name(self) -> str: ...

    def pick(
        self, scored: Sequence[ScoredCandidate], rng: random.Random
    ) -> list[ScoredCandidate]: ...


class PluginFactory(Protocol):
    """Builds a plugin from its instance name and parameters; raises ConfigError on bad params."""

    def __call__(self, name: str, params: Mapping[str, Any]) -> Filter | Scorer | Picker: ...
