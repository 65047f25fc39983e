"""Route rebuilds recompute only the tables whose inputs changed, and say what a full one would."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointsman.versions import VersionRules
from router.contracts import (
    Candidate,
    FleetSnapshot,
    InstanceSnapshot,
    ModelOnInstance,
    SchedulingCycle,
    SnapshotField,
)
from router.decision import DecisionPolicy
from router.plugins.registry import (
    DEFAULT_PROFILE_DATA,
    build_profile,
    default_profile,
    default_registry,
)
from router.routes import RouteBook
from router.scheduling import SchedulingProfile

NOW = 100.0
MODELS = ("a", "b", "c", "d")


def _instance(
    instance_id: str, models: Sequence[str], *, pending: int = 0, ips: float = 0.0
) -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=instance_id,
        grpc_address=f"{instance_id}:8001",
        healthy=True,
        refreshed_at=NOW,
        models={
            name: ModelOnInstance(name, ready_versions=frozenset({"1"}), pending_requests=pending)
            for name in models
        },
        memory_used_bytes=100,
        memory_budget_bytes=1000,
        inferences_per_second=ips,
    )


def _snapshot(*instances: InstanceSnapshot, known: Sequence[str] = MODELS) -> FleetSnapshot:
    names = {m for i in instances for m in i.models} | set(known)
    return FleetSnapshot(taken_at=NOW, instances=instances, known_models=frozenset(names))


def _fleet() -> list[InstanceSnapshot]:
    """i0 holds a and b, i1 holds b and c, i2 holds c and d, i3 holds d."""
    return [
        _instance("i0", ("a", "b"), pending=1, ips=10.0),
        _instance("i1", ("b", "c"), pending=2, ips=20.0),
        _instance("i2", ("c", "d"), pending=3, ips=30.0),
        _instance("i3", ("d",), pending=4, ips=40.0),
    ]


def _book(profile: SchedulingProfile | None = None) -> RouteBook:
    return RouteBook(DecisionPolicy(profile or default_profile()), ttl_ms=1000)


def _model(inst: InstanceSnapshot, name: str, **changes: Any) -> InstanceSnapshot:
    models = dict(inst.models)
    models[name] = replace(models[name], **changes)
    return replace(inst, models=models)


def _rebuilt(book: RouteBook, fleet: Sequence[InstanceSnapshot], now: float = NOW) -> set[str]:
    book.rebuild(_snapshot(*fleet), now)
    return set(book.last_rebuild.recomputed)


def test_first_rebuild_recomputes_every_table_and_an_unchanged_one_none() -> None:
    book, fleet = _book(), _fleet()
    assert _rebuilt(book, fleet) == set(MODELS)
    assert _rebuilt(book, fleet) == set()
    # Equal copies (what the collector makes at each refresh) are no change either.
    assert _rebuilt(book, [replace(i, models=dict(i.models)) for i in fleet]) == set()
    assert book.generation == 1


def test_an_instance_metric_recomputes_only_the_models_that_instance_holds() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    fleet[1] = replace(fleet[1], inferences_per_second=500.0)  # read by the load scorer
    assert _rebuilt(book, fleet) == {"b", "c"}


def test_a_model_metric_recomputes_only_that_model() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    fleet[1] = _model(fleet[1], "c", pending_requests=50)  # read by queue-depth
    assert _rebuilt(book, fleet) == {"c"}
    weights = {e.instance_id: e.weight for e in book.tables["c"].candidates}
    assert weights["i1"] < weights["i2"] == 1.0


def test_fields_no_plugin_reads_recompute_nothing() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    fleet[0] = replace(fleet[0], gpu_utilization=0.9, pending_requests=77, refreshed_at=NOW + 0.2)
    fleet[1] = _model(fleet[1], "b", average_batch_size=4.0, declared_memory_bytes=9)
    assert _rebuilt(book, fleet, NOW + 0.3) == set()


def test_a_field_added_to_the_model_counts_until_declared_unread() -> None:
    # Anything of the model the table may list (an address, versions, capacity a later change
    # adds) is an input unless it is a snapshot field nobody reads.
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    fleet[2] = replace(fleet[2], grpc_address="elsewhere:8001")
    assert _rebuilt(book, fleet) == {"c", "d"}
    fleet[3] = _model(fleet[3], "d", ready_versions=frozenset({"1", "2"}))
    assert _rebuilt(book, fleet) == {"d"}
    assert book.tables["d"].default_version == "2"


def _other(value: object) -> Any:
    """A value of the same kind that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value - 5.0  # for refreshed_at: stale
    if value is None:
        return 0.5
    if isinstance(value, frozenset):
        return value | {"9"}
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, enum.Enum):
        return next(member for member in type(value) if member is not value)
    raise AssertionError(f"no other value for {value!r}")


_INSTANCE_FIELDS = [f.name for f in dataclasses.fields(InstanceSnapshot) if f.name != "models"]
_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelOnInstance) if f.name != "name"]


@pytest.mark.parametrize("field", _INSTANCE_FIELDS + [f"model.{f}" for f in _MODEL_FIELDS])
def test_no_field_of_the_snapshot_leaves_a_table_stale(field: str) -> None:
    # Every field, those added after this test included: where a full rebuild makes another
    # table of the change, the incremental one does too (a field the tables read but the
    # tracker skips, e.g. one `build` reads and TABLE_READS lacks, fails here).
    policy = DecisionPolicy(default_profile())
    incremental, full = RouteBook(policy, ttl_ms=1000), RouteBook(policy, ttl_ms=1000)
    fleet = _fleet()
    for book in (incremental, full):
        book.rebuild(_snapshot(*fleet), NOW)
    if field.startswith("model."):
        name = field.removeprefix("model.")
        changed = _model(fleet[1], "c", **{name: _other(getattr(fleet[1].models["c"], name))})
    elif field == "instance_id":
        changed = replace(fleet[1], instance_id="i9")
    else:
        changed = replace(fleet[1], **{field: _other(getattr(fleet[1], field))})
    fleet[1] = changed
    full.invalidate()
    expected = full.rebuild(_snapshot(*fleet), NOW)
    assert incremental.rebuild(_snapshot(*fleet), NOW) == expected
    assert incremental.tables == full.tables


def test_an_instance_going_stale_with_time_alone_is_noticed() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    fleet[3] = replace(fleet[3], refreshed_at=NOW - 0.5)
    snapshot = _snapshot(*fleet)
    book.rebuild(snapshot, NOW)
    assert not book.last_rebuild.recomputed  # still fresh (stale after 1 s)
    book.rebuild(snapshot, NOW + 0.6)  # the same snapshot, later: i3 is 1.1 s old
    assert book.last_rebuild.recomputed == ("d",)
    assert [e.instance_id for e in book.tables["d"].candidates] == ["i2"]


def test_draining_a_pair_recomputes_that_model_only() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    book.draining.add(("c", "i1"))
    assert _rebuilt(book, fleet) == {"c"}
    assert [e.instance_id for e in book.tables["c"].candidates] == ["i2"]
    book.draining.clear()
    assert _rebuilt(book, fleet) == {"c"}


def test_a_policy_reload_or_invalidate_recomputes_every_table() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    rules = VersionRules(split=(("1", 1.0),))
    book.policy = DecisionPolicy(default_profile(), {"a": rules})
    assert _rebuilt(book, fleet) == set(MODELS)
    assert book.tables["a"].version_rules == rules and book.tables["a"].generation == 2
    assert book.tables["b"].generation == 1  # recomputed, the same: not sent
    book.invalidate()
    assert _rebuilt(book, fleet) == set(MODELS)


def test_instances_joining_leaving_or_moving_recompute_the_models_they_hold() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    assert _rebuilt(book, [*fleet, _instance("i4", ("a",))]) == {"a"}
    assert _rebuilt(book, fleet) == {"a"}
    # Order breaks ties between equal totals: c's holders i1 and i2 swap, b's and d's keep theirs.
    fleet[2] = replace(fleet[1], instance_id="i2")  # i1's twin: c's totals tie
    _rebuilt(book, fleet)
    assert [e.instance_id for e in book.tables["c"].candidates] == ["i1", "i2"]
    assert _rebuilt(book, [fleet[0], fleet[2], fleet[1], fleet[3]]) == {"b", "c"}
    assert [e.instance_id for e in book.tables["c"].candidates] == ["i2", "i1"]


def test_without_a_holders_only_filter_any_instance_change_recomputes_all() -> None:
    profile = build_profile({**DEFAULT_PROFILE_DATA, "filters": []}, default_registry())
    assert not profile.only_model_holders
    book, fleet = _book(profile), _fleet()
    _rebuilt(book, fleet)
    fleet[3] = replace(fleet[3], inferences_per_second=1.0)
    assert _rebuilt(book, fleet) == set(MODELS)
    fleet[3] = _model(fleet[3], "d", pending_requests=9)
    assert _rebuilt(book, fleet) == {"d"}


class _FailingOnce:
    TYPE_NAME: ClassVar[str] = "failing-once"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset({SnapshotField.HEALTHY})
    name = "failing-once"
    armed = False

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        if self.armed and cycle.request.model_name == "d":
            self.armed = False
            raise RuntimeError("a plugin's bug")
        return [1.0] * len(candidates)


def test_a_failed_rebuild_leaves_its_work_to_the_next() -> None:
    scorer = _FailingOnce()
    base = default_profile()
    profile = SchedulingProfile(base.filters, (*base.scorers, (scorer, 1.0)), base.picker)
    book, fleet = _book(profile), _fleet()
    _rebuilt(book, fleet)
    fleet[2] = replace(fleet[2], inferences_per_second=0.0)
    scorer.armed = True
    with pytest.raises(RuntimeError):
        book.rebuild(_snapshot(*fleet), NOW)
    assert book.generation == 1
    assert _rebuilt(book, fleet) == {"c", "d"}
    assert book.generation == 2


def test_rebuild_async_gives_the_loop_back_between_models() -> None:
    book, fleet = _book(), _fleet()
    ticks = itertools.count()
    turns = 0

    async def other_task(done: asyncio.Event) -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    async def main() -> None:
        done = asyncio.Event()
        task = asyncio.create_task(other_task(done))
        await asyncio.sleep(0)
        started = turns
        # A timer that moves 1 s per reading: every step ends a slice.
        await book.rebuild_async(_snapshot(*fleet), NOW, slice_s=0.5, timer=lambda: next(ticks))
        assert turns - started >= len(MODELS)
        done.set()
        await task

    asyncio.run(main())
    assert book.last_rebuild.slices > len(MODELS)
    reference = _book()
    reference.rebuild(_snapshot(*fleet), NOW)
    assert book.tables == reference.tables


def test_a_watcher_gets_only_the_tables_that_changed() -> None:
    book, fleet = _book(), _fleet()
    _rebuilt(book, fleet)
    queue = book.watch()
    queue.get_nowait()  # the full snapshot
    fleet[0] = _model(fleet[0], "a", pending_requests=0, ready_versions=frozenset({"1", "3"}))
    _rebuilt(book, fleet)
    update = queue.get_nowait()
    assert update is not None and not update.full
    assert [t.model_name for t in update.tables] == ["a"] and update.generation == 2


def _age_scorer_profile() -> SchedulingProfile:
    base = default_profile()
    return SchedulingProfile(base.filters, (*base.scorers, (_AgeScorer(), 1.0)), base.picker)


class _AgeScorer:
    """Prefers fresher views: scores change with time alone."""

    TYPE_NAME: ClassVar[str] = "age"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset({SnapshotField.REFRESHED_AT})
    name = "age"

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        return [1.0 / (1.0 + cycle.now - c.instance.refreshed_at) for c in candidates]


def test_a_scorer_reading_the_age_recomputes_every_table_every_time() -> None:
    book, fleet = _book(_age_scorer_profile()), _fleet()
    _rebuilt(book, fleet)
    assert _rebuilt(book, fleet, NOW + 0.1) == set(MODELS)


# --- the property: whatever happens to the fleet, the tables a full rebuild would make -----

_IDS = tuple(f"i{n}" for n in range(6))
# Few models, so that each has several holders whose weights depend on each other.
_FEW_MODELS = MODELS[:3]


# Values a step may set on a model of an instance (ties are common, as on a real fleet).
_MODEL_VALUES: dict[str, tuple[Any, ...]] = {
    "ready_versions": (frozenset({"1"}), frozenset({"1"}), frozenset({"1", "2"})),
    "loading_versions": (frozenset(), frozenset({"3"})),
    "pending_requests": (0, 0, 1, 3),
    "average_batch_size": (0.0, 2.0),
}


def _model_on(name: str) -> st.SearchStrategy[ModelOnInstance]:
    values = {field: st.sampled_from(choices) for field, choices in _MODEL_VALUES.items()}
    return st.builds(ModelOnInstance, name=st.just(name), **values)


@st.composite
def _models_on(draw: st.DrawFn) -> dict[str, ModelOnInstance]:
    names = draw(st.sets(st.sampled_from(_FEW_MODELS), min_size=1))
    return {name: draw(_model_on(name)) for name in sorted(names)}


# Values of each field a step may set on an instance (ties are common, as on a real fleet).
_INSTANCE_VALUES: dict[str, tuple[Any, ...]] = {
    "grpc_address": ("here:8001", "there:8001"),
    "healthy": (True, True, True, False),
    "refreshed_at": (NOW, NOW, NOW - 0.5, NOW - 0.9, NOW - 2.0),
    "memory_used_bytes": (0, 0, 800),
    "memory_budget_bytes": (1000, 1000, 0),
    "inferences_per_second": (0.0, 0.0, 20.0),
    "pending_requests": (0, 1, 2),
    "gpu_utilization": (None, 0.5),
}


@st.composite
def _instances(draw: st.DrawFn, instance_id: str) -> InstanceSnapshot:
    values = {name: draw(st.sampled_from(choices)) for name, choices in _INSTANCE_VALUES.items()}
    return InstanceSnapshot(instance_id=instance_id, models=draw(_models_on()), **values)


_STEPS = (
    "instance field",
    "model field",
    "load or unload",
    "copy",
    "twin",
    "twin",
    "swap",
    "swap",
    "leave",
    "join",
    "drain",
    "policy",
    "time",
)
_PROFILES = {
    "default": default_profile,
    "no holders-only filter": lambda: build_profile(
        {**DEFAULT_PROFILE_DATA, "filters": [{"type": "healthy-fresh"}]}, default_registry()
    ),
    "a scorer reading the age": _age_scorer_profile,
}


@pytest.mark.parametrize("profile_name", sorted(_PROFILES))
@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples on every run, no example database left behind
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_incremental_rebuilds_publish_what_full_rebuilds_do(
    profile_name: str, data: st.DataObject
) -> None:
    profile = _PROFILES[profile_name]()
    policies = [
        DecisionPolicy(profile),
        DecisionPolicy(profile, {"a": VersionRules(split=(("1", 1.0), ("2", 1.0)))}),
    ]
    incremental = RouteBook(policies[0], ttl_ms=1000)
    full = RouteBook(policies[0], ttl_ms=1000)
    count = data.draw(st.integers(4, len(_IDS)))
    fleet = [data.draw(_instances(instance_id)) for instance_id in _IDS[:count]]
    known = set(MODELS[:2])
    now = NOW
    for _ in range(data.draw(st.integers(3, 12))):
        step = data.draw(st.sampled_from(_STEPS))
        at = data.draw(st.integers(0, max(0, len(fleet) - 1)))
        if step == "instance field" and fleet:
            name = data.draw(st.sampled_from(sorted(_INSTANCE_VALUES)))
            value = data.draw(st.sampled_from(_INSTANCE_VALUES[name]))
            fleet[at] = replace(fleet[at], **{name: value})
        elif step == "model field" and fleet and fleet[at].models:
            name = data.draw(st.sampled_from(sorted(fleet[at].models)))
            field = data.draw(st.sampled_from(sorted(_MODEL_VALUES)))
            value = data.draw(st.sampled_from(_MODEL_VALUES[field]))
            fleet[at] = _model(fleet[at], name, **{field: value})
        elif step == "load or unload" and fleet:
            name = data.draw(st.sampled_from(_FEW_MODELS))
            models = {**fleet[at].models, name: data.draw(_model_on(name))}
            if data.draw(st.booleans()):
                del models[name]
            fleet[at] = replace(fleet[at], models=models)
        elif step == "copy":  # equal values, new objects: what the collector hands over
            fleet = [replace(i, models=dict(i.models)) for i in fleet]
        elif step == "twin" and fleet:  # another instance's values: ties between totals
            twin_of = fleet[data.draw(st.integers(0, len(fleet) - 1))]
            fleet[at] = replace(twin_of, instance_id=fleet[at].instance_id)
        elif step == "swap" and fleet:
            with_ = data.draw(st.integers(0, len(fleet) - 1))
            fleet[at], fleet[with_] = fleet[with_], fleet[at]
        elif step == "leave" and fleet:
            del fleet[at]
        elif step == "join":
            free = [i for i in _IDS if i not in {inst.instance_id for inst in fleet}]
            if free:
                fleet.insert(at, data.draw(_instances(data.draw(st.sampled_from(free)))))
        elif step == "drain" and fleet and fleet[at].models:
            pair = (data.draw(st.sampled_from(sorted(fleet[at].models))), fleet[at].instance_id)
            for book in (incremental, full):
                book.draining ^= {pair}
        elif step == "policy":
            incremental.policy = full.policy = data.draw(st.sampled_from(policies))
        elif step == "time":
            now += data.draw(st.sampled_from((0.3, 0.7)))
        known ^= set(data.draw(st.sets(st.sampled_from(MODELS), max_size=1)))
        snapshot = _snapshot(*fleet, known=sorted(known))
        full.invalidate()
        expected = full.rebuild(snapshot, now)
        assert incremental.rebuild(snapshot, now) == expected
        assert incremental.tables == full.tables
