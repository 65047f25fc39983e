"""The scheduling engine: filters -> weighted scorers -> one picker, over one snapshot.

Pure and synchronous: every input arrives in the `SchedulingCycle` and the candidates, and the
only randomness is the `random.Random` handed to `pick`. Plugins live in `router.plugins`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from router.contracts import Candidate, Filter, Picker, SchedulingCycle, ScoredCandidate, Scorer

__all__ = ["FilterStep", "FilterTrace", "Scheduler", "SchedulingProfile"]


@dataclass(frozen=True, slots=True)
class SchedulingProfile:
    """Which plugins run, in order, and how much each scorer counts."""

    filters: tuple[Filter, ...]
    # (scorer, weight); the weight multiplies the scorer's clamped score into the total.
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker

    def __post_init__(self) -> None:
        # Config data is validated with field names in `build_profile`; these guard direct use.
        for scorer, weight in self.scorers:
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"scorer '{scorer.name}': weight must be finite and >= 0")
        names = [scorer.name for scorer, _ in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorer names must be unique (scores are kept by name): {names}")


@dataclass(frozen=True, slots=True)
class FilterStep:
    """What one filter removed in one cycle."""

    filter_name: str
    removed_instance_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FilterTrace:
    """Why candidates were dropped, filter by filter, so 'no instance' errors can say why."""

    considered: int
    steps: tuple[FilterStep, ...]

    def summary(self) -> str:
        """E.g. '3 candidates: 2 filtered by healthy-fresh, 1 by model-ready'."""
        counts = [
            (len(step.removed_instance_ids), step.filter_name)
            for step in self.steps
            if step.removed_instance_ids
        ]
        noun = "candidate" if self.considered == 1 else "candidates"
        if not counts:
            return f"{self.considered} {noun}, none filtered"
        parts = [f"{count} by {name}" for count, name in counts]
        parts[0] = f"{counts[0][0]} filtered by {counts[0][1]}"
        return f"{self.considered} {noun}: " + ", ".join(parts)


class Scheduler:
    """Runs one `SchedulingProfile` over the candidates of a cycle."""

    def __init__(self, profile: SchedulingProfile) -> None:
        self.profile = profile
        # True when some filter keeps only the model's holders: candidates may start there.
        self.only_model_holders = any(
            getattr(f, "KEEPS_ONLY_HOLDERS", False) for f in profile.filters
        )

    def rank(
        self, cycle: SchedulingCycle, candidates: Sequence[Candidate]
    ) -> list[ScoredCandidate]:
        """Surviving candidates with totals and per-scorer scores, best total first (stable)."""
        return self.rank_with_trace(cycle, candidates)[0]

    def rank_with_trace(
        self, cycle: SchedulingCycle, candidates: Sequence[Candidate]
    ) -> tuple[list[ScoredCandidate], FilterTrace]:
        survivors, trace = self._filter(cycle, candidates)
        scored = self._score(cycle, survivors)
        scored.sort(key=lambda item: item.total, reverse=True)
        return scored, trace

    def pick(
        self, cycle: SchedulingCycle, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[ScoredCandidate]:
        """The pick first, then fallbacks in order; empty when no candidate survives."""
        return self.pick_with_trace(cycle, candidates, rng)[0]

    def pick_with_trace(
        self, cycle: SchedulingCycle, candidates: Sequence[Candidate], rng: random.Random
    ) -> tuple[list[ScoredCandidate], FilterTrace]:
        ranked, trace = self.rank_with_trace(cycle, candidates)
        if not ranked:
            return [], trace
        return self.profile.picker.pick(ranked, rng), trace

    def _filter(
        self, cycle: SchedulingCycle, candidates: Sequence[Candidate]
    ) -> tuple[list[Candidate], FilterTrace]:
        survivors = list(candidates)
        steps: list[FilterStep] = []
        for candidate_filter in self.profile.filters:
            kept = candidate_filter.filter(cycle, survivors)
            kept_ids = {candidate.instance_id for candidate in kept}
            removed = tuple(c.instance_id for c in survivors if c.instance_id not in kept_ids)
            steps.append(FilterStep(candidate_filter.name, removed))
            survivors = kept
        return survivors, FilterTrace(considered=len(candidates), steps=tuple(steps))

    def _score(
        self, cycle: SchedulingCycle, candidates: Sequence[Candidate]
    ) -> list[ScoredCandidate]:
        totals = [0.0] * len(candidates)
        scores_by_candidate: list[dict[str, float]] = [{} for _ in candidates]
        for scorer, weight in self.profile.scorers:
            raw_scores = scorer.score(cycle, candidates)
            if len(raw_scores) != len(candidates):
                raise ValueError(
                    f"scorer '{scorer.name}' returned {len(raw_scores)} scores "
                    f"for {len(candidates)} candidates"
                )
            for index, raw in enumerate(raw_scores):
                score = _clamp_unit(raw)
                scores_by_candidate[index][scorer.name] = score
                totals[index] += weight * score
        return [
            ScoredCandidate(candidate=candidate, total=total, scores=scores)
            for candidate, total, scores in zip(
                candidates, totals, scores_by_candidate, strict=True
            )
        ]


def _clamp_unit(score: float) -> float:
    """Scores outside [0, 1] are a scorer's mistake; NaN counts as the worst score."""
    if math.isnan(score):
        return 0.0
    return min(1.0, max(0.0, score))
