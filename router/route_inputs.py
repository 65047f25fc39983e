"""What each route table depends on, so that a rebuild recomputes only the tables that may differ.

A model's table (router/routes.py) is a function of:

- the decision policy (the profile and the version rules): a new policy object (a reload)
  changes every table;
- the model's candidates, in snapshot order: its holders, or every instance when no filter of
  the profile keeps holders only (`SchedulingProfile.only_model_holders`);
- of each candidate, every field of the instance and of the model on it, except the snapshot
  fields (`SnapshotField`) that neither the profile's filters and scorers (`CONSUMES`) nor the
  table itself read. Fields are left out by name, so one added later counts until it is
  declared unread: a new input can cost a recomputation, never a stale table;
- the (model, instance) pairs being drained.

`InputTracker.changes` compares these with those of the last rebuild and names the models whose
table may differ; `InputTracker.commit` keeps them once those tables are published. An instance
whose field changed dirties every model it holds (scorers compare candidates with each other),
a change of one model on it dirties that model only.

Time. An instance's `refreshed_at` moves on every refresh, while what a filter makes of it (fresh
or stale) seldom changes. So for each filter that reads it the tracker keeps the filter's verdict
on the instance alone at the rebuild's `now` (with a request naming no model), not the time
itself: such a filter must judge an instance by itself (as every filter does, see
`router.contracts.Filter`) and alike for every model. A scorer that reads it scores continuously,
so every table is then recomputed at each rebuild. No plugin reads `cycle.now` otherwise.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from collections.abc import Callable, Generator, Mapping, Sequence, Set
from dataclasses import dataclass

from router.contracts import (
    Candidate,
    Filter,
    FleetSnapshot,
    InstanceSnapshot,
    ModelOnInstance,
    RoutingRequest,
    SchedulingCycle,
    SnapshotField,
)
from router.decision import DecisionPolicy
from router.scheduling import SchedulingProfile

__all__ = ["InputChanges", "InputTracker"]

# Instances compared between two yields of `changes` (a few milliseconds on a large fleet).
INSTANCES_PER_STEP = 100
# Fields that are no input of their own: the identity, the models (compared one by one), and
# the view's age (its filters' verdicts stand for it).
_NOT_COMPARED = frozenset({"instance_id", "models", "refreshed_at", "name"})
_ABSENT = object()
_NO_MODEL = RoutingRequest(model_name="")


def _compared(kind: type, prefix: str, read: Set[SnapshotField]) -> list[str]:
    """The fields of `kind` (snapshot fields `prefix.*`) that a table's inputs include."""
    unread = {f.value for f in SnapshotField if f not in read}
    return [
        f.name
        for f in dataclasses.fields(kind)
        if f.name not in _NOT_COMPARED and f"{prefix}.{f.name}" not in unread
    ]


def _getter(names: list[str]) -> Callable[[object], object]:
    """A function of an object to the values of `names` (one value, a tuple, or ())."""
    return operator.attrgetter(*names) if names else lambda _: ()


@dataclass(frozen=True, slots=True)
class _Reads:
    """What the tables read of a snapshot under one profile."""

    instance: Callable[[object], object]
    model: Callable[[object], object]
    # Filters that read an instance's age: their verdicts are compared instead.
    age_filters: tuple[Filter, ...]
    # A scorer reads an instance's age: every table changes with time.
    every_rebuild: bool
    holders_only: bool

    @classmethod
    def of(cls, profile: SchedulingProfile, table_reads: Set[SnapshotField]) -> _Reads:
        filters_read = {f for flt in profile.filters for f in flt.CONSUMES}
        scorers_read = {f for scorer, _ in profile.scorers for f in scorer.CONSUMES}
        read = filters_read | scorers_read | set(table_reads)
        return cls(
            instance=_getter(_compared(InstanceSnapshot, "instance", read)),
            model=_getter(_compared(ModelOnInstance, "model", read)),
            age_filters=tuple(
                flt for flt in profile.filters if SnapshotField.REFRESHED_AT in flt.CONSUMES
            ),
            every_rebuild=SnapshotField.REFRESHED_AT in scorers_read,
            holders_only=profile.only_model_holders,
        )

    def verdicts(
        self, instances: Sequence[InstanceSnapshot], now: float
    ) -> dict[str, tuple[bool, ...]]:
        """Instance id -> whether each age filter keeps it at `now` (all in one call per
        filter: a filter judges each candidate on its own)."""
        if not self.age_filters:
            return {}
        cycle = SchedulingCycle(request=_NO_MODEL, now=now)
        candidates = [Candidate(instance=inst) for inst in instances]
        kept = [{c.instance_id for c in flt.filter(cycle, candidates)} for flt in self.age_filters]
        return {c.instance_id: tuple(c.instance_id in k for k in kept) for c in candidates}


@dataclass(slots=True)
class _Seen:
    """One instance as the last rebuild read it."""

    # The object last read: the same object again needs no comparing. Moved to an equal new
    # object in place, so that an unchanged instance allocates nothing that outlives a rebuild
    # (fewer survivors, fewer full garbage collections on a large fleet).
    instance: InstanceSnapshot
    key: object
    verdicts: tuple[bool, ...]
    models: dict[str, object]


@dataclass(frozen=True, slots=True)
class _State:
    policy: DecisionPolicy
    seen: dict[str, _Seen]
    # Instance ids in snapshot order (candidates keep it: it breaks ties between totals).
    order: tuple[str, ...]
    draining: dict[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class InputChanges:
    """The models whose table may differ from the last rebuild's (`everything`: all)."""

    everything: bool
    models: frozenset[str]
    _state: _State

    def dirty(self, known_models: Set[str]) -> set[str]:
        """The known models to recompute."""
        return set(known_models) if self.everything else set(self.models & known_models)


class InputTracker:
    """The inputs of every table at the last published rebuild. `table_reads` are the snapshot
    fields the route tables read themselves, beyond the plugins' `CONSUMES`."""

    def __init__(self, table_reads: Set[SnapshotField]) -> None:
        self._table_reads = frozenset(table_reads)
        self._reads: tuple[SchedulingProfile, _Reads] | None = None
        self._state: _State | None = None

    def forget(self) -> None:
        """The next rebuild recomputes every table."""
        self._state = None

    def commit(self, changes: InputChanges) -> None:
        """The tables `changes` named are published: their inputs are the ones to compare."""
        self._state = changes._state

    def changes(
        self,
        snapshot: FleetSnapshot,
        now: float,
        policy: DecisionPolicy,
        draining: Set[tuple[str, str]],
    ) -> Generator[None, None, InputChanges]:
        """What changed since the last commit; yields every `INSTANCES_PER_STEP` instances."""
        reads = self._reads_of(policy.profile)
        old = self._state
        old_seen = old.seen if old is not None else {}
        seen: dict[str, _Seen] = {}
        dirty: set[str] = set()
        instance_changed = False
        verdicts = reads.verdicts(snapshot.instances, now)
        for count, inst in enumerate(snapshot.instances, start=1):
            if count % INSTANCES_PER_STEP == 0:
                yield
            before = old_seen.get(inst.instance_id)
            now_seen = _read(reads, inst, verdicts.get(inst.instance_id, ()), before)
            seen[inst.instance_id] = now_seen
            if before is None:
                dirty.update(now_seen.models)
                instance_changed = True
            elif now_seen is not before:
                if now_seen.key != before.key or now_seen.verdicts != before.verdicts:
                    dirty.update(now_seen.models)
                    dirty.update(before.models)
                    instance_changed = True
                else:
                    dirty.update(_changed_models(before.models, now_seen.models))
        for gone in old_seen.keys() - seen.keys():
            dirty.update(old_seen[gone].models)
            instance_changed = True
        order = tuple(inst.instance_id for inst in snapshot.instances)
        drained = _by_model(draining)
        state = _State(policy, seen, order, drained)
        everything = (
            old is None
            or old.policy is not policy
            or reads.every_rebuild
            or len(seen) != len(order)  # an id twice: tables cannot be told apart by id
            or (not reads.holders_only and (instance_changed or order != old.order))
        )
        if old is not None and not everything:
            if order != old.order:
                dirty.update(_reordered_models(old, state))
            dirty.update(_changed_models(old.draining, drained))
        return InputChanges(everything, frozenset(dirty), state)

    def _reads_of(self, profile: SchedulingProfile) -> _Reads:
        if self._reads is None or self._reads[0] is not profile:
            self._reads = (profile, _Reads.of(profile, self._table_reads))
        return self._reads[1]


def _read(
    reads: _Reads, inst: InstanceSnapshot, verdicts: tuple[bool, ...], before: _Seen | None
) -> _Seen:
    """`before` when nothing the tables read of `inst` changed, else a new reading."""
    if before is not None and before.instance is inst:
        if before.verdicts == verdicts:
            return before
        return _Seen(inst, before.key, verdicts, before.models)
    key = reads.instance(inst)
    models = {name: reads.model(model) for name, model in inst.models.items()}
    if (
        before is not None
        and before.key == key
        and before.verdicts == verdicts
        and before.models == models
    ):
        before.instance = inst
        return before
    return _Seen(inst, key, verdicts, models)


def _changed_models(before: Mapping[str, object], after: Mapping[str, object]) -> list[str]:
    """The names whose value differs, appeared or went."""
    if before == after:
        return []
    names = before.keys() | after.keys()
    return [n for n in names if before.get(n, _ABSENT) != after.get(n, _ABSENT)]


def _reordered_models(old: _State, new: _State) -> list[str]:
    """The models whose holders come in another order (instances joined, left or moved)."""

    def holders(state: _State) -> dict[str, tuple[str, ...]]:
        by_model: defaultdict[str, list[str]] = defaultdict(list)
        for instance_id in state.order:
            for name in state.seen[instance_id].models:
                by_model[name].append(instance_id)
        return {name: tuple(ids) for name, ids in by_model.items()}

    return _changed_models(holders(old), holders(new))


def _by_model(draining: Set[tuple[str, str]]) -> dict[str, frozenset[str]]:
    by_model: defaultdict[str, set[str]] = defaultdict(set)
    for model, instance_id in draining:
        by_model[model].add(instance_id)
    return {model: frozenset(ids) for model, ids in by_model.items()}
