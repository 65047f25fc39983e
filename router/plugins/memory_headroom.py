"""Scorer `memory-headroom`: prefer instances with more free memory above a safety buffer.

Inputs: per candidate `instance.memory_free_bytes` and `instance.memory_budget_bytes`.
Formula: headroom = max(0, memory_free_bytes - buffer_bytes), min-max normalised over the
candidates whose budget is known (most headroom 1.0, least 0.0, all equal 1.0); when every known
candidate has no headroom at all they score 0.0, since a full instance is not a good one. A budget
of 0 means unknown: such candidates score a neutral 0.5, or 1.0 when every candidate is unknown
(nothing tells them apart).
Parameters: `buffer_bytes` (>= 0, default 0): memory to keep free for activations and loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import Candidate, SchedulingCycle, SnapshotField
from router.plugins.normalise import min_max
from router.plugins.params import read_number, reject_unknown

__all__ = ["MemoryHeadroomScorer"]

UNKNOWN_BUDGET_SCORE = 0.5


@dataclass(frozen=True, slots=True)
class MemoryHeadroomScorer:
    TYPE_NAME: ClassVar[str] = "memory-headroom"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset(
        {SnapshotField.MEMORY_USED, SnapshotField.MEMORY_BUDGET}
    )

    name: str = TYPE_NAME
    buffer_bytes: float = 0.0

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        known = [c for c in candidates if c.instance.memory_budget_bytes > 0]
        if not known:
            return [1.0] * len(candidates)
        headroom = [max(0.0, c.instance.memory_free_bytes - self.buffer_bytes) for c in known]
        known_scores = iter(min_max(headroom) if max(headroom) > 0 else [0.0] * len(known))
        return [
            next(known_scores) if c.instance.memory_budget_bytes > 0 else UNKNOWN_BUDGET_SCORE
            for c in candidates
        ]

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> MemoryHeadroomScorer:
        reject_unknown(params, ("buffer_bytes",))
        return cls(name=name, buffer_bytes=read_number(params, "buffer_bytes", 0.0, minimum=0.0))
