"""What the placement controller remembers about each copy between ticks, and the planner's view
of one instance built from it.

Per copy (model, instance): when it was loaded (our load's start) or first seen, and the latest
scrape where its request counters moved (the LRU order). Per model: the bytes one copy takes,
measured on the GPU around our latest load of it, else declared by its fully loaded versions.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from router.contracts import FleetSnapshot, InstanceSnapshot, MemorySource, ModelOnInstance
from router.placement.inputs import InstanceState, LoadedModel, ModelSpec

__all__ = ["CopyRecords", "queued_requests"]

Copy = tuple[str, str]  # (model, instance id)


class CopyRecords:
    def __init__(self, unknown_footprint_bytes: int) -> None:
        self._unknown_footprint_bytes = unknown_footprint_bytes
        self._loaded_at: dict[Copy, float] = {}
        self._last_used: dict[Copy, float] = {}
        self._measured: dict[str, int] = {}
        self._declared: dict[str, int] = {}

    def footprint(self, model: str) -> int:
        """Bytes one copy takes: measured, else declared, else `unknown_footprint_bytes`."""
        return (
            self._measured.get(model) or self._declared.get(model) or self._unknown_footprint_bytes
        )

    def last_used(self, model: str, instance_id: str) -> float | None:
        return self._last_used.get((model, instance_id))

    def used(self, model: str, instance_id: str, at: float) -> None:
        """The copy's request counters moved in the scrape taken at `at`."""
        key = (model, instance_id)
        self._last_used[key] = max(self._last_used.get(key, at), at)

    def loaded(self, copy: Copy, started_at: float | None, measured_bytes: int | None) -> None:
        """Our load of `copy`, started at `started_at`, finished; `measured_bytes`: what the
        GPU's memory rose by (None or 0: not measured)."""
        if started_at is not None:
            self._loaded_at[copy] = started_at
        if measured_bytes:
            self._measured[copy[0]] = measured_bytes

    def remember(self, snapshot: FleetSnapshot, busy: Collection[Copy], now: float) -> None:
        """First sightings, copies gone from the fleet (unless a job of ours is `busy` with
        them) forgotten, and the declared footprints of fully loaded models."""
        listed: set[Copy] = set()
        declared: dict[str, int] = {}
        for inst in snapshot.instances:
            for name, loaded in inst.models.items():
                key = (name, inst.instance_id)
                listed.add(key)
                self._loaded_at.setdefault(key, now)
                if loaded.declared_memory_bytes and not loaded.is_loading:
                    declared[name] = max(declared.get(name, 0), loaded.declared_memory_bytes)
        self._declared.update(declared)
        for key in [k for k in self._loaded_at if k not in listed and k not in busy]:
            del self._loaded_at[key]
            self._last_used.pop(key, None)

    def instance_state(
        self,
        inst: InstanceSnapshot,
        specs: Mapping[str, ModelSpec],
        now: float,
        stale_after_s: float,
    ) -> InstanceState:
        """The planner's view of `inst`: healthy only when refreshed within `stale_after_s`;
        measured memory use only from GPU metrics (else the models' own bytes count)."""
        iid = inst.instance_id
        models = []
        for name in sorted(inst.models):
            loaded_at = self._loaded_at.get((name, iid), now)
            models.append(
                LoadedModel(
                    name=name,
                    memory_bytes=self._memory_of(name, inst.models[name], specs.get(name)),
                    loaded_at=loaded_at,
                    last_used=max(loaded_at, self._last_used.get((name, iid), loaded_at)),
                )
            )
        fresh = inst.refreshed_at > 0 and now - inst.refreshed_at <= stale_after_s
        measured = inst.memory_source is MemorySource.GPU_METRICS
        return InstanceState(
            instance_id=iid,
            memory_budget_bytes=inst.memory_budget_bytes,
            memory_used_bytes=inst.memory_used_bytes if measured else 0,
            models=tuple(models),
            load=max(0.0, inst.inferences_per_second),
            healthy=inst.healthy and fresh,
        )

    def _memory_of(self, name: str, loaded: ModelOnInstance, spec: ModelSpec | None) -> int:
        if name in self._measured:
            return self._measured[name]
        if loaded.declared_memory_bytes and not loaded.is_loading:
            return loaded.declared_memory_bytes
        fallback = spec.footprint_bytes if spec is not None else self.footprint(name)
        return max(loaded.declared_memory_bytes, fallback)


def queued_requests(snapshot: FleetSnapshot) -> dict[str, int]:
    """Per model, the requests waiting in the queues of healthy instances (Triton's
    nv_inference_pending_request_count at the latest scrape)."""
    queued: dict[str, int] = {}
    for inst in snapshot.instances:
        if not inst.healthy:
            continue
        for name, loaded in inst.models.items():
            if loaded.pending_requests > 0:
                queued[name] = queued.get(name, 0) + loaded.pending_requests
    return queued
