"""Scorer `queue-depth`: prefer instances with fewer requests of this model waiting.

Inputs: `request.model_name`; per candidate the model's `pending_requests` on the instance (0 when
the model is not there) and `candidate.assumed_inflight` (requests routed since the last refresh,
which Triton has not reported yet).
Formula: q = pending_requests + assumed_inflight; min-max over the candidates with the shortest
queue 1.0 and the longest 0.0, i.e. (max_q - q) / (max_q - min_q); all equal 1.0. With
`saturation` set, a candidate with q >= saturation scores 0.0 whatever the others hold.
Parameters: `saturation` (> 0, optional, default none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import Candidate, SchedulingCycle, SnapshotField
from router.plugins.normalise import min_max
from router.plugins.params import read_optional_number, reject_unknown

__all__ = ["QueueDepthScorer"]


@dataclass(frozen=True, slots=True)
class QueueDepthScorer:
    TYPE_NAME: ClassVar[str] = "queue-depth"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset(
        {SnapshotField.MODEL_PENDING_REQUESTS, SnapshotField.ASSUMED_INFLIGHT}
    )

    name: str = TYPE_NAME
    saturation: float | None = None

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        depths = [float(self._depth(c, cycle.request.model_name)) for c in candidates]
        scores = min_max(depths, lower_is_better=True)
        if self.saturation is None:
            return scores
        saturation = self.saturation
        return [0.0 if q >= saturation else s for q, s in zip(depths, scores, strict=True)]

    @staticmethod
    def _depth(candidate: Candidate, model_name: str) -> int:
        model = candidate.instance.model(model_name)
        pending = model.pending_requests if model is not None else 0
        return pending + candidate.assumed_inflight

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> QueueDepthScorer:
        reject_unknown(params, ("saturation",))
        return cls(name=name, saturation=read_optional_number(params, "saturation", positive=True))
