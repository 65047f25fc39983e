"""The planner: from one view of the fleet and its demand, the loads and unloads to make next.

One round, all pure (the only state carried between rounds is `ScaleDownState`):
 1. Per model: copies now, desired copies and the target after hysteresis (`copies.py`).
 2. Models below target: first one copy of each model a request waits for, loaded nowhere
    (Load priority REQUESTED), then every other copy, by demand, highest first, then name. Each new
    copy goes to an instance drawn from the shortlist (`ranking.py`); when no instance has room,
    to the instance whose evictions (`eviction.py`) are coldest, the Unloads placed just before
    the Load. When neither works the model gets no action and its decision says why.
 3. Models above target shed one copy: the least recently used one past the churn guard, never
    the only copy serving (a copy Triton lists while our load of it runs serves nothing yet).

Memory is accounted as the plan goes: a load is planned only if the instance's committed bytes
(max(measured use, sum of its models) + loads in progress + loads planned - evictions planned)
plus the footprint stay within its budget. Unloads in progress free nothing until they are done.
Unhealthy instances take no part: their copies do not count, and nothing is planned on them.
Every iteration is over sorted keys; the injected random source is the only randomness.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from router.placement.actions import Action, Load, LoadPriority, Unload
from router.placement.copies import CopyCount, ScaleStep, desired_copies, scale_target
from router.placement.eviction import EvictionChoice, ResidentCopy, choose_victims, protection
from router.placement.inputs import ModelSpec, PlacementPolicy, PlanInputs
from router.placement.ledger import Ledger
from router.placement.ranking import RankedInstance, choose_instance, rank
from router.placement.text import format_bytes

__all__ = ["ModelDecision", "PlacementPlanner", "Plan", "ScaleDownState", "plan_placement"]


@dataclass(frozen=True, slots=True)
class ScaleDownState:
    """Per model, since when its demand has been below the shrink threshold."""

    low_since: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelDecision:
    """What the planner concluded for one model: the figures and reason ListModels shows."""

    model: str
    # Copies on healthy instances, counting loads in progress and not unloads in progress.
    copies: int
    desired: int
    target: int
    # max(rate, forecast, recent), requests per second.
    demand_rps: float
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    now: float
    # To be executed in this order (see `router.placement.actions` for what each means).
    actions: tuple[Action, ...]
    # One per model the planner saw, sorted by model name.
    decisions: tuple[ModelDecision, ...]
    # Carry to the next round.
    scale_down: ScaleDownState

    def decision(self, model: str) -> ModelDecision | None:
        return next((d for d in self.decisions if d.model == model), None)

    @property
    def loads(self) -> tuple[Load, ...]:
        return tuple(a for a in self.actions if isinstance(a, Load))

    @property
    def unloads(self) -> tuple[Unload, ...]:
        return tuple(a for a in self.actions if isinstance(a, Unload))


class PlacementPlanner:
    """Runs `plan_placement` round after round, carrying the scale-down timers between them."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._state = ScaleDownState()
        self.last_plan: Plan | None = None

    def plan(self, inputs: PlanInputs) -> Plan:
        plan = plan_placement(inputs, self._state, self._rng)
        self._state = plan.scale_down
        self.last_plan = plan
        return plan


def plan_placement(inputs: PlanInputs, state: ScaleDownState, rng: random.Random) -> Plan:
    """One planning round (see the module docstring)."""
    return _Round(inputs, state, rng).run()


@dataclass(slots=True)
class _ModelView:
    model: str
    spec: ModelSpec | None
    copies: int
    count: CopyCount | None
    step: ScaleStep | None
    requested: bool
    # Desired copies (eviction protection reads it); for a model without spec, its floor.
    desired: int
    reason: str
    # Instances this plan loads it on, and whether a copy could not be placed.
    placed: list[str] = field(default_factory=list)
    failed: bool = False


class _Round:
    def __init__(self, inputs: PlanInputs, state: ScaleDownState, rng: random.Random) -> None:
        self.inputs = inputs
        self.policy: PlacementPolicy = inputs.policy
        self.now = inputs.now
        self.state = state
        self.rng = rng
        self.ledger = Ledger(inputs)
        self.specs = {s.name: s for s in inputs.specs}
        self.actions: list[Action] = []
        self.low_since: dict[str, float] = {}
        self.views: dict[str, _ModelView] = {}
        self.growing: set[str] = set()

    def run(self) -> Plan:
        names = (
            set(self.specs)
            | self.ledger.models()
            | set(self.inputs.demand.models)
            | self.inputs.requested_while_absent
        )
        for model in sorted(names):
            self.views[model] = self._view(model)
        growth = [v for v in self.views.values() if v.step and v.step.target > v.copies]
        self.growing = {v.model for v in growth}
        # First the one copy each waiting request needs, then every other copy, the highest
        # demand first: a cold request never waits behind another model's extra copies.
        for view in growth:
            if view.requested:
                self._grow(view, 1, LoadPriority.REQUESTED)
        growth.sort(key=lambda v: (-_demand(v), v.model))
        for view in growth:
            assert view.step is not None
            self._grow(view, view.step.target - view.copies - len(view.placed))
        for view in self.views.values():
            if view.step and view.step.target < view.copies:
                self._shrink(view)
        decisions = tuple(
            ModelDecision(
                model=v.model,
                copies=v.copies,
                desired=v.desired,
                target=v.step.target if v.step else v.copies,
                demand_rps=_demand(v),
                reason=v.reason,
            )
            for v in self.views.values()
        )
        return Plan(self.now, tuple(self.actions), decisions, ScaleDownState(self.low_since))

    # --- per model -------------------------------------------------------------------------

    def _view(self, model: str) -> _ModelView:
        demand = self.inputs.demand.of(model)
        current = self.ledger.copies(model)
        recently_used = demand.seen_within(self.now, self.policy.keep_warm_s)
        requested = model in self.inputs.requested_while_absent and current == 0
        spec = self.specs.get(model)
        if spec is None:
            # Not placed by the planner (no footprint known); its last recently used copy is
            # still protected from eviction.
            floor = 1 if recently_used or requested else 0
            return _ModelView(
                model, None, current, None, None, requested, floor, "no placement spec: not placed"
            )
        count = desired_copies(
            spec,
            rate_rps=demand.rate_rps,
            forecast_rps=demand.forecast_rps,
            recent_rps=demand.recent_rps,
            recently_used=recently_used,
            requested=requested,
            healthy_instances=len(self.ledger.instances),
        )
        step = scale_target(
            current, count, self.policy, low_since=self.state.low_since.get(model), now=self.now
        )
        if step.low_since is not None:
            self.low_since[model] = step.low_since
        return _ModelView(model, spec, current, count, step, requested, count.desired, step.reason)

    def _grow(
        self, view: _ModelView, copies: int, priority: LoadPriority = LoadPriority.PROACTIVE
    ) -> None:
        """Plans up to `copies` more copies of the model; stops at the first that cannot go."""
        assert view.spec is not None and view.step is not None
        if view.failed:
            return
        for _ in range(copies):
            where, why_not = self._place(view.spec, priority, view.step.reason)
            if where is None:
                view.failed = True
                view.reason = f"{view.step.reason}; cannot place: {why_not}"
                if view.placed:
                    view.reason += f" (placed {len(view.placed)}: {', '.join(view.placed)})"
                return
            view.placed.append(where)
            view.reason = f"{view.step.reason}: loading on {', '.join(view.placed)}"

    def _shrink(self, view: _ModelView) -> None:
        assert view.step is not None
        if self.ledger.copies(view.model) <= view.step.target:
            return  # an eviction in this plan already took the copy
        candidates = []
        serving = self.ledger.established.get(view.model, set())
        for iid in sorted(self.ledger.counting.get(view.model, ())):
            loaded = self.ledger.instances[iid].model(view.model)
            if loaded is None or self.ledger.busy(view.model, iid):
                continue  # a load in progress, or already acted on
            if self.now - loaded.loaded_at < self.policy.churn_guard_s:
                continue
            if serving <= {iid}:
                continue  # the only copy serving: the others are still loading
            candidates.append((loaded.last_used, loaded.loaded_at, iid, loaded.memory_bytes))
        if not candidates:
            # Keep the old timer so the shrink is retried next round, not after a new cool-down.
            previous = self.state.low_since.get(view.model)
            self.low_since[view.model] = self.now if previous is None else previous
            view.reason = (
                f"{view.step.reason}; no copy to unload yet (past the churn guard, and not the "
                "only one serving)"
            )
            return
        _, _, iid, memory_bytes = min(candidates)
        self.actions.append(Unload(view.model, iid, view.step.reason, memory_bytes))
        self.ledger.release(view.model, iid, memory_bytes)
        view.reason = f"{view.step.reason}: unloading from {iid}"

    # --- placing one copy ------------------------------------------------------------------

    def _place(
        self, spec: ModelSpec, priority: LoadPriority, reason: str
    ) -> tuple[str | None, str]:
        """Plans one copy of `spec`: (instance id, "") or (None, why not)."""
        candidates, excluded = self._candidates(spec.name)
        if not candidates:
            return None, _no_candidate(excluded)
        footprint = spec.footprint_bytes
        ranked = rank(footprint, [self.ledger.room(iid) for iid in candidates], self.policy)
        pick = choose_instance(ranked, self.policy.shortlist_tolerance, self.rng)
        if pick is not None:
            self._load(spec, pick.instance_id, priority, reason, ())
            return pick.instance_id, ""

        options: list[tuple[RankedInstance, EvictionChoice]] = []
        refusals: list[str] = []
        for ranked_instance in ranked:
            iid = ranked_instance.instance_id
            choice = choose_victims(
                self._residents(iid),
                free_bytes=self.ledger.room(iid).free_bytes,
                needed_bytes=footprint,
                wanted_bytes=footprint + self.policy.headroom_buffer_bytes,
            )
            if choice.enough:
                options.append((ranked_instance, choice))
            else:
                refusals.append(f"{iid} {choice.reason}")
        if not options:
            return None, (
                f"no room for {spec.name} ({format_bytes(footprint)}) and evictions cannot "
                f"make it: {'; '.join(refusals)}"
            )
        # Coldest victims first (ModelMesh: the instance with the oldest LRU entry), then the
        # fewest evictions, then the placement score.
        target, choice = min(
            options,
            key=lambda o: (
                max(v.last_used for v in o[1].victims),
                len(o[1].victims),
                -o[0].score,
                o[0].instance_id,
            ),
        )
        iid = target.instance_id
        for victim in choice.victims:
            self.actions.append(
                Unload(
                    victim.model,
                    iid,
                    f"evict LRU to fit {spec.name}",
                    memory_bytes=victim.memory_bytes,
                    for_load=spec.name,
                )
            )
            self.ledger.release(victim.model, iid, victim.memory_bytes)
        victims = tuple(v.model for v in choice.victims)
        self._load(spec, iid, priority, f"{reason}; after evicting {', '.join(victims)}", victims)
        return iid, ""

    def _load(
        self,
        spec: ModelSpec,
        iid: str,
        priority: LoadPriority,
        reason: str,
        after_unloads: tuple[str, ...],
    ) -> None:
        room = self.ledger.room(iid)
        # The invariant the whole module is built around; a failure here is a planner bug.
        assert room.committed_bytes + spec.footprint_bytes <= room.budget_bytes, (iid, spec.name)
        self.actions.append(
            Load(spec.name, iid, reason, priority, spec.footprint_bytes, after_unloads)
        )
        self.ledger.reserve(spec.name, iid, spec.footprint_bytes)

    def _candidates(self, model: str) -> tuple[list[str], Counter[str]]:
        """Instances that may take a copy of `model`, and a count of why the others may not."""
        backoff_until: dict[str, float] = {}
        for backoff in self.inputs.backoffs:
            if backoff.model == model:
                # The latest expiry wins when one pair failed more than once.
                previous = backoff_until.get(backoff.instance_id, backoff.until)
                backoff_until[backoff.instance_id] = max(previous, backoff.until)
        present = self.ledger.present.get(model, set())
        candidates: list[str] = []
        excluded: Counter[str] = Counter()
        for iid, inst in self.ledger.instances.items():
            if (model, iid) in self.ledger.unloading:
                excluded["unloading it"] += 1
            elif iid in present:
                excluded["holding it"] += 1
            elif self.ledger.busy(model, iid):
                excluded["unloaded by this plan"] += 1
            elif backoff_until.get(iid, self.now) > self.now:
                excluded["in load backoff"] += 1
            elif inst.memory_budget_bytes <= 0:
                excluded["budget unknown"] += 1
            else:
                candidates.append(iid)
        unhealthy = len(self.inputs.instances) - len(self.ledger.instances)
        if unhealthy:
            excluded["unhealthy"] += unhealthy
        return candidates, excluded

    def _residents(self, iid: str) -> list[ResidentCopy]:
        """The copies listed on `iid`, each with what protects it from eviction."""
        residents = []
        for loaded in self.ledger.instances[iid].models:
            if (loaded.name, iid) in self.ledger.acted:
                continue  # already evicted by this plan
            view = self.views.get(loaded.name)
            stays = iid in self.ledger.established.get(loaded.name, set())
            copies_after = self.ledger.established_copies(loaded.name) - (1 if stays else 0)
            residents.append(
                ResidentCopy(
                    model=loaded.name,
                    memory_bytes=loaded.memory_bytes,
                    last_used=loaded.last_used,
                    loaded_at=loaded.loaded_at,
                    protected_because=protection(
                        loaded_at=loaded.loaded_at,
                        now=self.now,
                        churn_guard_s=self.policy.churn_guard_s,
                        copies_left_after=copies_after,
                        desired=view.desired if view else 0,
                        needed_by_plan=loaded.name in self.growing,
                        action_in_progress=(loaded.name, iid) in self.ledger.in_progress,
                    ),
                )
            )
        return residents


def _demand(view: _ModelView) -> float:
    return view.count.demand_rps if view.count else 0.0


def _no_candidate(excluded: Counter[str]) -> str:
    if not excluded:
        return "no healthy instance"
    parts = [f"{why}: {n}" for why, n in sorted(excluded.items())]
    return "no instance can take another copy (" + ", ".join(parts) + ")"
