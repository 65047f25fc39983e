"""One decision over a snapshot (router/decision.py): version, pick, fallbacks, scores, and
the filter trace; `rank` (route tables) and `decide` (PickTarget) share one path."""

from __future__ import annotations

import random

import pytest

from pointsman.versions import HeaderRule, VersionRules
from router.contracts import FleetSnapshot, InstanceSnapshot, ModelOnInstance, RoutingRequest
from router.decision import AssumedLoad, DecisionPolicy, choose_version, decide, rank
from router.plugins.registry import build_profile, default_profile, default_registry

NOW = 100.0
MODEL = "codegen"


def instance(
    instance_id: str,
    ready: tuple[str, ...] = ("1",),
    *,
    loading: tuple[str, ...] = (),
    pending: int = 0,
    healthy: bool = True,
) -> InstanceSnapshot:
    models = {}
    if ready or loading:
        models[MODEL] = ModelOnInstance(
            MODEL,
            ready_versions=frozenset(ready),
            loading_versions=frozenset(loading),
            pending_requests=pending,
        )
    return InstanceSnapshot(
        instance_id,
        f"{instance_id}:8001",
        healthy=healthy,
        refreshed_at=NOW,
        models=models,
        memory_budget_bytes=1000,
    )


def fleet(*instances: InstanceSnapshot) -> FleetSnapshot:
    return FleetSnapshot(taken_at=NOW, instances=instances, known_models=frozenset({MODEL}))


def ids(decision_targets: tuple[object, ...]) -> list[str]:
    return [t.candidate.instance_id for t in decision_targets]  # type: ignore[attr-defined]


DEFAULT = DecisionPolicy(default_profile())


def test_decide_orders_the_pick_then_fallbacks_with_scores_per_scorer() -> None:
    snapshot = fleet(instance("a", pending=9), instance("b"), instance("c", pending=5))
    decision = decide(RoutingRequest(MODEL), snapshot, DEFAULT, now=NOW, rng=random.Random(0))
    assert ids(decision.targets) == ["b", "c", "a"]
    assert decision.pick is decision.targets[0]
    assert set(decision.pick.scores) == {
        "model-affinity", "queue-depth", "memory-headroom", "load", "prefix-affinity"
    }  # fmt: skip
    assert decision.pick.scores["queue-depth"] == 1.0
    assert decision.filters.summary() == "3 candidates, none filtered"
    assert [s.candidate.instance_id for s in decision.best(2)] == ["b", "c"]


def test_rank_is_decide_without_the_pick() -> None:
    snapshot = fleet(instance("a", pending=9), instance("b"), instance("c", pending=5))
    request = RoutingRequest(MODEL)
    ranking = rank(request, snapshot, DEFAULT, now=NOW)
    decision = decide(request, snapshot, DEFAULT, now=NOW, rng=random.Random(0))
    assert ids(ranking.targets) == ["b", "c", "a"]  # by total, best first
    assert sorted(ids(ranking.targets)) == sorted(ids(decision.targets))
    totals = {s.candidate.instance_id: s.total for s in ranking.targets}
    assert totals == {s.candidate.instance_id: s.total for s in decision.targets}


def test_nothing_ready_explains_over_every_instance() -> None:
    snapshot = fleet(instance("a", ready=()), instance("b", healthy=False), instance("c", ()))
    decision = decide(RoutingRequest(MODEL), snapshot, DEFAULT, now=NOW, rng=random.Random(0))
    assert decision.pick is None and decision.targets == ()
    # The holders alone would be "1 candidate": the slow path looks at all three.
    assert (
        decision.filters.summary() == "3 candidates: 1 filtered by healthy-fresh, 2 by model-ready"
    )


def test_draining_and_assumed_load_steer_the_decision() -> None:
    snapshot = fleet(instance("a"), instance("b"))
    policy = DecisionPolicy(build_profile({"picker": {"type": "max-score"}}, default_registry()))
    assumed = AssumedLoad(window_s=1.0)
    for _ in range(3):
        assumed.add("a", MODEL, NOW)
    rng = random.Random(0)
    busy_a = decide(RoutingRequest(MODEL), snapshot, policy, now=NOW, rng=rng, assumed=assumed)
    assert ids(busy_a.targets) == ["b", "a"]
    drained = decide(
        RoutingRequest(MODEL), snapshot, policy, now=NOW, rng=rng, draining={(MODEL, "b")}
    )
    assert ids(drained.targets) == ["a"]


CANARY = VersionRules(
    split=(("1", 1.0), ("2", 1.0)),
    sticky_header="x-user-id",
    header_rules=(HeaderRule("x-canary", "1", "2"),),
)


@pytest.mark.parametrize(
    ("rules", "request_", "expected"),
    [
        pytest.param(VersionRules(), RoutingRequest(MODEL), "", id="no-rules-highest"),
        pytest.param(
            VersionRules(),
            RoutingRequest(MODEL, headers={"x-model-version": "1"}),
            "1",
            id="pin-header",
        ),
        pytest.param(
            CANARY, RoutingRequest(MODEL, headers={"x-canary": "1"}), "2", id="header-rule"
        ),
        pytest.param(
            VersionRules(split=(("3", 1.0),)), RoutingRequest(MODEL), "", id="split-arm-not-ready"
        ),
        pytest.param(VersionRules(split=(("2", 1.0),)), RoutingRequest(MODEL), "2", id="split"),
    ],
)
def test_choose_version(rules: VersionRules, request_: RoutingRequest, expected: str) -> None:
    snapshot = fleet(instance("a", ("1", "2")), instance("b", ("1",)))
    policy = DecisionPolicy(default_profile(), {MODEL: rules})
    assert choose_version(request_, snapshot, policy, random.Random(0)) == expected


def test_sticky_split_is_the_same_for_a_user_and_the_pick_serves_that_version() -> None:
    snapshot = fleet(instance("a", ("1",)), instance("b", ("2",)))
    policy = DecisionPolicy(default_profile(), {MODEL: CANARY})
    chosen = set()
    for seed in range(20):
        request = RoutingRequest(MODEL, headers={"x-user-id": "alice"}, affinity_key="k")
        decision = decide(request, snapshot, policy, now=NOW, rng=random.Random(seed))
        chosen.add(decision.request.model_version)
        assert decision.pick is not None
        model = decision.pick.candidate.instance.model(MODEL)
        assert model is not None and decision.request.model_version in model.ready_versions
        assert decision.request.affinity_key == "k"  # the request's keys travel with it
    assert len(chosen) == 1


def test_pinned_version_is_kept() -> None:
    snapshot = fleet(instance("a", ("1",)), instance("b", ("2",)))
    decision = decide(
        RoutingRequest(MODEL, model_version="2"), snapshot, DEFAULT, now=NOW, rng=random.Random(0)
    )
    assert decision.request.model_version == "2" and ids(decision.targets) == ["b"]
