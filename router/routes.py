"""Route tables: per model, the instances that can serve it now and how to weigh them.

`RouteBook.rebuild(snapshot)` ranks the instances for each known model (`rank` in
router/decision.py: the policy's filters and scorers, without the random pick) and keeps the
tables; a table that changed (different candidates, versions or quantised
weights) gets the next generation and goes to every watcher. Weights are quantised so that
small metric wobbles do not flood sidecars with updates.

Only the tables whose inputs changed are recomputed (router/route_inputs.py: the holders'
fields the policy reads, the draining pairs, the policy itself); the others are what a full
rebuild would make of them. `rebuild_async` does the same work in slices, giving the event
loop back between models, so PickTarget and WatchRoutes never wait behind a whole rebuild;
the tables change all at once, at its end.

`RouteBook.draining` holds (model, instance id) pairs the placement controller is about to
unload: they are left out of route tables (and of PickTarget's decisions), so that in-flight
requests can finish before the unload. `RouteBook.policy` is the decision policy both use.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Set
from dataclasses import dataclass, field

from pointsman.prefix_routing import PrefixRouting
from pointsman.versions import VersionRules
from router.contracts import FleetSnapshot, RoutingRequest, SnapshotField
from router.decision import DecisionPolicy, rank
from router.route_inputs import InputTracker

__all__ = [
    "TABLE_READS",
    "ModelRoutes",
    "RebuildStats",
    "RouteBook",
    "RouteEntry",
    "RouteUpdate",
    "version_order",
]

# Weights move in steps of this size, and never below it (a listed candidate gets some traffic).
WEIGHT_STEP = 0.05
# A watcher this many updates behind is sent a full snapshot instead.
_WATCHER_QUEUE = 64
# Snapshot fields `RouteBook.build` reads itself, beyond the policy's plugins: a rebuild
# recomputes a table when one of them changes (its other reads, such as the instance's
# address, are not snapshot fields and always count). Add here what `build` starts reading.
TABLE_READS = frozenset(
    {
        SnapshotField.READY_VERSIONS,
        SnapshotField.MAX_BATCH_SIZE,  # concurrency
        SnapshotField.INSTANCE_COUNT,  # concurrency
        SnapshotField.MAX_QUEUE_SIZE,  # queue_capacity
    }
)
# How long `rebuild_async` works before giving the event loop back (at least one model).
REBUILD_SLICE_S = 0.005


@dataclass(frozen=True, slots=True)
class RouteEntry:
    instance_id: str
    grpc_address: str
    ready_versions: tuple[str, ...]
    weight: float
    # From the model's config, for the sidecars' flow control: requests the instance executes
    # at once (0: not known) and Triton's queue bound beyond those (0: unbounded).
    concurrency: int = 0
    queue_capacity: int = 0


@dataclass(frozen=True, slots=True)
class ModelRoutes:
    model_name: str
    candidates: tuple[RouteEntry, ...]
    default_version: str
    generation: int
    # How unpinned requests choose a version (the policy's splits and header rules).
    version_rules: VersionRules = field(default_factory=VersionRules)
    # How its requests are routed by prompt prefix (the policy's); None: off.
    prefix_routing: PrefixRouting | None = None


@dataclass(frozen=True, slots=True)
class RebuildStats:
    """What the last rebuild did: the tables it recomputed (of `models` known), the time it
    spent working and the slices it took (`rebuild_async` yields between them)."""

    recomputed: tuple[str, ...]
    models: int
    busy_s: float
    slices: int


@dataclass(frozen=True, slots=True)
class RouteUpdate:
    """What a watcher receives: changed tables, or all of them when `full` is set."""

    full: bool
    tables: tuple[ModelRoutes, ...]
    removed: tuple[str, ...]
    generation: int


def version_order(version: str) -> tuple[int, int | str]:
    """Sort key of Triton version names: numbers by value, after any non-numeric name."""
    return (1, int(version)) if version.isdigit() else (0, version)


@functools.lru_cache(maxsize=1024)
def _sorted_versions(versions: frozenset[str]) -> tuple[str, ...]:
    # Cached: a fleet has few distinct version sets, and a table lists every holder's.
    return tuple(sorted(versions, key=version_order))


def _quantise(weight: float) -> float:
    return max(WEIGHT_STEP, round(round(weight / WEIGHT_STEP) * WEIGHT_STEP, 6))


class RouteBook:
    """The current route tables and the watchers that follow them."""

    def __init__(self, policy: DecisionPolicy, *, ttl_ms: int) -> None:
        # Swapped whole on a policy reload; PickTarget decides with it too.
        self.policy = policy
        self.ttl_ms = ttl_ms
        self.generation = 0
        self.tables: dict[str, ModelRoutes] = {}
        # (model, instance id) pairs being drained before an unload: never routed to.
        self.draining: set[tuple[str, str]] = set()
        self._watchers: set[asyncio.Queue[RouteUpdate | None]] = set()
        self._inputs = InputTracker(TABLE_READS)
        self.last_rebuild = RebuildStats(recomputed=(), models=0, busy_s=0.0, slices=0)

    def build(
        self,
        snapshot: FleetSnapshot,
        model_name: str,
        now: float,
        *,
        policy: DecisionPolicy | None = None,
        draining: Set[tuple[str, str]] | None = None,
    ) -> list[RouteEntry]:
        """The model's ready instances, weighted by total relative to the best (under the
        book's policy and draining pairs unless given)."""
        ranking = rank(
            RoutingRequest(model_name=model_name),
            snapshot,
            policy or self.policy,
            now=now,
            draining=self.draining if draining is None else draining,
        )
        ranked = [
            s
            for s in ranking.targets
            if (m := s.candidate.instance.model(model_name)) and m.is_ready
        ]
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
                    ready_versions=_sorted_versions(model.ready_versions),
                    weight=_quantise(scored.total / best if best > 0 else 1.0),
                    concurrency=model.concurrency,
                    queue_capacity=model.max_queue_size,
                )
            )
        return entries

    def rebuild(self, snapshot: FleetSnapshot, now: float) -> RouteUpdate | None:
        """Recomputes the tables whose inputs changed; returns (and sends to watchers) what
        changed, if anything. Blocks until done: the router's loop uses `rebuild_async`."""
        started = time.perf_counter()
        steps = self._rebuild_steps(snapshot, now)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: tuple[RouteUpdate | None, tuple[str, ...]] = done.value
                break
        update, recomputed = result
        busy_s = time.perf_counter() - started
        self.last_rebuild = RebuildStats(recomputed, len(snapshot.known_models), busy_s, 1)
        return update

    async def rebuild_async(
        self,
        snapshot: FleetSnapshot,
        now: float,
        *,
        slice_s: float = REBUILD_SLICE_S,
        timer: Callable[[], float] = time.perf_counter,
    ) -> RouteUpdate | None:
        """`rebuild`, giving the event loop back whenever a slice has worked `slice_s`
        (between two models, or two batches of instances compared)."""
        steps = self._rebuild_steps(snapshot, now)
        busy_s, slices = 0.0, 1
        started = timer()
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: tuple[RouteUpdate | None, tuple[str, ...]] = done.value
                break
            if timer() - started >= slice_s:
                busy_s += timer() - started
                await asyncio.sleep(0)
                slices += 1
                started = timer()
        busy_s += timer() - started
        update, recomputed = result
        self.last_rebuild = RebuildStats(recomputed, len(snapshot.known_models), busy_s, slices)
        return update

    def invalidate(self) -> None:
        """The next rebuild recomputes every table (as it does after a policy change)."""
        self._inputs.forget()

    def _rebuild_steps(
        self, snapshot: FleetSnapshot, now: float
    ) -> Generator[None, None, tuple[RouteUpdate | None, tuple[str, ...]]]:
        """Yields between units of work; returns the update and the tables recomputed."""
        # One policy and one set of draining pairs for the whole rebuild, even across yields.
        policy, draining = self.policy, frozenset(self.draining)
        changes = yield from self._inputs.changes(snapshot, now, policy, draining)
        new = snapshot.known_models - self.tables.keys()
        computed: dict[str, tuple[RouteEntry, ...]] = {}
        for model_name in sorted(changes.dirty(snapshot.known_models) | new):
            yield
            entries = self.build(snapshot, model_name, now, policy=policy, draining=draining)
            computed[model_name] = tuple(entries)
        update = self._publish(snapshot.known_models, computed, policy)
        # Only now: a rebuild that failed or was cancelled half-way leaves its work to the next.
        self._inputs.commit(changes)
        return update, tuple(computed)

    def _publish(
        self,
        known_models: Set[str],
        computed: Mapping[str, tuple[RouteEntry, ...]],
        policy: DecisionPolicy,
    ) -> RouteUpdate | None:
        """Keeps the recomputed tables that differ, under the next generation, and sends them."""
        changed: list[ModelRoutes] = []
        next_generation = self.generation + 1
        for model_name in sorted(computed):
            entries = computed[model_name]
            rules = policy.rules_for(model_name)
            prefix = policy.prefix_for(model_name)
            old = self.tables.get(model_name)
            if (
                old is not None
                and old.candidates == entries
                and old.version_rules == rules
                and old.prefix_routing == prefix
            ):
                continue
            versions = {v for e in entries for v in e.ready_versions}
            table = ModelRoutes(
                model_name=model_name,
                candidates=entries,
                default_version=max(versions, key=version_order) if versions else "",
                generation=next_generation,
                version_rules=rules,
                prefix_routing=prefix,
            )
            self.tables[model_name] = table
            changed.append(table)
        removed = tuple(sorted(self.tables.keys() - known_models))
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
