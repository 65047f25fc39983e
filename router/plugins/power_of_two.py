"""Picker `power-of-two`: the better of two candidates drawn at random.

Inputs: each candidate's `total`.
Rule: draw two distinct candidates uniformly at random (not weighted by total: the comparison
already favours the better one, and uniform draws keep the worst from being starved entirely);
the one with the higher total is the pick, the first drawn on a tie. Fallbacks: every other
candidate, by total descending. A single candidate is picked as it is.
Parameters: none.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import ScoredCandidate
from router.plugins.ordering import by_total_descending, move_to_front
from router.plugins.params import reject_unknown

__all__ = ["PowerOfTwoPicker"]


@dataclass(frozen=True, slots=True)
class PowerOfTwoPicker:
    TYPE_NAME: ClassVar[str] = "power-of-two"

    name: str = TYPE_NAME

    def pick(self, scored: Sequence[ScoredCandidate], rng: random.Random) -> list[ScoredCandidate]:
        ordered = by_total_descending(scored)
        if len(ordered) < 2:
            return ordered
        first, second = rng.sample(range(len(ordered)), 2)
        winner = first if ordered[first].total >= ordered[second].total else second
        return move_to_front(ordered, winner)

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> PowerOfTwoPicker:
        reject_unknown(params, ())
        return cls(name=name)
