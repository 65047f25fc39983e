"""Which copies to evict from a full instance to make room for a new one.

A copy may be evicted unless one of these protects it (checked in this order):
    action in progress    the executor is already loading or unloading it
    needed by this plan   the plan is adding copies of the same model
    desired copies        evicting it would leave its model with fewer serving copies (listed,
                          not being unloaded; a copy still loading may fail) than desired: this
                          protects the last copy of a model with a request within the keep-warm
                          window (desired >= 1) and the min_copies of every model
    churn guard           loaded less than churn_guard_s ago

Victims are taken least recently used first (ties: older load, then name) until the free memory
reaches footprint + headroom buffer; when no prefix reaches that, the shortest prefix that reaches
the footprint alone (the copy then eats into the buffer, as a load without eviction may). When
not even that is reachable, nothing is evicted: a partial eviction frees memory for nobody.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.placement.text import copies, format_bytes

__all__ = ["EvictionChoice", "ResidentCopy", "choose_victims", "protection"]


@dataclass(frozen=True, slots=True)
class ResidentCopy:
    """A copy on the instance being emptied, with why it may not go ("" when it may)."""

    model: str
    memory_bytes: int
    last_used: float
    loaded_at: float
    protected_because: str = ""


@dataclass(frozen=True, slots=True)
class EvictionChoice:
    # Least recently used first; empty when eviction cannot make room.
    victims: tuple[ResidentCopy, ...]
    freed_bytes: int
    enough: bool
    # When not enough: why, for the planner's report.
    reason: str = ""


def protection(
    *,
    loaded_at: float,
    now: float,
    churn_guard_s: float,
    copies_left_after: int,
    desired: int,
    needed_by_plan: bool,
    action_in_progress: bool,
) -> str:
    """Why the copy may not be evicted, or "" when it may (rules in the module docstring)."""
    if action_in_progress:
        return "action in progress"
    if needed_by_plan:
        return "needed by this plan"
    if copies_left_after < desired:
        if copies_left_after == 0:
            return "last copy of a model in use"
        return f"would leave {copies(copies_left_after)} of {desired} desired"
    age = now - loaded_at
    if age < churn_guard_s:
        return f"loaded {age:.0f} s ago < churn guard {churn_guard_s:.0f} s"
    return ""


def choose_victims(
    residents: Sequence[ResidentCopy], *, free_bytes: int, needed_bytes: int, wanted_bytes: int
) -> EvictionChoice:
    """LRU victims so that free + freed >= wanted (else >= needed), or none (module docstring)."""
    evictable = sorted(
        (r for r in residents if not r.protected_because),
        key=lambda r: (r.last_used, r.loaded_at, r.model),
    )
    for goal in (wanted_bytes, needed_bytes):
        victims: list[ResidentCopy] = []
        freed = 0
        for resident in evictable:
            if free_bytes + freed >= goal:
                break
            victims.append(resident)
            freed += resident.memory_bytes
        if free_bytes + freed >= goal:
            return EvictionChoice(tuple(victims), freed, enough=True)
    most = free_bytes + sum(r.memory_bytes for r in evictable)
    protected = [f"{r.model}: {r.protected_because}" for r in residents if r.protected_because]
    reason = f"frees at most {format_bytes(max(0, most))} of {format_bytes(needed_bytes)}"
    if protected:
        reason += f" (protected: {'; '.join(protected)})"
    return EvictionChoice((), 0, enough=False, reason=reason)
