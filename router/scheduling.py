"""The scheduling engine: filters -> weighted scorers, over the candidates of one cycle.

Pure and synchronous: every input arrives in the `SchedulingCycle` and the candidates. The
picker and the candidates come from router/decision.py, which is the one place a decision is
made; plugins live in `router.plugins`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.contracts import Candidate, Filter, Picker, SchedulingCycle, ScoredCandidate, Scorer

__all__ = [
    "FilterStep",
    "FilterTrace",
    "SchedulingProfile",
    "rank_candidates",
    "run_filters",
    "run_scorers",
]


@dataclass(frozen=True, slots=True)
class SchedulingProfile:
    """Which plugins run, in order, and how much each scorer counts."""

    filters: tuple[Filter, ...]
    # (scorer, weight); the weight multiplies the scorer's clamped score into the total.
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker
    # True when some filter keeps only the model's holders (see `Filter`): a decision may
    # then start from them alone rather than from every instance.
    only_model_holders: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Config data is validated with field names in `build_profile`; these guard direct use.
        for scorer, weight in self.scorers:
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"scorer '{scorer.name}': weight must be finite and >= 0")
        names = [scorer.name for scorer, _ in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorer names must be unique (scores are kept by name): {names}")
        holders_only = any(getattr(f, "KEEPS_ONLY_HOLDERS", False) for f in self.filters)
        object.__setattr__(self, "only_model_holders", holders_only)


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


def rank_candidates(
    profile: SchedulingProfile, cycle: SchedulingCycle, candidates: Sequence[Candidate]
) -> tuple[list[ScoredCandidate], FilterTrace]:
    """Surviving candidates with totals and per-scorer scores, best total first (stable),
    and the trace of what each filter removed."""
    survivors, trace = run_filters(profile, cycle, candidates)
    scored = run_scorers(profile, cycle, survivors)
    scored.sort(key=_total, reverse=True)
    return scored, trace


def run_filters(
    profile: SchedulingProfile, cycle: SchedulingCycle, candidates: Sequence[Candidate]
) -> tuple[list[Candidate], FilterTrace]:
    """The candidates every filter kept, in their order, and what each filter removed."""
    survivors = list(candidates)
    steps: list[FilterStep] = []
    for candidate_filter in profile.filters:
        kept = candidate_filter.filter(cycle, survivors)
        if len(kept) == len(survivors):  # filters only remove: nothing was
            removed: tuple[str, ...] = ()
        else:
            kept_ids = {candidate.instance_id for candidate in kept}
            removed = tuple(c.instance_id for c in survivors if c.instance_id not in kept_ids)
        steps.append(FilterStep(candidate_filter.name, removed))
        survivors = kept
    return survivors, FilterTrace(considered=len(candidates), steps=tuple(steps))


def run_scorers(
    profile: SchedulingProfile, cycle: SchedulingCycle, candidates: Sequence[Candidate]
) -> list[ScoredCandidate]:
    """Each candidate with its clamped score per scorer and their weighted sum, in order."""
    if not candidates:
        return []
    names: list[str] = []
    columns: list[list[float]] = []
    totals = [0.0] * len(candidates)
    for scorer, weight in profile.scorers:
        raw_scores = scorer.score(cycle, candidates)
        if len(raw_scores) != len(candidates):
            raise ValueError(
                f"scorer '{scorer.name}' returned {len(raw_scores)} scores "
                f"for {len(candidates)} candidates"
            )
        # Scores outside [0, 1] are a scorer's mistake; NaN fails `> 0` and so counts as 0.
        column = [0.0 if not raw > 0.0 else 1.0 if raw > 1.0 else raw for raw in raw_scores]
        names.append(scorer.name)
        columns.append(column)
        totals = [total + weight * score for total, score in zip(totals, column, strict=True)]
    rows = zip(*columns, strict=True) if columns else ((),) * len(candidates)
    # Positional: this runs once per candidate, 50,000 times for a full rebuild of a large fleet.
    return [
        ScoredCandidate(candidate, total, dict(zip(names, row, strict=True)))
        for candidate, total, row in zip(candidates, totals, rows, strict=True)
    ]


def _total(scored: ScoredCandidate) -> float:
    return scored.total
