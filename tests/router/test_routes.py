"""Route tables from fleet snapshots: what is listed, when generations move, watchers."""

from __future__ import annotations

from router.contracts import (
    FleetSnapshot,
    InstanceSnapshot,
    ModelOnInstance,
    RoutingRequest,
    SchedulingCycle,
)
from router.decision import AssumedLoad, DecisionPolicy, candidates_for, rank
from router.plugins.registry import default_profile
from router.routes import WEIGHT_STEP, RouteBook
from router.scheduling import rank_candidates

NOW = 100.0


def _instance(
    instance_id: str, models: dict[str, tuple[str, ...]], *, pending: int = 0
) -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=instance_id,
        grpc_address=f"10.0.0.{instance_id[-1]}:8001",
        healthy=True,
        refreshed_at=NOW,
        models={
            name: ModelOnInstance(name=name, ready_versions=frozenset(v), pending_requests=pending)
            for name, v in models.items()
        },
        memory_budget_bytes=1000,
    )


def _snapshot(*instances: InstanceSnapshot, known: tuple[str, ...] = ()) -> FleetSnapshot:
    names = {m for i in instances for m in i.models} | set(known)
    return FleetSnapshot(taken_at=NOW, instances=instances, known_models=frozenset(names))


def _book() -> RouteBook:
    return RouteBook(DecisionPolicy(default_profile()), ttl_ms=1000)


def test_tables_list_only_ready_holders_with_their_versions() -> None:
    book = _book()
    update = book.rebuild(
        _snapshot(
            _instance("i1", {"codegen": ("1", "2")}),
            _instance("i2", {"codegen": ("1",), "other": ("1",)}),
            _instance("i3", {}),
            known=("echo",),
        ),
        NOW,
    )
    assert update is not None and update.generation == 1
    codegen = book.tables["codegen"]
    assert {c.instance_id: c.ready_versions for c in codegen.candidates} == {
        "i1": ("1", "2"),
        "i2": ("1",),
    }
    assert codegen.default_version == "2"
    assert book.tables["echo"].candidates == ()  # known, loaded nowhere
    assert all(WEIGHT_STEP <= c.weight <= 1.0 for c in codegen.candidates)
    assert max(c.weight for c in codegen.candidates) == 1.0


def test_unchanged_snapshot_makes_no_update_and_keeps_generation() -> None:
    book = _book()
    snapshot = _snapshot(_instance("i1", {"codegen": ("1",)}))
    book.rebuild(snapshot, NOW)
    assert book.rebuild(snapshot, NOW + 0.1) is None
    assert book.generation == 1


def test_only_changed_tables_are_sent_and_removed_models_named() -> None:
    book = _book()
    book.rebuild(_snapshot(_instance("i1", {"a": ("1",), "b": ("1",)})), NOW)
    update = book.rebuild(_snapshot(_instance("i1", {"a": ("1",), "c": ("1",)})), NOW)
    assert update is not None
    assert [t.model_name for t in update.tables] == ["c"]
    assert update.removed == ("b",)
    assert book.tables["a"].generation == 1 and book.tables["c"].generation == 2


def test_a_busier_instance_gets_less_weight() -> None:
    book = _book()
    book.rebuild(
        _snapshot(
            _instance("i1", {"codegen": ("1",)}, pending=0),
            _instance("i2", {"codegen": ("1",)}, pending=20),
        ),
        NOW,
    )
    weights = {c.instance_id: c.weight for c in book.tables["codegen"].candidates}
    assert weights["i1"] == 1.0 and weights["i2"] < 1.0


def test_watchers_get_a_full_snapshot_then_changes_and_slow_ones_resync() -> None:
    book = _book()
    book.rebuild(_snapshot(_instance("i1", {"a": ("1",)})), NOW)
    queue = book.watch()
    first = queue.get_nowait()
    assert first is not None and first.full and [t.model_name for t in first.tables] == ["a"]
    for n in range(100):  # more updates than the queue holds
        book.rebuild(_snapshot(_instance("i1", {"a": ("1",), f"m{n}": ("1",)})), NOW)
    received = []
    while not queue.empty():
        received.append(queue.get_nowait())
    assert any(u is not None and u.full for u in received)
    last = received[-1]
    assert last is not None and last.generation == book.generation
    book.close_watchers()
    assert queue.get_nowait() is None


def test_assumed_load_counts_recent_picks_only() -> None:
    assumed = AssumedLoad(window_s=0.5)
    assumed.add("i1", "codegen", 10.0)
    assumed.add("i1", "codegen", 10.4)
    assert assumed.count("i1", "codegen", 10.45) == 2
    assert assumed.count("i1", "codegen", 10.8) == 1
    assert assumed.count("i2", "codegen", 10.8) == 0


def test_holders_index_and_candidates_from_holders_only() -> None:
    a = _instance("t0", {"m": ("1",), "n": ("1",)})
    b = _instance("t1", {"n": ("1",)})
    c = _instance("t2", {"m": ("2",)})
    snapshot = _snapshot(a, b, c, known=("cold",))
    assert [i.instance_id for i in snapshot.holders("m")] == ["t0", "t2"]
    assert [i.instance_id for i in snapshot.holders("n")] == ["t0", "t1"]
    assert snapshot.holders("cold") == ()
    every = candidates_for(snapshot, "m", None, NOW)
    held = candidates_for(snapshot, "m", None, NOW, {("m", "t2")}, only_holders=True)
    assert [x.instance_id for x in every] == ["t0", "t1", "t2"]
    assert [x.instance_id for x in held] == ["t0"]  # t2 drains m


def test_starting_from_holders_ranks_as_starting_from_everyone() -> None:
    profile = default_profile()
    assert profile.only_model_holders  # the default profile has model-ready
    instances = [_instance(f"t{i}", {"m": ("1",)} if i % 3 else {}, pending=i) for i in range(9)]
    snapshot = _snapshot(*instances)
    request = RoutingRequest(model_name="m")
    held = rank(request, snapshot, DecisionPolicy(profile), now=NOW).targets
    cycle = SchedulingCycle(request=request, now=NOW)
    full, _ = rank_candidates(profile, cycle, candidates_for(snapshot, "m", None, NOW))
    assert [(s.candidate.instance_id, s.total) for s in full] == [
        (s.candidate.instance_id, s.total) for s in held
    ]


def test_tables_carry_each_holders_capacity_and_a_change_of_it_is_sent() -> None:
    def holder(instance_id: str, instances: int, queue: int) -> InstanceSnapshot:
        model = ModelOnInstance(
            "codegen", ready_versions=frozenset({"1"}), max_batch_size=8,
            instance_count=instances, max_queue_size=queue,
        )  # fmt: skip
        return InstanceSnapshot(
            instance_id, f"10.0.0.{instance_id[-1]}:8001", healthy=True, refreshed_at=NOW,
            models={"codegen": model}, memory_budget_bytes=1000,
        )  # fmt: skip

    book = _book()
    book.rebuild(_snapshot(holder("i1", 1, 4), holder("i2", 2, 0)), NOW)
    capacity = {c.instance_id: (c.concurrency, c.queue_capacity)
                for c in book.tables["codegen"].candidates}  # fmt: skip
    assert capacity == {"i1": (8, 4), "i2": (16, 0)}
    update = book.rebuild(_snapshot(holder("i1", 1, 2), holder("i2", 2, 0)), NOW)
    assert update is not None and [t.model_name for t in update.tables] == ["codegen"]
