"""One routing decision: `decide(request, snapshot, policy) -> Decision`.

PickTarget (router/service.py), the route tables (router/routes.py) and the scale benchmark
all decide here, by one path:

    decide           the version an unpinned request gets (pin header, the policy's rules),
      rank           then the candidates: the model's holders (or every instance), less those
                     draining it, with the load the router assumed since the last refresh;
                     filters -> weighted scorers (router/scheduling.py), best total first;
      picker         then the profile's picker: the pick first, the fallbacks after it.

Route tables need the ranking without the random pick: they call `rank`, which `decide` calls.
Pure apart from the random source handed in: no I/O, no clock, nothing recorded (PickTarget
records its pick in `AssumedLoad` itself).
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Mapping, Set
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from pointsman.errors import ConfigError
from pointsman.prefix_routing import PrefixRouting
from pointsman.versions import PIN_HEADER, VersionRules, select_version
from router.contracts import (
    Candidate,
    Filter,
    FleetSnapshot,
    RoutingRequest,
    SchedulingCycle,
    ScoredCandidate,
    Scorer,
)
from router.datalayer.fields import CollectedFields
from router.scheduling import FilterTrace, SchedulingProfile, rank_candidates, run_filters

__all__ = [
    "AssumedLoad",
    "Decision",
    "DecisionPolicy",
    "candidates_for",
    "check_inputs",
    "choose_version",
    "decide",
    "rank",
]

_NO_RULES: Final = VersionRules()


@dataclass(frozen=True, slots=True)
class DecisionPolicy:
    """What a decision takes from the policy: the scheduling profile, the version rules and
    the prefix routing. Swapped whole on a reload, so a decision sees one policy or the
    other, never a mix."""

    profile: SchedulingProfile
    # Model name -> how its unpinned requests choose a version; models not listed: no rules.
    version_rules: Mapping[str, VersionRules] = field(default_factory=lambda: MappingProxyType({}))
    # Model name -> its prefix routing; models not listed declare no prompt input (off).
    prefix_routing: Mapping[str, PrefixRouting] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def rules_for(self, model_name: str) -> VersionRules:
        return self.version_rules.get(model_name, _NO_RULES)

    def prefix_for(self, model_name: str) -> PrefixRouting | None:
        return self.prefix_routing.get(model_name)


@dataclass(frozen=True, slots=True)
class Decision:
    """What was decided for one request, and why."""

    # The request as decided: `model_version` is the version chosen ("" = the highest ready).
    request: RoutingRequest
    # From `decide`: the pick first, then the fallbacks in order. From `rank`: every survivor
    # by total, best first. Each carries its total and its score per scorer. Empty: none.
    targets: tuple[ScoredCandidate, ...]
    # What each filter removed; after a decision without targets, over every instance.
    filters: FilterTrace

    @property
    def pick(self) -> ScoredCandidate | None:
        return self.targets[0] if self.targets else None

    def best(self, count: int) -> list[ScoredCandidate]:
        """The `count` highest totals, best first (the pick need not be among them)."""
        return sorted(self.targets, key=lambda s: s.total, reverse=True)[:count]


class AssumedLoad:
    """Requests routed through PickTarget that Triton's metrics cannot show yet.

    Each pick counts against its instance for `window_s` (about two metric scrapes), so a
    burst of picks does not all land on the instance whose queue looked shortest.
    """

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._picks: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)

    def add(self, instance_id: str, model_name: str, now: float) -> None:
        self._picks[(instance_id, model_name)].append(now)

    def count(self, instance_id: str, model_name: str, now: float) -> int:
        picks = self._picks.get((instance_id, model_name))
        if not picks:
            return 0
        while picks and now - picks[0] > self._window_s:
            picks.popleft()
        return len(picks)


def decide(
    request: RoutingRequest,
    snapshot: FleetSnapshot,
    policy: DecisionPolicy,
    *,
    now: float,
    rng: random.Random,
    assumed: AssumedLoad | None = None,
    draining: Set[tuple[str, str]] = frozenset(),
) -> Decision:
    """The version, the pick and its fallbacks for `request`; no targets when nothing can
    serve it, and then `filters` says why, over every instance. `draining` holds (model,
    instance id) pairs that must get no new request."""
    if not request.model_version:
        version = choose_version(request, snapshot, policy, rng)
        if version:
            request = replace(request, model_version=version)
    cycle = _cycle(request, policy, now)
    ranked, trace = _rank(cycle, snapshot, policy.profile, assumed, draining)
    if ranked:
        return Decision(request, tuple(policy.profile.picker.pick(ranked, rng)), trace)
    if policy.profile.only_model_holders:
        # The slow path, for the message only: every instance, so the trace says why each
        # failed, not only the holders.
        everyone = candidates_for(snapshot, request.model_name, assumed, now, draining)
        trace = run_filters(policy.profile, cycle, everyone)[1]
    return Decision(request, (), trace)


def rank(
    request: RoutingRequest,
    snapshot: FleetSnapshot,
    policy: DecisionPolicy,
    *,
    now: float,
    assumed: AssumedLoad | None = None,
    draining: Set[tuple[str, str]] = frozenset(),
) -> Decision:
    """Every candidate that survives the filters, by weighted total, best first (no pick)."""
    cycle = _cycle(request, policy, now)
    ranked, trace = _rank(cycle, snapshot, policy.profile, assumed, draining)
    return Decision(request, tuple(ranked), trace)


def _cycle(request: RoutingRequest, policy: DecisionPolicy, now: float) -> SchedulingCycle:
    return SchedulingCycle(request=request, now=now, prefix=policy.prefix_for(request.model_name))


def _rank(
    cycle: SchedulingCycle,
    snapshot: FleetSnapshot,
    profile: SchedulingProfile,
    assumed: AssumedLoad | None,
    draining: Set[tuple[str, str]],
) -> tuple[list[ScoredCandidate], FilterTrace]:
    """What `decide` and `rank` share: the candidates, filtered, scored and sorted."""
    candidates = candidates_for(
        snapshot,
        cycle.request.model_name,
        assumed,
        cycle.now,
        draining,
        only_holders=profile.only_model_holders,
    )
    return rank_candidates(profile, cycle, candidates)


def candidates_for(
    snapshot: FleetSnapshot,
    model_name: str,
    assumed: AssumedLoad | None,
    now: float,
    draining: Set[tuple[str, str]] = frozenset(),
    *,
    only_holders: bool = False,
) -> list[Candidate]:
    """Every instance as a candidate for `model_name`, except those draining it; with
    `only_holders`, only the instances where the model is ready or loading (what a profile's
    `only_model_holders` allows)."""
    instances = snapshot.holders(model_name) if only_holders else snapshot.instances
    if assumed is None:  # route tables: no assumed load, the cheaper loop (once per holder)
        return [
            Candidate(inst) for inst in instances if (model_name, inst.instance_id) not in draining
        ]
    return [
        Candidate(inst, assumed.count(inst.instance_id, model_name, now))
        for inst in instances
        if (model_name, inst.instance_id) not in draining
    ]


def choose_version(
    request: RoutingRequest, snapshot: FleetSnapshot, policy: DecisionPolicy, rng: random.Random
) -> str:
    """The version an unpinned request gets: the x-model-version header, else the policy's
    header rules and split over the versions ready somewhere, else "" (the highest ready)."""
    pinned = request.headers.get(PIN_HEADER)
    if pinned:
        return pinned
    rules = policy.rules_for(request.model_name)
    if rules.is_empty:
        return ""
    available = {
        version
        for inst in snapshot.holders(request.model_name)
        if (model := inst.model(request.model_name))
        for version in model.ready_versions
    }
    return select_version(rules, request.headers, rng, available) or ""


def check_inputs(
    profile: SchedulingProfile, collected: CollectedFields, *, path: str = "scheduling"
) -> None:
    """Raises ConfigError naming the first filter or scorer that reads a snapshot field no
    running collector fills, e.g. 'scheduling.scorers[1] (queue-depth): reads
    model.pending_requests, which no running collector fills (metrics scraping is off: ...)'."""
    plugins: list[tuple[str, Filter | Scorer]]
    plugins = [(f"filters[{i}]", plugin) for i, plugin in enumerate(profile.filters)]
    plugins += [(f"scorers[{i}]", plugin) for i, (plugin, _) in enumerate(profile.scorers)]
    for at, plugin in plugins:
        for consumed in sorted(plugin.CONSUMES):
            if consumed not in collected.filled:
                why = collected.unfilled_because.get(consumed, "no collector fills it")
                raise ConfigError(
                    f"{path}.{at} ({plugin.name}): reads {consumed}, "
                    f"which no running collector fills ({why})"
                )
