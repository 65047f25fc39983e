"""Scorer `load`: prefer instances doing less work right now (recent throughput).

Inputs: per candidate `instance.inferences_per_second` (all models, recent window).
Formula: without `capacity_ips`, min-max inverse over the candidates: the least busy 1.0, the
busiest 0.0, all equal 1.0. With `capacity_ips`, an absolute score 1 - ips / capacity_ips clamped
to [0, 1], so an idle fleet is not split into winners and losers by noise.
Parameters: `capacity_ips` (> 0, optional, default none): inferences per second at which an
instance counts as fully busy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import Candidate, SchedulingCycle, SnapshotField
from router.plugins.normalise import min_max
from router.plugins.params import read_optional_number, reject_unknown

__all__ = ["LoadScorer"]


@dataclass(frozen=True, slots=True)
class LoadScorer:
    TYPE_NAME: ClassVar[str] = "load"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset({SnapshotField.INFERENCES_PER_SECOND})

    name: str = TYPE_NAME
    capacity_ips: float | None = None

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        rates = [c.instance.inferences_per_second for c in candidates]
        if self.capacity_ips is None:
            return min_max(rates, lower_is_better=True)
        capacity = self.capacity_ips
        return [min(1.0, max(0.0, 1.0 - rate / capacity)) for rate in rates]

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> LoadScorer:
        reject_unknown(params, ("capacity_ips",))
        capacity_ips = read_optional_number(params, "capacity_ips", positive=True)
        return cls(name=name, capacity_ips=capacity_ips)
