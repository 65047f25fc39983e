"""Placement: which models to load where, and which to unload, as pure planning.

The planner reads frozen inputs (instances with their memory and models, model specs, demand,
failed-load backoffs, actions in progress, the clock's `now`, policy) and proposes an ordered list
of `Load` and `Unload` actions, each with the reason operators see. It does no I/O; an executor in
the router carries the actions out (Unload = remove from routes, drain, then unload).

Modules:
    inputs.py     what the planner is given
    actions.py    what it proposes, and what the executor must do with each
    copies.py     copies desired from demand; grow at once, shrink one per cool-down
    ranking.py    where a new copy goes: fit, headroom and load; a random pick among the near-best
    eviction.py   what to evict from a full instance: LRU, with the protections
    planner.py    one planning round over all models; `PlacementPlanner` carries its timers
    text.py       figures as operators read them

The router's side that acts on plans does I/O and is not re-exported here:
    control.py     Triton's explicit model control (load, unload, wait until unloaded)
    executor.py    runs actions on per-instance lanes: drain before unload, backoff on failure
    controller.py  each tick: PlanInputs from the fleet snapshot and demand, plan, execute
"""

from router.placement.actions import Action, Load, LoadPriority, Unload
from router.placement.copies import (
    CopyBound,
    CopyCount,
    ScaleStep,
    copies_for_demand,
    desired_copies,
    scale_target,
)
from router.placement.eviction import EvictionChoice, ResidentCopy, choose_victims, protection
from router.placement.inputs import (
    InstanceState,
    LoadBackoff,
    LoadedModel,
    ModelSpec,
    PlacementPolicy,
    PlanInputs,
)
from router.placement.planner import (
    ModelDecision,
    PlacementPlanner,
    Plan,
    ScaleDownState,
    plan_placement,
)
from router.placement.ranking import (
    Fit,
    RankedInstance,
    RoomOnInstance,
    choose_instance,
    rank,
    shortlist,
)

__all__ = [
    "Action",
    "CopyBound",
    "CopyCount",
    "EvictionChoice",
    "Fit",
    "InstanceState",
    "Load",
    "LoadBackoff",
    "LoadPriority",
    "LoadedModel",
    "ModelDecision",
    "ModelSpec",
    "PlacementPlanner",
    "PlacementPolicy",
    "Plan",
    "PlanInputs",
    "RankedInstance",
    "ResidentCopy",
    "RoomOnInstance",
    "ScaleDownState",
    "ScaleStep",
    "Unload",
    "choose_instance",
    "choose_victims",
    "copies_for_demand",
    "desired_copies",
    "plan_placement",
    "protection",
    "rank",
    "scale_target",
    "shortlist",
]
