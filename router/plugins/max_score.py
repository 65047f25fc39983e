"""Picker `max-score`: the highest total, ties broken at random.

Inputs: each candidate's `total`.
Rule: the pick is drawn uniformly among the candidates whose total equals the best (within float
rounding); fallbacks: every other candidate, by total descending.
Parameters: none.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import ScoredCandidate
from router.plugins.ordering import by_total_descending, move_to_front
from router.plugins.params import reject_unknown

__all__ = ["MaxScorePicker"]


@dataclass(frozen=True, slots=True)
class MaxScorePicker:
    TYPE_NAME: ClassVar[str] = "max-score"

    name: str = TYPE_NAME

    def pick(self, scored: Sequence[ScoredCandidate], rng: random.Random) -> list[ScoredCandidate]:
        ordered = by_total_descending(scored)
        if not ordered:
            return []
        best = ordered[0].total
        # Weighted sums of equal scores can differ in the last bits; those are still ties.
        tied = sum(1 for item in ordered if math.isclose(item.total, best, abs_tol=1e-9))
        return move_to_front(ordered, rng.randrange(tied))

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> MaxScorePicker:
        reject_unknown(params, ())
        return cls(name=name)
