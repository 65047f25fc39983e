"""Orderings shared by the pickers: best total first, the pick moved to the front."""

from __future__ import annotations

from collections.abc import Sequence

from router.contracts import ScoredCandidate

__all__ = ["by_total_descending", "move_to_front"]


def by_total_descending(scored: Sequence[ScoredCandidate]) -> list[ScoredCandidate]:
    """Stable: candidates with equal totals keep their order."""
    return sorted(scored, key=lambda item: item.total, reverse=True)


def move_to_front(ordered: list[ScoredCandidate], index: int) -> list[ScoredCandidate]:
    """The pick first, then the others in their order (the fallbacks)."""
    return [ordered[index], *ordered[:index], *ordered[index + 1 :]]
