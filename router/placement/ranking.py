"""Where a new copy goes: rank the instances that could take it, shortlist the near-best, draw one.

    free_after  = budget - committed - footprint             (committed includes this plan's loads
                                                              and evictions so far)
    fit         = WITH_BUFFER   if free_after >= headroom_buffer
                  INTO_BUFFER   if 0 <= free_after < headroom_buffer
                  NO_ROOM       if free_after < 0            (only evictions could help)
    headroom    = max(0, free_after) / budget                 in [0, 1], absolute so that near-
                                                              equal instances stay near-equal
    idleness    = 1 - load / max(load over the candidates)    1.0 for all when every load is 0
    score       = (headroom_weight x headroom + load_weight x idleness)
                  / (headroom_weight + load_weight)          in [0, 1]

Ranking: better fit first, then higher score, then instance id (for determinism).
Shortlist: the instances of the best fit (never NO_ROOM) whose score >= best x (1 - tolerance).
The pick is uniform over the shortlist from the injected random source, so that two routers with
the same view do not both pile their copies onto one instance (ModelMesh does the same).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from router.placement.inputs import PlacementPolicy

__all__ = ["Fit", "RankedInstance", "RoomOnInstance", "choose_instance", "rank", "shortlist"]


class Fit(enum.IntEnum):
    """How a copy fits; lower is better."""

    WITH_BUFFER = 0
    INTO_BUFFER = 1
    NO_ROOM = 2


@dataclass(frozen=True, slots=True)
class RoomOnInstance:
    """An instance's memory and load as the plan stands so far."""

    instance_id: str
    budget_bytes: int
    committed_bytes: int
    load: float = 0.0

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.committed_bytes


@dataclass(frozen=True, slots=True)
class RankedInstance:
    instance_id: str
    fit: Fit
    # Bytes free once the copy is in; negative when it does not fit.
    free_after_bytes: int
    score: float


def rank(
    footprint_bytes: int, rooms: Sequence[RoomOnInstance], policy: PlacementPolicy
) -> list[RankedInstance]:
    """Every room ranked for a copy of `footprint_bytes` (formulas in the module docstring)."""
    max_load = max((room.load for room in rooms), default=0.0)
    weight_sum = policy.headroom_weight + policy.load_weight
    ranked = []
    for room in rooms:
        free_after = room.free_bytes - footprint_bytes
        headroom = max(0, free_after) / room.budget_bytes if room.budget_bytes > 0 else 0.0
        idleness = 1.0 - room.load / max_load if max_load > 0 else 1.0
        score = (policy.headroom_weight * headroom + policy.load_weight * idleness) / weight_sum
        ranked.append(RankedInstance(room.instance_id, _fit(free_after, policy), free_after, score))
    ranked.sort(key=lambda r: (r.fit, -r.score, r.instance_id))
    return ranked


def shortlist(ranked: Sequence[RankedInstance], tolerance: float) -> list[RankedInstance]:
    """The near-best of the best fit, from a `rank` result; empty when nothing fits."""
    if not ranked or ranked[0].fit is Fit.NO_ROOM:
        return []
    best = ranked[0]
    floor = best.score * (1.0 - tolerance)
    return [r for r in ranked if r.fit == best.fit and r.score >= floor]


def choose_instance(
    ranked: Sequence[RankedInstance], tolerance: float, rng: random.Random
) -> RankedInstance | None:
    """A uniform draw from the shortlist; None when nothing fits."""
    near_best = shortlist(ranked, tolerance)
    if not near_best:
        return None
    return near_best[rng.randrange(len(near_best))]


def _fit(free_after: int, policy: PlacementPolicy) -> Fit:
    if free_after < 0:
        return Fit.NO_ROOM
    if free_after < policy.headroom_buffer_bytes:
        return Fit.INTO_BUFFER
    return Fit.WITH_BUFFER
