"""Picker `weighted-random`: a random pick among the near-best, weighted by total.

Inputs: each candidate's `total`.
Rule: the shortlist is every candidate whose total is at least best - tolerance * |best| (for the
non-negative totals the engine produces: at least (1 - tolerance) * best). The pick is drawn from
the shortlist with probability proportional to total (uniformly when every shortlisted total is
0). Fallbacks: every other candidate, by total descending. Spreading picks over near-equal
instances keeps the router from herding every request onto one of them between refreshes.
Parameters: `tolerance` (in [0, 1], default 0.1): 0 shortlists only candidates tied with the best,
1 shortlists every candidate.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import ScoredCandidate
from router.plugins.ordering import by_total_descending, move_to_front
from router.plugins.params import read_number, reject_unknown

__all__ = ["WeightedRandomPicker"]


@dataclass(frozen=True, slots=True)
class WeightedRandomPicker:
    TYPE_NAME: ClassVar[str] = "weighted-random"

    name: str = TYPE_NAME
    tolerance: float = 0.1

    def pick(self, scored: Sequence[ScoredCandidate], rng: random.Random) -> list[ScoredCandidate]:
        ordered = by_total_descending(scored)
        if not ordered:
            return []
        best = ordered[0].total
        floor = best - self.tolerance * abs(best)
        # `ordered` is descending, so the shortlist is a prefix of it.
        weights = [max(0.0, item.total) for item in ordered if item.total >= floor]
        if sum(weights) > 0:
            index = rng.choices(range(len(weights)), weights=weights)[0]
        else:
            index = rng.randrange(len(weights))
        return move_to_front(ordered, index)

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> WeightedRandomPicker:
        reject_unknown(params, ("tolerance",))
        tolerance = read_number(params, "tolerance", 0.1, minimum=0.0, maximum=1.0)
        return cls(name=name, tolerance=tolerance)
