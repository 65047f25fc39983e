"""Min-max normalisation shared by the relative scorers."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["min_max"]


def min_max(values: Sequence[float], *, lower_is_better: bool = False) -> list[float]:
    """Maps the best value to 1.0 and the worst to 0.0, linearly in between.

    All-equal values (one value included) get 1.0 each, so a scorer that cannot tell candidates
    apart adds the same to every total and changes no ranking.
    """
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    span = high - low
    if lower_is_better:
        return [(high - value) / span for value in values]
    return [(value - low) / span for value in values]
