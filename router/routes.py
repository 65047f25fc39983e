"""Route tables: per model, the instances that can serve it now and how to weigh them.

`RouteBook.rebuild(snapshot)` runs the scheduler's filters and scorers for every known model
and keeps the tables; a table that changed (different candidates, versions or quantised
weights) gets the next generation and goes to every watcher. Weights are quantised so that
small metric wobbles do not flood sidecars with updates.

`RouteBook.draining` holds (model, instance id) pairs the placement controller is about to
unload: they are left out of route tables (and of PickTarget's candidates, through
`candidates_for`), so that in-flight requests can finish before the unload.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field

from pointsman.versions import VersionRules
from router.contracts import Candidate, FleetSnapshot, RoutingRequest, SchedulingCycle
from router.scheduling import Scheduler

__all__ = ["AssumedLoad", "ModelRoutes", "RouteBook", "RouteEntry", "RouteUpdate"]

# Weights move in steps of this size, and never below it (a listed candidate gets some traffic).
WEIGHT_STEP = 0.05
# A watcher this many updates behind is sent a full snapshot instead.
_WATCHER_QUEUE = 64


@dataclass(frozen=True, slots=True)
class RouteEntry:
    instance_id: str
    grpc_address: str
    ready_versions: tuple[str, ...]
    weight: float


@dataclass(frozen=True, slots=True)
class ModelRoutes:
    model_name: str
    candidates: tuple[RouteEntry, ...]
    default_version: str
    generation: int
    # How unpinned requests choose a version (the policy's splits and header rules).
    version_rules: VersionRules = field(default_factory=VersionRules)


@dataclass(frozen=True, slots=True)
class RouteUpdate:
    """What a watcher receives: changed tables, or all of them when `full` is set."""

    full: bool
    tables: tuple[ModelRoutes, ...]
    removed: tuple[str, ...]
    generation: int


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)


def _quantise(weight: float) -> float:
    return max(WEIGHT_STEP, round(round(weight / WEIGHT_STEP) * WEIGHT_STEP, 6))


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
    `only_holders`, only the instances where the model is ready or loading (what the
    scheduler's `only_model_holders` allows)."""
    instances = snapshot.holders(model_name) if only_holders else snapshot.instances
    return [
        Candidate(
            instance=inst,
            assumed_inflight=assumed.count(inst.instance_id, model_name, now) if assumed else 0,
        )
        for inst in instances
        if (model_name, inst.instance_id) not in draining
    ]


class RouteBook:
    """The current route tables and the watchers that follow them."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        ttl_ms: int,
        rules_for: Callable[[str], VersionRules] = lambda _model: VersionRules(),
    ) -> None:
        self.scheduler = scheduler
        # The policy's version rules per model; swapped with the policy on a reload.
        self.rules_for = rules_for
        self.ttl_ms = ttl_ms
        self.generation = 0
        self.tables: dict[str, ModelRoutes] = {}
        # (model, instance id) pairs being drained before an unload: never routed to.
        self.draining: set[tuple[str, str]] = set()
        self._watchers: set[asyncio.Queue[RouteUpdate | None]] = set()

    def build(self, snapshot: FleetSnapshot, model_name: str, now: float) -> list[RouteEntry]:
        cycle = SchedulingCycle(request=RoutingRequest(model_name=model_name), now=now)
        candidates = candidates_for(
            snapshot,
            model_name,
            None,
            now,
            self.draining,
            only_holders=self.scheduler.only_model_holders,
        )
        ranked = self.scheduler.rank(cycle, candidates)
        ranked = [s for s in ranked if (m := s.candidate.instance.model(model_name)) and m.is_ready]
        if not ranked:
            return []
        best = max(s.total for s in ranked) or 1.0
        entries = []
        for scored in ranked:
            inst = scored.candidate.instance
            model = inst.model(model_name)
            assert model is not None
            entries.append(
                RouteEntry(
                    instance_id=inst.instance_id,
                    grpc_address=inst.grpc_address,
                    ready_versions=tuple(sorted(model.ready_versions, key=_version_key)),
                    weight=_quantise(scored.total / best if best > 0 else 1.0),
                )
            )
        return entries

    def rebuild(self, snapshot: FleetSnapshot, now: float) -> RouteUpdate | None:
        """Recomputes every table; returns (and sends to watchers) what changed, if anything."""
        changed: list[ModelRoutes] = []
        next_generation = self.generation + 1
        for model_name in sorted(snapshot.known_models):
            entries = tuple(self.build(snapshot, model_name, now))
            rules = self.rules_for(model_name)
            old = self.tables.get(model_name)
            if old is not None and old.candidates == entries and old.version_rules == rules:
                continue
            versions = {v for e in entries for v in e.ready_versions}
            table = ModelRoutes(
                model_name=model_name,
                candidates=entries,
                default_version=max(versions, key=_version_key) if versions else "",
                generation=next_generation,
                version_rules=rules,
            )
            self.tables[model_name] = table
            changed.append(table)
        removed = tuple(sorted(set(self.tables) - snapshot.known_models))
        for model_name in removed:
            del self.tables[model_name]
        if not changed and not removed:
            return None
        self.generation = next_generation
        update = RouteUpdate(
            full=False, tables=tuple(changed), removed=removed, generation=self.generation
        )
        for queue in self._watchers:
            self._offer(queue, update)
        return update

    def full_update(self) -> RouteUpdate:
        return RouteUpdate(
            full=True,
            tables=tuple(self.tables[name] for name in sorted(self.tables)),
            removed=(),
            generation=self.generation,
        )

    def _offer(self, queue: asyncio.Queue[RouteUpdate | None], update: RouteUpdate) -> None:
        if queue.full():
            # A slow watcher skips the backlog and gets everything at once.
            while not queue.empty():
                queue.get_nowait()
            update = self.full_update()
        queue.put_nowait(update)

    def watch(self) -> asyncio.Queue[RouteUpdate | None]:
        """A queue that gets a full snapshot now and every update after; `None` ends it."""
        queue: asyncio.Queue[RouteUpdate | None] = asyncio.Queue(maxsize=_WATCHER_QUEUE)
        queue.put_nowait(self.full_update())
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[RouteUpdate | None]) -> None:
        self._watchers.discard(queue)

    def close_watchers(self) -> None:
        for queue in self._watchers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        self._watchers.clear()

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    def models(self) -> Iterable[str]:
        return self.tables.keys()
