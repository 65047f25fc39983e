"""How many copies of a model: desired from demand and policy, then a target that grows at once
and shrinks slowly.

    demand    = max(rate, forecast, recent)             (the forecast sees a wave before its peak,
                                                         recent a sudden rise and a queue:
                                                         router/demand.py)
    needed    = ceil(demand / per_copy_capacity)        (0 without demand)
    floor     = max(min_copies, 1 if a request came within keep_warm_s or one waits now)
    ceiling   = min(max_copies, healthy instances)
    desired   = min(max(needed, floor), ceiling)

    target    = desired                   when desired >= current (grow at once)
              = current - 1               when demand stayed <= (current - 1) x capacity x
                                          scale_down_utilisation (or current > ceiling) for a
                                          whole cool-down; the timer then restarts, so a model
                                          sheds one copy per cool-down at most
              = current                   otherwise (inside the hysteresis band, or cooling down)

The last copy never goes by scale-down (unless max_copies is 0): unloading what nothing else
needs frees memory nobody asked for and risks a cold start. It leaves only when evicted to make
room, and only once the model's desired count is 0.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from router.placement.inputs import ModelSpec, PlacementPolicy
from router.placement.text import copies, format_rps

__all__ = [
    "CopyBound",
    "CopyCount",
    "ScaleStep",
    "copies_for_demand",
    "desired_copies",
    "scale_target",
]

# Tolerates float division error: 0.3 / 0.1 must need 3 copies, not 4.
_CEIL_SLACK = 1e-9


class CopyBound(enum.Enum):
    """Which term of the formula set the desired count."""

    DEMAND = "demand"
    FORECAST = "forecast"
    RECENT = "recent demand"
    MIN_COPIES = "min copies"
    KEEP_WARM = "keep warm"
    REQUESTED = "requested"
    MAX_COPIES = "max copies"
    INSTANCES = "healthy instances"
    NO_DEMAND = "no demand"


@dataclass(frozen=True, slots=True)
class CopyCount:
    """The desired copies of one model and what set the number."""

    desired: int
    # The term that set the count before the ceiling: demand, forecast, or one of the floors.
    bound: CopyBound
    # MAX_COPIES or INSTANCES when the ceiling cut the count, else None.
    capped_by: CopyBound | None
    rate_rps: float
    forecast_rps: float
    per_copy_capacity_rps: float
    # min(max_copies, healthy instances): the most copies the model may have now.
    ceiling: int
    # The recent window's rate plus the queued requests spread over it.
    recent_rps: float = 0.0

    @property
    def demand_rps(self) -> float:
        """max(rate, forecast, recent): what copies are sized for."""
        return max(self.rate_rps, self.forecast_rps, self.recent_rps)


@dataclass(frozen=True, slots=True)
class ScaleStep:
    """The target after hysteresis, the timer to carry to the next round, and why."""

    target: int
    # When demand went below the shrink threshold (None when it is not below).
    low_since: float | None
    reason: str


def copies_for_demand(demand_rps: float, per_copy_capacity_rps: float) -> int:
    """ceil(demand / capacity); 0 without demand."""
    if demand_rps <= 0:
        return 0
    return math.ceil(demand_rps / per_copy_capacity_rps - _CEIL_SLACK)


def desired_copies(
    spec: ModelSpec,
    *,
    rate_rps: float,
    forecast_rps: float,
    recently_used: bool,
    requested: bool,
    healthy_instances: int,
    recent_rps: float = 0.0,
) -> CopyCount:
    """The module's `desired` formula; `bound` names the term that decided it."""
    demand = max(rate_rps, forecast_rps, recent_rps)
    needed = copies_for_demand(demand, spec.per_copy_capacity_rps)
    bound = _demand_bound(rate_rps, forecast_rps, recent_rps)
    desired = needed
    if needed == 0:
        bound = CopyBound.NO_DEMAND
    floors = (
        (spec.min_copies, CopyBound.MIN_COPIES),
        (1 if requested else 0, CopyBound.REQUESTED),
        (1 if recently_used else 0, CopyBound.KEEP_WARM),
    )
    for floor, floor_bound in floors:
        if floor > desired:
            desired, bound = floor, floor_bound

    max_copies = healthy_instances if spec.max_copies is None else spec.max_copies
    ceiling = min(max_copies, healthy_instances)
    capped_by: CopyBound | None = None
    if desired > ceiling:
        desired = ceiling
        capped_by = (
            CopyBound.MAX_COPIES
            if spec.max_copies is not None and spec.max_copies <= healthy_instances
            else CopyBound.INSTANCES
        )
    return CopyCount(
        desired=desired,
        bound=bound,
        capped_by=capped_by,
        rate_rps=rate_rps,
        forecast_rps=forecast_rps,
        per_copy_capacity_rps=spec.per_copy_capacity_rps,
        ceiling=ceiling,
        recent_rps=recent_rps,
    )


def _demand_bound(rate_rps: float, forecast_rps: float, recent_rps: float) -> CopyBound:
    """Which demand term is the largest (the rate on a tie)."""
    if recent_rps > max(rate_rps, forecast_rps):
        return CopyBound.RECENT
    return CopyBound.FORECAST if forecast_rps > rate_rps else CopyBound.DEMAND


def scale_target(
    current: int,
    count: CopyCount,
    policy: PlacementPolicy,
    *,
    low_since: float | None,
    now: float,
) -> ScaleStep:
    """The module's `target` rule, with `low_since` the timer carried from the last round."""
    demand = f"{_bound_noun(count)} {format_rps(count.demand_rps)} rps"
    capacity = f"{format_rps(count.per_copy_capacity_rps)} rps"
    if count.desired > current:
        return ScaleStep(count.desired, None, _growth_reason(current, count, demand, capacity))

    keep_last = 1 if count.ceiling >= 1 else 0
    lowest = max(count.desired, min(current, keep_last))
    if current <= lowest:
        if count.desired < current:
            return ScaleStep(current, None, f"{demand}: last copy kept until its memory is needed")
        return ScaleStep(current, None, f"steady at {copies(current)}: {demand}")

    fewer = current - 1
    threshold = fewer * count.per_copy_capacity_rps * policy.scale_down_utilisation
    over_ceiling = current > count.ceiling
    if over_ceiling:
        why_low = f"{current} copies > at most {count.ceiling}"
    elif count.demand_rps <= threshold:
        share = f"{policy.scale_down_utilisation:.0%}"
        why_low = f"{demand} <= {share} of {copies(fewer)} x {capacity}"
    else:
        return ScaleStep(
            current,
            None,
            f"holding {copies(current)}: {demand} > "
            f"{policy.scale_down_utilisation:.0%} of {copies(fewer)} x {capacity}",
        )

    since = now if low_since is None else low_since
    waited = now - since
    cooldown = policy.scale_down_cooldown_s
    if waited >= cooldown:
        # Restart the timer: the next copy goes only after another whole cool-down.
        return ScaleStep(fewer, now, f"{why_low} for {waited:.0f} s: {current} -> {fewer}")
    return ScaleStep(
        current, since, f"{why_low} for {waited:.0f} s of {cooldown:.0f} s: keeping {current}"
    )


def _growth_reason(current: int, count: CopyCount, demand: str, capacity: str) -> str:
    if count.bound in (CopyBound.DEMAND, CopyBound.FORECAST, CopyBound.RECENT):
        reason = f"{demand} > {copies(current)} x {capacity}"
    elif count.bound is CopyBound.MIN_COPIES:
        reason = f"min copies {count.desired} > {current}"
    elif count.bound is CopyBound.REQUESTED:
        reason = "requested while loaded nowhere"
    else:
        reason = "requested within the keep-warm window: keep 1 copy"
    if count.capped_by is not None:
        reason += f" (capped at {count.ceiling} by {count.capped_by.value})"
    return reason


def _bound_noun(count: CopyCount) -> str:
    bound = _demand_bound(count.rate_rps, count.forecast_rps, count.recent_rps)
    return "demand" if bound is CopyBound.DEMAND else bound.value
