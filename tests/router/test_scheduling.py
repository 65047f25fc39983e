"""The engine (filters -> weighted scorers), the registry, and profiles from config.

Decisions over snapshots (version, pick, fallbacks, the slow-path trace) are in
test_decision.py.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from pointsman.errors import ConfigError
from router.contracts import (
    Candidate,
    InstanceSnapshot,
    ModelOnInstance,
    RoutingRequest,
    SchedulingCycle,
    ScoredCandidate,
    SnapshotField,
)
from router.plugins import (
    BUILT_IN_PLUGINS,
    DEFAULT_PROFILE_DATA,
    PluginKind,
    PluginRegistry,
    build_profile,
    default_profile,
    default_registry,
)
from router.plugins.healthy_fresh import HealthyFreshFilter
from router.plugins.max_score import MaxScorePicker
from router.plugins.model_ready import ModelReadyFilter
from router.plugins.weighted_random import WeightedRandomPicker
from router.scheduling import FilterStep, FilterTrace, SchedulingProfile, rank_candidates

MODEL = "resnet"
NOW = 50.0
CYCLE = SchedulingCycle(RoutingRequest(MODEL), now=NOW)


def bare(*instance_ids: str) -> list[Candidate]:
    return [Candidate(InstanceSnapshot(i, f"{i}:8001")) for i in instance_ids]


def ids(items: Sequence[Candidate | ScoredCandidate]) -> list[str]:
    return [
        i.candidate.instance_id if isinstance(i, ScoredCandidate) else i.instance_id for i in items
    ]


@dataclass
class FixedScorer:
    """Returns preset scores, whatever the candidates, and remembers what it was shown."""

    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset()

    name: str
    values: list[float]
    seen: list[list[str]] = field(default_factory=list)

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        self.seen.append(ids(candidates))
        return list(self.values)


@dataclass(frozen=True)
class DropFilter:
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset()

    name: str
    drop: frozenset[str]

    def filter(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.instance_id not in self.drop]


class Engine:
    """One profile of fixed scorers and drop filters, ranking bare candidates."""

    def __init__(
        self, *scorers: tuple[FixedScorer, float], filters: tuple[DropFilter, ...] = ()
    ) -> None:
        self.profile = SchedulingProfile(filters, tuple(scorers), MaxScorePicker())

    def rank(self, candidates: Sequence[Candidate]) -> list[ScoredCandidate]:
        return self.rank_with_trace(candidates)[0]

    def rank_with_trace(
        self, candidates: Sequence[Candidate]
    ) -> tuple[list[ScoredCandidate], FilterTrace]:
        return rank_candidates(self.profile, CYCLE, candidates)


# --- engine ---------------------------------------------------------------------------------


def test_weights_sum_and_sort_by_total() -> None:
    affinity = FixedScorer("affinity", [0.0, 1.0, 0.5])
    queue = FixedScorer("queue", [1.0, 0.0, 1.0])
    ranked = Engine((affinity, 3), (queue, 2)).rank(bare("a", "b", "c"))
    assert ids(ranked) == ["c", "b", "a"]
    assert [r.total for r in ranked] == pytest.approx([3.5, 3.0, 2.0])
    assert ranked[0].scores == {"affinity": 0.5, "queue": 1.0}


def test_scores_clamped_and_nan_is_worst() -> None:
    odd = FixedScorer("odd", [1.5, -0.2, math.nan, math.inf])
    ranked = Engine((odd, 2)).rank(bare("a", "b", "c", "d"))
    by_id = {r.candidate.instance_id: (r.total, r.scores["odd"]) for r in ranked}
    assert by_id == {"a": (2.0, 1.0), "b": (0.0, 0.0), "c": (0.0, 0.0), "d": (2.0, 1.0)}


def test_equal_totals_keep_candidate_order() -> None:
    flat = FixedScorer("flat", [1.0, 1.0, 1.0])
    assert ids(Engine((flat, 1)).rank(bare("x", "y", "z"))) == ["x", "y", "z"]


def test_zero_weight_records_score_but_adds_nothing() -> None:
    muted = FixedScorer("muted", [0.2, 0.9])
    ranked = Engine((muted, 0)).rank(bare("a", "b"))
    assert [r.total for r in ranked] == [0.0, 0.0]
    assert [r.scores["muted"] for r in ranked] == [0.2, 0.9]


def test_scorer_wrong_length_is_an_error() -> None:
    short = FixedScorer("short", [1.0])
    with pytest.raises(ValueError, match="scorer 'short' returned 1 scores for 2 candidates"):
        Engine((short, 1)).rank(bare("a", "b"))


def test_filters_in_order_then_each_scorer_once_over_survivors() -> None:
    scorer = FixedScorer("s", [1.0, 0.0])
    engine = Engine(
        (scorer, 1),
        filters=(
            DropFilter("first", frozenset({"a", "b"})),
            DropFilter("second", frozenset({"c"})),
        ),
    )
    ranked, trace = engine.rank_with_trace(bare("a", "b", "c", "d", "e"))
    assert scorer.seen == [["d", "e"]]
    assert ids(ranked) == ["d", "e"]
    assert trace.considered == 5
    assert trace.steps == (FilterStep("first", ("a", "b")), FilterStep("second", ("c",)))
    assert trace.summary() == "5 candidates: 2 filtered by first, 1 by second"


def test_trace_summary_when_nothing_filtered() -> None:
    _, trace = Engine(filters=(DropFilter("f", frozenset()),)).rank_with_trace(bare("a"))
    assert trace.summary() == "1 candidate, none filtered"


def test_empty_when_nothing_survives() -> None:
    engine = Engine(filters=(DropFilter("all", frozenset({"a", "b"})),))
    ranked, trace = engine.rank_with_trace(bare("a", "b"))
    assert ranked == []
    assert trace.summary() == "2 candidates: 2 filtered by all"
    assert engine.rank([]) == []


def test_no_scorers_rank_every_survivor_equal_in_order() -> None:
    ranked = Engine().rank(bare("a", "b"))
    assert [(r.candidate.instance_id, r.total, r.scores) for r in ranked] == [
        ("a", 0.0, {}),
        ("b", 0.0, {}),
    ]


def test_profile_knows_when_candidates_may_start_from_holders() -> None:
    assert default_profile().only_model_holders  # model-ready keeps only holders
    assert not Engine(filters=(DropFilter("f", frozenset()),)).profile.only_model_holders


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf], ids=["negative", "nan", "inf"])
def test_profile_rejects_bad_weight(weight: float) -> None:
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        SchedulingProfile((), ((FixedScorer("s", []), weight),), MaxScorePicker())


def test_profile_rejects_duplicate_scorer_names() -> None:
    pair = ((FixedScorer("s", []), 1.0), (FixedScorer("s", []), 1.0))
    with pytest.raises(ValueError, match="scorer names must be unique"):
        SchedulingProfile((), pair, MaxScorePicker())


# --- registry ---------------------------------------------------------------------------------


def test_default_registry_holds_every_built_in_as_its_kind() -> None:
    registry = default_registry()
    for plugin in BUILT_IN_PLUGINS:
        kinds = [k for k in PluginKind if plugin.TYPE_NAME in registry.type_names(k)]
        assert len(kinds) == 1, plugin
        built = registry.info(kinds[0], plugin.TYPE_NAME).factory(plugin.TYPE_NAME, {})
        assert type(built) is plugin
    assert sum(len(registry.type_names(k)) for k in PluginKind) == len(BUILT_IN_PLUGINS)


def test_every_plugin_module_is_registered() -> None:
    """A plugin class written here but left out of BUILT_IN_PLUGINS is a mistake."""
    import importlib
    import pkgutil

    import router.plugins

    registered = {plugin.TYPE_NAME for plugin in BUILT_IN_PLUGINS}
    for module_info in pkgutil.iter_modules(router.plugins.__path__):
        module = importlib.import_module(f"router.plugins.{module_info.name}")
        for value in vars(module).values():
            type_name = getattr(value, "TYPE_NAME", None)
            if isinstance(value, type) and isinstance(type_name, str):
                assert type_name in registered, f"{value.__name__} is not in BUILT_IN_PLUGINS"


def test_filters_and_scorers_declare_what_they_read() -> None:
    registry = default_registry()
    for kind in (PluginKind.FILTER, PluginKind.SCORER):
        for type_name in registry.type_names(kind):
            consumes = registry.info(kind, type_name).consumes
            assert consumes and all(isinstance(f, SnapshotField) for f in consumes), type_name


def test_register_plugin_refuses_a_scorer_without_consumes() -> None:
    @dataclass(frozen=True)
    class Undeclared:
        TYPE_NAME: ClassVar[str] = "undeclared"
        name: str = "undeclared"

        def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
            return [1.0] * len(candidates)

        @classmethod
        def from_params(cls, name: str, params: Any) -> Undeclared:
            return cls(name)

    with pytest.raises(TypeError, match="must declare the snapshot fields it reads"):
        PluginRegistry().register_plugin(Undeclared)


def test_built_ins_take_the_given_name_and_default_to_their_type() -> None:
    registry = default_registry()
    for type_name in registry.type_names(PluginKind.FILTER):
        assert registry.create_filter(type_name, "n", {}).name == "n"
    assert ModelReadyFilter().name == ModelReadyFilter.TYPE_NAME == "model-ready"
    assert WeightedRandomPicker().name == "weighted-random"


def test_register_twice_is_an_error() -> None:
    registry = PluginRegistry()
    registry.register("model-ready", PluginKind.FILTER, ModelReadyFilter.from_params)
    with pytest.raises(ValueError, match="filter type 'model-ready' is already registered"):
        registry.register("model-ready", PluginKind.FILTER, ModelReadyFilter.from_params)


def test_same_type_name_may_differ_by_kind_and_wrong_kind_is_caught() -> None:
    registry = PluginRegistry()
    registry.register("odd", PluginKind.SCORER, ModelReadyFilter.from_params)
    with pytest.raises(TypeError, match="factory of scorer type 'odd'"):
        registry.create_scorer("odd", "n", {})
    with pytest.raises(ConfigError, match="unknown filter type 'odd'"):
        registry.create_filter("odd", "n", {})


# --- profiles from config data ------------------------------------------------------------


def test_default_profile() -> None:
    profile = default_profile()
    assert [f.name for f in profile.filters] == ["healthy-fresh", "model-ready"]
    assert [(s.name, w) for s, w in profile.scorers] == [
        ("model-affinity", 3.0),
        ("queue-depth", 2.0),
        ("memory-headroom", 1.0),
        ("load", 1.0),
        ("prefix-affinity", 10.0),
    ]
    assert profile.picker == WeightedRandomPicker("weighted-random", 0.1)


def test_build_profile_names_params_and_weights() -> None:
    profile = build_profile(
        {
            "filters": [{"type": "healthy-fresh", "name": "fresh", "params": {"stale_after_s": 3}}],
            "scorers": [
                {"type": "queue-depth", "name": "short-queue", "weight": 2.5, "params": None},
                {
                    "type": "queue-depth",
                    "name": "saturated",
                    "weight": 1,
                    "params": {"saturation": 8},
                },
            ],
            "picker": {"type": "max-score"},
        },
        default_registry(),
    )
    assert profile.filters == (HealthyFreshFilter("fresh", 3.0),)
    assert [(s.name, w) for s, w in profile.scorers] == [("short-queue", 2.5), ("saturated", 1.0)]
    assert profile.picker == MaxScorePicker("max-score")


def test_sections_left_out_take_the_defaults() -> None:
    assert build_profile({}, default_registry()) == default_profile()
    profile = build_profile({"picker": {"type": "max-score"}, "filters": []}, default_registry())
    assert profile.filters == ()
    assert profile.scorers == default_profile().scorers
    assert profile.picker == MaxScorePicker()


def with_change(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    data = copy.deepcopy(dict(DEFAULT_PROFILE_DATA))
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(["filters"], "profile: must be a mapping, got list", id="not-a-mapping"),
        pytest.param(
            with_change(lambda d: d.update(policy={})), "policy: unknown key", id="unknown-top-key"
        ),
        pytest.param(
            with_change(lambda d: d.update(filters={"type": "model-ready"})),
            "filters: must be a list, got dict",
            id="filters-not-list",
        ),
        pytest.param(
            with_change(lambda d: d.update(scorers="load")),
            "scorers: must be a list, got str",
            id="scorers-string",
        ),
        pytest.param(
            with_change(lambda d: d["filters"].__setitem__(0, "model-ready")),
            "filters[0]: must be a mapping, got str",
            id="entry-not-mapping",
        ),
        pytest.param(
            with_change(lambda d: d["filters"][1].update(type="nope")),
            "filters[1].type: unknown filter type 'nope' (known: healthy-fresh, model-ready)",
            id="unknown-type",
        ),
        pytest.param(
            with_change(lambda d: d["filters"][0].update(type="load")),
            "filters[0].type: unknown filter type 'load'",
            id="scorer-as-filter",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].pop("type")),
            "scorers[0].type: required",
            id="no-type",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(type=3)),
            "scorers[0].type: must be a non-empty string",
            id="type-not-string",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][1].pop("weight")),
            "scorers[1].weight: required",
            id="no-weight",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(weight=-1)),
            "scorers[0].weight: must be a finite number >= 0",
            id="negative-weight",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(weight=math.nan)),
            "scorers[0].weight: must be a finite number >= 0",
            id="nan-weight",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(weight="3")),
            "scorers[0].weight: must be a number, got str",
            id="string-weight",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(weight=True)),
            "scorers[0].weight: must be a number, got bool",
            id="bool-weight",
        ),
        pytest.param(
            with_change(lambda d: d["filters"][0].update(weight=1)),
            "filters[0].weight: unknown key",
            id="weight-on-filter",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][3].update(wieght=1)),
            "scorers[3].wieght: unknown key",
            id="misspelt-key",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][2].update(params={"buffer_bytes": -1})),
            "scorers[2].params.buffer_bytes: must be >= 0",
            id="bad-param",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(params={"loading": 0.5})),
            "scorers[0].params.loading: unknown parameter",
            id="unknown-param",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(params=[0.5])),
            "scorers[0].params: must be a mapping, got list",
            id="params-not-mapping",
        ),
        pytest.param(
            with_change(lambda d: d["picker"]["params"].update(tolerance="low")),
            "picker.params.tolerance: must be a number, got str",
            id="picker-param",
        ),
        pytest.param(
            with_change(lambda d: d["filters"][0]["params"].update(stale_after_s=0)),
            "filters[0].params.stale_after_s: must be > 0",
            id="filter-param",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][3].update(name="queue-depth")),
            "scorers[3].name: duplicate name 'queue-depth' in scorers",
            id="duplicate-name",
        ),
        pytest.param(
            with_change(lambda d: d["scorers"][0].update(name="")),
            "scorers[0].name: must be a non-empty string",
            id="empty-name",
        ),
        pytest.param(
            with_change(lambda d: d.update(picker=[{"type": "max-score"}])),
            "picker: must be a mapping, got list",
            id="picker-list",
        ),
    ],
)
def test_build_profile_rejects(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_profile(data, default_registry())
    assert str(caught.value).startswith(message)


def test_build_profile_path_prefixes_fields() -> None:
    data = with_change(lambda d: d["scorers"][1].pop("weight"))
    with pytest.raises(ConfigError, match=r"^router\.policy\.scorers\[1\]\.weight: required$"):
        build_profile(data, default_registry(), path="router.policy")


# --- the default profile end to end -----------------------------------------------------------


def instance(
    instance_id: str,
    *,
    ready: bool = True,
    loading: bool = False,
    pending: int = 0,
    ips: float = 0.0,
    healthy: bool = True,
    refreshed_at: float = NOW,
) -> Candidate:
    model = ModelOnInstance(
        MODEL,
        ready_versions=frozenset({"1"} if ready else ()),
        loading_versions=frozenset({"1"} if loading else ()),
        pending_requests=pending,
    )
    budget = 16 << 30
    snapshot = InstanceSnapshot(
        instance_id,
        f"{instance_id}:8001",
        healthy=healthy,
        refreshed_at=refreshed_at,
        models={MODEL: model} if ready or loading else {},
        memory_budget_bytes=budget,
        memory_used_bytes=budget // 2,
        inferences_per_second=ips,
    )
    return Candidate(snapshot)


def test_default_profile_prefers_ready_idle_instance_and_explains_drops() -> None:
    candidates = [
        instance("busy", pending=12, ips=300),
        instance("idle", pending=0, ips=20),
        instance("cold", ready=False),
        instance("loading", ready=False, loading=True),
        instance("stale", refreshed_at=NOW - 5),
        instance("down", healthy=False),
    ]
    profile = default_profile()
    ranked, trace = rank_candidates(profile, CYCLE, candidates)
    assert ids(profile.picker.pick(ranked, random.Random(0))) == ["idle", "busy"]
    assert trace.summary() == "6 candidates: 2 filtered by healthy-fresh, 2 by model-ready"


def test_default_profile_routes_cold_request_to_loading_instance() -> None:
    candidates = [instance("cold", ready=False), instance("loading", ready=False, loading=True)]
    ranked, _ = rank_candidates(default_profile(), CYCLE, candidates)
    assert ids(ranked) == ["loading"]
