"""Scorer `model-affinity`: prefer instances that already hold the requested model.

Inputs: `request.model_name`, `request.model_version`; per candidate the model's
`ready_versions` and `loading_versions`.
Formula (absolute tiers, like the endpoint picker's adapter affinity): ready 1.0, loading
`loading_score`, not loaded 0.0. Affinity alone piles requests onto one instance; pair it with a
load term (queue-depth, load) in the profile.
Parameters: `loading_score` (in [0, 1], default 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import Candidate, RoutingRequest, SchedulingCycle, SnapshotField
from router.plugins.model_state import model_loading_on, model_ready_on
from router.plugins.params import read_number, reject_unknown

__all__ = ["ModelAffinityScorer"]


@dataclass(frozen=True, slots=True)
class ModelAffinityScorer:
    TYPE_NAME: ClassVar[str] = "model-affinity"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset(
        {SnapshotField.READY_VERSIONS, SnapshotField.LOADING_VERSIONS}
    )

    name: str = TYPE_NAME
    loading_score: float = 0.5

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        return [self._tier(c, cycle.request) for c in candidates]

    def _tier(self, candidate: Candidate, request: RoutingRequest) -> float:
        if model_ready_on(candidate, request):
            return 1.0
        if model_loading_on(candidate, request):
            return self.loading_score
        return 0.0

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> ModelAffinityScorer:
        reject_unknown(params, ("loading_score",))
        loading_score = read_number(params, "loading_score", 0.5, minimum=0.0, maximum=1.0)
        return cls(name=name, loading_score=loading_score)
