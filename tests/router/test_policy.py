"""The policy file: validation naming the field, versions, the store and its watcher, version
selection, and `pointsman policy check|reload|show`."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from app import cli
from pointsman.errors import ConfigError
from pointsman.prefix_routing import PrefixRouting
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.versions import (
    HeaderRule,
    VersionRules,
    rules_from_proto,
    rules_to_proto,
    select_version,
)
from router.demand import DemandWindows
from router.placement import ModelSpec, PlacementPolicy
from router.plugins.registry import DEFAULT_PROFILE_DATA
from router.policy import (
    DEFAULT_SOURCE,
    ModelPolicy,
    Policy,
    PolicyStore,
    PriorityClass,
    default_policy,
    load_policy,
    parse_policy,
    parse_policy_text,
)
from tests.support.fakes import FakeClock

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "policy.yaml"

FULL: dict[str, Any] = {
    "scheduling": {
        "scorers": [{"type": "model-affinity", "weight": 3}, {"type": "load", "weight": 1}]
    },
    "placement": {
        "interval_s": 0.5,
        "enabled": False,
        "keep_warm_s": 120,
        "churn_guard_s": 30,
        "scale_down_cooldown_s": 60,
        "scale_down_utilisation": 0.7,
        "shortlist_tolerance": 0.2,
        "headroom_buffer_bytes": 1024,
        "headroom_weight": 2,
        "load_weight": 1,
        "default_per_copy_capacity_rps": 25,
        "default_memory_bytes": 4096,
    },
    "models": {
        "codegen": {
            "min_copies": 1,
            "max_copies": 3,
            "per_copy_capacity_rps": 40,
            "memory_bytes": 67108864,
            "versions": {
                "split": {"1": 90, "2": 10},
                "sticky_header": "x-user-id",
                "header_rules": [{"header": "x-canary", "value": "1", "version": "2"}],
            },
            "prefix_routing": {"prompt_input": "PROMPT", "max_blocks": 32, "epsilon": 0.5},
        },
        "echo": {},
    },
    "priority_classes": {
        "high": {"triton_priority": 1},
        "low": {"triton_priority": 2, "sheddable": True},
    },
    "default_priority_class": "low",
    "demand": {"bucket_s": 0.5, "span_s": 120, "short_window_s": 10, "fit_window_s": 5},
}


def _with(path: Sequence[str | int], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(FULL)
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def _without(path: Sequence[str | int]) -> dict[str, Any]:
    data = copy.deepcopy(FULL)
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


# --- a valid file ----------------------------------------------------------------------------


def test_full_policy_parses_into_frozen_typed_objects() -> None:
    policy = parse_policy(FULL, source="test")
    assert policy.source == "test"
    assert [scorer.name for scorer, _ in policy.profile.scorers] == ["model-affinity", "load"]
    # Sections left out take the default's.
    assert policy.scheduling_data["picker"]["type"] == DEFAULT_PROFILE_DATA["picker"]["type"]
    assert len(policy.profile.filters) == len(DEFAULT_PROFILE_DATA["filters"])
    assert policy.placement == PlacementPolicy(
        keep_warm_s=120,
        churn_guard_s=30,
        scale_down_cooldown_s=60,
        scale_down_utilisation=0.7,
        shortlist_tolerance=0.2,
        headroom_buffer_bytes=1024,
        headroom_weight=2,
        load_weight=1,
    )
    assert policy.placement_interval_s == 0.5
    assert policy.placement_enabled is False
    assert policy.default_per_copy_capacity_rps == 25
    assert policy.default_memory_bytes == 4096
    assert policy.models["codegen"] == ModelPolicy(
        min_copies=1,
        max_copies=3,
        per_copy_capacity_rps=40,
        memory_bytes=67108864,
        versions=VersionRules(
            split=(("1", 90.0), ("2", 10.0)),
            sticky_header="x-user-id",
            header_rules=(HeaderRule("x-canary", "1", "2"),),
        ),
        prefix_routing=PrefixRouting("PROMPT", block_bytes=64, max_blocks=32, epsilon=0.5),
    )
    assert policy.models["echo"] == ModelPolicy()
    assert policy.prefix_routing() == {"codegen": policy.models["codegen"].prefix_routing}
    assert parse_policy_text(policy.effective_yaml()).version == policy.version
    assert policy.priority_classes == {
        "high": PriorityClass("high", 1, False),
        "low": PriorityClass("low", 2, True),
    }
    assert policy.default_priority_class == "low"
    # Windows left out keep their defaults, within the span they must fit.
    assert policy.demand == DemandWindows(
        bucket_s=0.5, span_s=120, short_window_s=10, long_window_s=120, fit_window_s=5
    )
    assert policy.priority_class("high").triton_priority == 1
    assert policy.priority_class("").name == "low"
    assert policy.priority_class("nobody").name == "low"
    with pytest.raises(AttributeError):
        policy.version = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.models["other"] = ModelPolicy()  # type: ignore[index]


def test_the_example_file_is_valid() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.source == str(EXAMPLE)
    assert policy.yaml_text == EXAMPLE.read_text()
    assert policy.version_rules("codegen").split == (("1", 90.0), ("2", 10.0))


def test_default_policy() -> None:
    policy = default_policy()
    assert policy.source == DEFAULT_SOURCE
    assert policy.placement == PlacementPolicy()
    assert policy.placement_enabled is True
    assert policy.placement_interval_s == 1.0
    assert policy.default_per_copy_capacity_rps == 50
    assert policy.default_memory_bytes == 0
    assert policy.models == {}
    assert policy.model("anything") == ModelPolicy()
    assert policy.version_rules("anything").is_empty
    assert policy.priority_class().triton_priority == 1
    assert [scorer.name for scorer, _ in policy.profile.scorers] == [
        entry["type"] for entry in DEFAULT_PROFILE_DATA["scorers"]
    ]
    # The effective YAML is a policy file that means the same.
    assert parse_policy_text(policy.effective_yaml()).version == policy.version


def test_version_is_stable_and_follows_meaning() -> None:
    policy = parse_policy(FULL)
    assert parse_policy(copy.deepcopy(FULL)).version == policy.version
    assert len(policy.version) == 12
    # Comments, key order and split order do not change the meaning.
    reordered = dict(reversed(list(copy.deepcopy(FULL).items())))
    reordered["models"]["codegen"]["versions"]["split"] = {"2": 10, "1": 90}
    text = "# a comment\n" + yaml.safe_dump(reordered)
    assert parse_policy_text(text).version == policy.version
    # Writing out a default is the same as leaving it out.
    assert parse_policy({"placement": {"keep_warm_s": 300}}).version == default_policy().version
    assert parse_policy_text("").version == default_policy().version
    # Any change of meaning changes the version.
    changed = _with(["models", "codegen", "versions", "split", "2"], 11)
    assert parse_policy(changed).version != policy.version
    assert parse_policy(_with(["default_priority_class"], "high")).version != policy.version
    weight = _with(["scheduling", "scorers", 1, "weight"], 2)
    assert parse_policy(weight).version != policy.version
    assert parse_policy_text(policy.effective_yaml()).version == policy.version


def test_int_versions_and_values_are_read_as_strings() -> None:
    text = """
models:
  codegen:
    versions:
      split: {1: 3, 2: 1}
      header_rules: [{header: x-canary, value: 1, version: 2}]
"""
    rules = parse_policy_text(text).version_rules("codegen")
    assert rules.split == (("1", 3.0), ("2", 1.0))
    assert rules.header_rules == (HeaderRule("x-canary", "1", "2"),)


@pytest.mark.parametrize(
    ("footprint", "measured", "model", "expected"),
    [
        pytest.param(1000, True, "codegen", 1000, id="measured-wins-over-policy"),
        pytest.param(1000, False, "codegen", 67108864, id="policy-replaces-declared"),
        pytest.param(1000, False, "echo", 1000, id="declared"),
        pytest.param(0, False, "echo", 4096, id="default-when-unknown"),
        pytest.param(0, True, "codegen", 67108864, id="measured-zero-is-unknown"),
    ],
)
def test_model_spec_footprint(footprint: int, measured: bool, model: str, expected: int) -> None:
    spec = parse_policy(FULL).model_spec(model, footprint, measured=measured)
    assert spec is not None
    assert spec.footprint_bytes == expected


def test_model_spec_copies_and_capacity() -> None:
    policy = parse_policy(FULL)
    assert policy.model_spec("codegen", 0) == ModelSpec("codegen", 67108864, 40.0, 1, 3)
    assert policy.model_spec("unlisted", 10) == ModelSpec("unlisted", 10, 25.0, 0, None)
    # No footprint anywhere, default 0: never placed.
    assert default_policy().model_spec("unlisted", 0) is None


# --- every invalid field is named --------------------------------------------------------------

_V: list[str | int] = ["models", "codegen", "versions"]
_RULE: list[str | int] = [*_V, "header_rules", 0]
_PREFIX: list[str | int] = ["models", "codegen", "prefix_routing"]

INVALID: list[Any] = [
    pytest.param([1, 2], "policy", id="not-a-mapping"),
    pytest.param(_with(["colour"], "red"), "colour", id="unknown-top-level"),
    # scheduling: build_profile's own checks, under "scheduling"
    pytest.param(_with(["scheduling"], [1]), "scheduling", id="scheduling-not-mapping"),
    pytest.param(_with(["scheduling", "colour"], 1), "scheduling.colour", id="scheduling-unknown"),
    pytest.param(
        _with(["scheduling", "scorers", 0, "weight"], -1),
        "scheduling.scorers[0].weight",
        id="scorer-weight-negative",
    ),
    pytest.param(
        _with(["scheduling", "scorers", 1], {"type": "load"}),
        "scheduling.scorers[1].weight",
        id="scorer-weight-missing",
    ),
    pytest.param(
        _with(["scheduling", "picker"], {"type": "nope"}),
        "scheduling.picker.type",
        id="picker-unknown-type",
    ),
    # placement
    pytest.param(_with(["placement"], 3), "placement", id="placement-not-mapping"),
    pytest.param(_with(["placement", "colour"], 1), "placement.colour", id="placement-unknown"),
    pytest.param(_with(["placement", "keep_warm_s"], -1), "placement.keep_warm_s", id="negative"),
    pytest.param(_with(["placement", "churn_guard_s"], "60s"), "placement.churn_guard_s", id="str"),
    pytest.param(
        _with(["placement", "scale_down_cooldown_s"], float("inf")),
        "placement.scale_down_cooldown_s",
        id="infinite",
    ),
    pytest.param(
        _with(["placement", "scale_down_utilisation"], 0),
        "placement.scale_down_utilisation",
        id="utilisation-zero",
    ),
    pytest.param(
        _with(["placement", "scale_down_utilisation"], 1.5),
        "placement.scale_down_utilisation",
        id="utilisation-above-one",
    ),
    pytest.param(
        _with(["placement", "shortlist_tolerance"], 2),
        "placement.shortlist_tolerance",
        id="tolerance-above-one",
    ),
    pytest.param(
        _with(["placement", "headroom_buffer_bytes"], 1.5),
        "placement.headroom_buffer_bytes",
        id="buffer-not-integer",
    ),
    pytest.param(
        _with(["placement", "headroom_buffer_bytes"], -1),
        "placement.headroom_buffer_bytes",
        id="buffer-negative",
    ),
    pytest.param(
        _with(["placement", "load_weight"], -1), "placement.load_weight", id="weight-negative"
    ),
    pytest.param(
        {"placement": {"headroom_weight": 0, "load_weight": 0}}, "placement", id="weights-both-0"
    ),
    pytest.param(_with(["placement", "interval_s"], 0), "placement.interval_s", id="interval-0"),
    pytest.param(_with(["placement", "enabled"], "yes"), "placement.enabled", id="enabled-str"),
    pytest.param(
        _with(["placement", "default_per_copy_capacity_rps"], 0),
        "placement.default_per_copy_capacity_rps",
        id="default-capacity-0",
    ),
    pytest.param(
        _with(["placement", "default_memory_bytes"], -1),
        "placement.default_memory_bytes",
        id="default-memory-negative",
    ),
    # models
    pytest.param(_with(["models"], ["codegen"]), "models", id="models-not-mapping"),
    pytest.param(_with(["models", "codegen"], 3), "models.codegen", id="model-not-mapping"),
    pytest.param(
        _with(["models", "codegen", "replicas"], 2), "models.codegen.replicas", id="model-unknown"
    ),
    pytest.param(
        _with(["models", "codegen", "min_copies"], -1), "models.codegen.min_copies", id="min-neg"
    ),
    pytest.param(
        _with(["models", "codegen", "min_copies"], True), "models.codegen.min_copies", id="bool"
    ),
    pytest.param(
        _with(["models", "codegen", "max_copies"], "3"), "models.codegen.max_copies", id="max-str"
    ),
    pytest.param(
        _with(["models", "codegen", "min_copies"], 4),
        "models.codegen.max_copies",
        id="min-above-max",
    ),
    pytest.param(
        _with(["models", "codegen", "per_copy_capacity_rps"], 0),
        "models.codegen.per_copy_capacity_rps",
        id="capacity-zero",
    ),
    pytest.param(
        _with(["models", "codegen", "memory_bytes"], 0),
        "models.codegen.memory_bytes",
        id="memory-zero",
    ),
    pytest.param(
        _with(["models", "codegen", "memory_bytes"], -5),
        "models.codegen.memory_bytes",
        id="memory-negative",
    ),
    # versions
    pytest.param(_with(_V, [1]), "models.codegen.versions", id="versions-not-mapping"),
    pytest.param(_with([*_V, "canary"], 1), "models.codegen.versions.canary", id="versions-unk"),
    pytest.param(_with([*_V, "split"], {}), "models.codegen.versions.split", id="split-empty"),
    pytest.param(_with([*_V, "split"], [90, 10]), "models.codegen.versions.split", id="split-list"),
    pytest.param(
        _with([*_V, "split", "2"], 0),
        'models.codegen.versions.split["2"]',
        id="split-weight-zero",
    ),
    pytest.param(
        _with([*_V, "split", "2"], -10),
        'models.codegen.versions.split["2"]',
        id="split-weight-negative",
    ),
    pytest.param(
        _with([*_V, "split", "2"], "ten"),
        'models.codegen.versions.split["2"]',
        id="split-weight-string",
    ),
    pytest.param(
        _with([*_V, "split"], {"v2": 10}),
        'models.codegen.versions.split["v2"]',
        id="split-version-not-a-number",
    ),
    pytest.param(
        _with([*_V, "sticky_header"], "X-User-Id"),
        "models.codegen.versions.sticky_header",
        id="sticky-upper-case",
    ),
    pytest.param(
        _with([*_V, "sticky_header"], "x user"),
        "models.codegen.versions.sticky_header",
        id="sticky-bad-char",
    ),
    pytest.param(
        _without([*_V, "split"]),
        "models.codegen.versions.sticky_header",
        id="sticky-without-split",
    ),
    pytest.param(
        _with([*_V, "header_rules"], {"x-canary": "1"}),
        "models.codegen.versions.header_rules",
        id="rules-not-list",
    ),
    pytest.param(
        _with(_RULE, "x-canary=1"), "models.codegen.versions.header_rules[0]", id="rule-not-map"
    ),
    pytest.param(
        _without([*_RULE, "version"]),
        "models.codegen.versions.header_rules[0].version",
        id="rule-missing-version",
    ),
    pytest.param(
        _without([*_RULE, "header"]),
        "models.codegen.versions.header_rules[0].header",
        id="rule-missing-header",
    ),
    pytest.param(
        _without([*_RULE, "value"]),
        "models.codegen.versions.header_rules[0].value",
        id="rule-missing-value",
    ),
    pytest.param(
        _with([*_RULE, "header"], "X-Canary"),
        "models.codegen.versions.header_rules[0].header",
        id="rule-header-upper-case",
    ),
    pytest.param(
        _with([*_RULE, "value"], True),
        "models.codegen.versions.header_rules[0].value",
        id="rule-value-bool",
    ),
    pytest.param(
        _with([*_RULE, "version"], "two"),
        "models.codegen.versions.header_rules[0].version",
        id="rule-version-not-a-number",
    ),
    pytest.param(
        _with([*_RULE, "weight"], 1),
        "models.codegen.versions.header_rules[0].weight",
        id="rule-unknown-key",
    ),
    # prefix routing
    pytest.param(
        _with([*_PREFIX, "prompt_input"], ""),
        "models.codegen.prefix_routing.prompt_input",
        id="prompt-input-empty",
    ),
    pytest.param(
        _without([*_PREFIX, "prompt_input"]),
        "models.codegen.prefix_routing.prompt_input",
        id="prompt-input-missing",
    ),
    pytest.param(
        _with([*_PREFIX, "block_bytes"], 0),
        "models.codegen.prefix_routing.block_bytes",
        id="block-bytes-zero",
    ),
    pytest.param(
        _with([*_PREFIX, "min_blocks"], 40),
        "models.codegen.prefix_routing",
        id="min-blocks-over-max",
    ),
    pytest.param(
        _with([*_PREFIX, "epsilon"], -0.1),
        "models.codegen.prefix_routing.epsilon",
        id="epsilon-negative",
    ),
    pytest.param(
        _with([*_PREFIX, "blocks"], 3), "models.codegen.prefix_routing.blocks", id="prefix-unknown"
    ),
    pytest.param(_with(_PREFIX, "PROMPT"), "models.codegen.prefix_routing", id="prefix-not-map"),
    # priority classes
    pytest.param(_with(["priority_classes"], {}), "priority_classes", id="classes-empty"),
    pytest.param(
        _with(["priority_classes", "high", "triton_priority"], 0),
        "priority_classes.high.triton_priority",
        id="priority-zero",
    ),
    pytest.param(
        _without(["priority_classes", "high", "triton_priority"]),
        "priority_classes.high.triton_priority",
        id="priority-missing",
    ),
    pytest.param(
        _with(["priority_classes", "low", "sheddable"], "yes"),
        "priority_classes.low.sheddable",
        id="sheddable-string",
    ),
    pytest.param(
        _with(["priority_classes", "low", "level"], 1),
        "priority_classes.low.level",
        id="class-unknown-key",
    ),
    pytest.param(
        _with(["default_priority_class"], "urgent"), "default_priority_class", id="class-unknown"
    ),
    pytest.param(_with(["default_priority_class"], 3), "default_priority_class", id="class-int"),
    pytest.param(
        _without(["default_priority_class"]), "default_priority_class", id="class-default-missing"
    ),
    # demand windows
    pytest.param(_with(["demand"], [1]), "demand", id="demand-not-map"),
    pytest.param(_with(["demand", "bucket_s"], 0), "demand.bucket_s", id="bucket-zero"),
    pytest.param(_with(["demand", "horizon_s"], -1), "demand.horizon_s", id="horizon-negative"),
    pytest.param(
        _with(["demand", "short_window_s"], 900), "demand.short_window_s", id="window>span"
    ),
    pytest.param(_with(["demand", "span_s"], 0.8), "demand.span_s", id="span-one-bucket"),
    pytest.param(_with(["demand", "window_s"], 5), "demand.window_s", id="demand-unknown-key"),
]


@pytest.mark.parametrize(("data", "field"), INVALID)
def test_invalid_field_is_named(data: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(data)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_split_weight_message_reads_as_documented() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(_with([*_V, "split", "2"], 0))
    assert str(info.value) == 'models.codegen.versions.split["2"]: weight must be > 0, got 0'


@pytest.mark.parametrize(
    ("text", "start", "detail"),
    [
        pytest.param("models: [unclosed", "f.yaml: not valid YAML", "", id="bad-yaml"),
        pytest.param(
            "models:\n  codegen: {}\n  codegen: {min_copies: 1}\n",
            "models.codegen: duplicate key",
            "(lines 2 and 3)",
            id="duplicate-key",
        ),
        pytest.param("- 1\n- 2\n", "policy:", "", id="a-list"),
    ],
)
def test_invalid_text(text: str, start: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_text(text, source="f.yaml")
    assert str(info.value).startswith(start), str(info.value)
    assert detail in str(info.value)


# --- select_version ------------------------------------------------------------------------

_SPLIT = VersionRules(split=(("1", 90.0), ("2", 10.0)))
_RULES = VersionRules(
    split=(("1", 90.0), ("2", 10.0)),
    header_rules=(HeaderRule("x-canary", "1", "2"), HeaderRule("x-team", "ml", "3")),
)


@pytest.mark.parametrize(
    ("rules", "headers", "available", "expected"),
    [
        pytest.param(_RULES, {"x-canary": "1"}, {"1", "2"}, "2", id="rule-match"),
        pytest.param(_RULES, {"x-team": "ml"}, {"1", "2"}, "3", id="rule-pins-even-unavailable"),
        pytest.param(
            _RULES, {"x-team": "ml", "x-canary": "1"}, {"1", "2"}, "2", id="first-rule-wins"
        ),
        pytest.param(_RULES, {"x-canary": "0"}, {"1"}, "1", id="no-match-falls-to-split"),
        pytest.param(VersionRules(), {"x-canary": "1"}, {"1", "2"}, None, id="empty-rules"),
        pytest.param(
            VersionRules(header_rules=_RULES.header_rules), {}, {"1"}, None, id="empty-split"
        ),
        pytest.param(_SPLIT, {}, {"1"}, "1", id="only-available-arm"),
        pytest.param(_SPLIT, {}, {"2"}, "2", id="only-the-small-arm-available"),
        pytest.param(_SPLIT, {}, set(), None, id="no-arm-available"),
        pytest.param(_SPLIT, {}, {"3"}, None, id="other-versions-only"),
    ],
)
def test_select_version_table(
    rules: VersionRules, headers: dict[str, str], available: set[str], expected: str | None
) -> None:
    for seed in range(20):
        assert select_version(rules, headers, random.Random(seed), available) == expected


def _shares(chosen: list[str | None]) -> dict[str | None, float]:
    return {v: chosen.count(v) / len(chosen) for v in set(chosen)}


def test_random_split_holds_over_5000_requests() -> None:
    rng = random.Random(7)
    rules = VersionRules(split=(("1", 70.0), ("2", 20.0), ("3", 10.0)))
    shares = _shares([select_version(rules, {}, rng, {"1", "2", "3"}) for _ in range(5000)])
    assert shares["1"] == pytest.approx(0.70, abs=0.02)
    assert shares["2"] == pytest.approx(0.20, abs=0.02)
    assert shares["3"] == pytest.approx(0.10, abs=0.02)


def test_unavailable_arm_gives_its_share_to_the_others() -> None:
    rng = random.Random(8)
    rules = VersionRules(split=(("1", 60.0), ("2", 20.0), ("3", 20.0)))
    shares = _shares([select_version(rules, {}, rng, {"1", "3"}) for _ in range(5000)])
    assert set(shares) == {"1", "3"}
    assert shares["1"] == pytest.approx(0.75, abs=0.02)


def test_sticky_split_one_user_one_version_and_the_split_holds() -> None:
    rules = VersionRules(split=(("1", 90.0), ("2", 10.0)), sticky_header="x-user-id")
    available = {"1", "2"}
    users = [f"user-{i}" for i in range(5000)]
    first = [select_version(rules, {"x-user-id": u}, random.Random(1), available) for u in users]
    again = [select_version(rules, {"x-user-id": u}, random.Random(2), available) for u in users]
    assert first == again
    assert _shares(first)["2"] == pytest.approx(0.10, abs=0.02)
    # The sticky choice draws nothing from the random source.
    rng = random.Random(3)
    state = rng.getstate()
    select_version(rules, {"x-user-id": "someone"}, rng, available)
    assert rng.getstate() == state


def test_sticky_without_the_header_draws_at_random() -> None:
    rules = VersionRules(split=(("1", 50.0), ("2", 50.0)), sticky_header="x-user-id")
    rng = random.Random(4)
    shares = _shares([select_version(rules, {}, rng, {"1", "2"}) for _ in range(5000)])
    assert shares["1"] == pytest.approx(0.5, abs=0.03)


def test_version_rules_guard_direct_use_and_round_trip_the_proto() -> None:
    with pytest.raises(ValueError):
        VersionRules(split=(("1", 0.0),))
    with pytest.raises(ValueError):
        VersionRules(split=(("1", 1.0), ("1", 2.0)))
    rules = parse_policy(FULL).version_rules("codegen")
    message = rules_to_proto(rules)
    assert isinstance(message, pb.VersionPolicy)
    assert rules_from_proto(pb.VersionPolicy.FromString(message.SerializeToString())) == rules
    assert rules_from_proto(pb.VersionPolicy()) == VersionRules()


# --- the store ---------------------------------------------------------------------------------

GOOD = "models:\n  codegen: {min_copies: 1}\n"
GOOD_2 = "models:\n  codegen: {min_copies: 2}\n"
BAD = "models:\n  codegen: {min_copies: -1}\n"


def test_store_without_a_file_serves_the_default() -> None:
    store = PolicyStore(None)
    assert store.current.version == default_policy().version
    assert store.current.source == DEFAULT_SOURCE
    assert store.reload() == (False, default_policy().version)


def test_store_refuses_an_invalid_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError, match=r"^models\.codegen\.min_copies:"):
        PolicyStore(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        PolicyStore(tmp_path / "missing.yaml")


def test_store_reload_applies_changes_and_keeps_the_old_policy_on_a_bad_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    clock = FakeClock(1_700_000_000.0)
    store = PolicyStore(path, clock=clock)
    first = store.current
    assert first.source == str(path)
    assert store.activated_unix_ms == 1_700_000_000_000
    seen: list[Policy] = []
    store.subscribe(seen.append)

    assert store.reload() == (False, first.version)  # nothing changed
    path.write_text(GOOD + "# a comment only\n")
    assert store.reload() == (False, first.version)  # same meaning
    assert store.current.yaml_text.endswith("# a comment only\n")
    assert seen == []

    path.write_text(BAD)
    with pytest.raises(ConfigError, match=r"^models\.codegen\.min_copies:"):
        store.reload()
    assert store.current.version == first.version

    path.unlink()
    with pytest.raises(ConfigError):
        store.reload()
    assert store.current.version == first.version

    path.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="holds no policy"):
        store.reload()
    assert store.current.version == first.version

    clock.now += 5
    path.write_text(GOOD_2)
    changed, version = store.reload()
    assert changed
    assert version == store.current.version != first.version
    assert store.current.model("codegen").min_copies == 2
    assert [p.version for p in seen] == [version]
    assert store.activated_unix_ms == 1_700_000_005_000


def test_a_failing_listener_does_not_stop_the_others(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    store = PolicyStore(path)
    seen: list[str] = []

    def broken(policy: Policy) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    unsubscribe = store.subscribe(lambda p: seen.append(p.version))
    path.write_text(GOOD_2)
    assert store.reload()[0]
    assert seen == [store.current.version]
    unsubscribe()
    path.write_text(GOOD)
    assert store.reload()[0]
    assert len(seen) == 1


async def _until_applied(store: PolicyStore, version_before: str, timeout_s: float) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while store.current.version == version_before:
        if loop.time() - started > timeout_s:
            raise AssertionError(f"policy not applied within {timeout_s} s")
        await asyncio.sleep(0.01)
    return loop.time() - started


@pytest.mark.asyncio
async def test_watch_applies_a_changed_file_within_half_a_second_and_ignores_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    store = PolicyStore(path)
    changes: list[str] = []
    store.subscribe(lambda p: changes.append(p.version))
    watcher = asyncio.create_task(store.watch())
    try:
        for text, min_copies in ((GOOD_2, 2), (GOOD, 1), (GOOD_2, 2)):
            before = store.current.version
            path.write_text(text)
            assert await _until_applied(store, before, timeout_s=0.5) < 0.5
            assert store.current.model("codegen").min_copies == min_copies

        kept = store.current.version
        with caplog.at_level(logging.WARNING, logger="router.policy"):
            path.write_text(BAD)
            await asyncio.sleep(0.8)
        assert store.current.version == kept
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1  # once per content, not once per poll
        assert "models.codegen.min_copies" in refusals[0].getMessage()

        # A file that vanishes keeps the policy; once back, it is applied.
        path.unlink()
        await asyncio.sleep(0.3)
        assert store.current.version == kept
        path.write_text(GOOD)
        await _until_applied(store, kept, timeout_s=0.5)
        assert len(changes) == 4
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


@pytest.mark.asyncio
async def test_watch_sees_a_same_size_rewrite_within_the_timestamp_granularity(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    stat = os.stat(path)
    store = PolicyStore(path)
    watcher = asyncio.create_task(store.watch())
    try:
        await asyncio.sleep(0.3)
        before = store.current.version
        path.write_text(GOOD_2)  # same length as GOOD
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
        assert os.stat(path).st_size == stat.st_size
        assert await _until_applied(store, before, timeout_s=0.5) < 0.5
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


@pytest.mark.asyncio
async def test_watch_never_applies_a_file_caught_half_written(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    store = PolicyStore(path)
    applied: list[str] = []
    store.subscribe(lambda p: applied.append(p.version))
    head = "placement: {enabled: false}\n"  # valid on its own, and not what is meant
    whole = head + GOOD_2
    watcher = asyncio.create_task(store.watch(interval_s=0.01))
    try:
        for _ in range(5):
            before = store.current.version
            with path.open("w") as out:  # truncate: an empty file for a moment
                await asyncio.sleep(0.02)
                out.write(head)
                out.flush()
                await asyncio.sleep(0.02)
                out.write(GOOD_2)
            await _until_applied(store, before, timeout_s=0.5)
            assert store.current.yaml_text == whole
            path.write_text(GOOD)
            await _until_applied(store, store.current.version, timeout_s=0.5)
        assert parse_policy_text(head).version not in applied
        assert default_policy().version not in applied
        assert len(applied) == 10
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


@pytest.mark.asyncio
async def test_watch_without_a_file_returns() -> None:
    await asyncio.wait_for(PolicyStore(None).watch(), timeout=1)


# --- pointsman policy ----------------------------------------------------------------------


def _pointsman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_policy_check_accepts_a_good_file_and_names_the_field_of_a_bad_one(
    tmp_path: Path,
) -> None:
    good = _pointsman("policy", "check", str(EXAMPLE))
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == f"ok {load_policy(EXAMPLE).version}"

    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(_with([*_V, "split", "2"], 0)))
    bad = _pointsman("policy", "check", str(bad_file))
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.strip() == (
        f'{bad_file}: models.codegen.versions.split["2"]: weight must be > 0, got 0'
    )

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    refused = _pointsman("policy", "check", str(empty))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"{empty}: holds no policy")

    missing = _pointsman("policy", "check", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2
    assert str(tmp_path / "missing.yaml") in missing.stderr


class _PolicyServicer(pb_grpc.RouterServiceServicer):
    """Stands in for the router's policy RPCs: the store behind them is the real one."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store

    def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.ServicerContext
    ) -> pb.GetPolicyResponse:
        policy = self.store.current
        return pb.GetPolicyResponse(
            policy_version=policy.version,
            source=policy.source,
            policy_yaml=policy.yaml_text,
            loaded_unix_ms=self.store.activated_unix_ms,
        )

    def ReloadPolicy(
        self, request: pb.ReloadPolicyRequest, context: grpc.ServicerContext
    ) -> pb.ReloadPolicyResponse:
        try:
            changed, version = self.store.reload()
        except ConfigError as exc:
            context.abort(exc.code, str(exc))
        return pb.ReloadPolicyResponse(policy_version=version, changed=changed)


@pytest.fixture
def policy_router(tmp_path: Path) -> Iterator[tuple[str, Path, PolicyStore]]:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    store = PolicyStore(path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RouterServiceServicer_to_server(_PolicyServicer(store), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", path, store
    finally:
        server.stop(None)


def test_policy_reload_and_show_against_a_router(
    policy_router: tuple[str, Path, PolicyStore], capsys: pytest.CaptureFixture[str]
) -> None:
    address, path, store = policy_router
    first = store.current.version

    assert cli.main(["policy", "reload", "--router", address]) == 0
    assert capsys.readouterr().out == f"policy {first} unchanged\n"

    path.write_text(GOOD_2)
    assert cli.main(["policy", "reload", "--router", address]) == 0
    second = store.current.version
    assert second != first
    assert capsys.readouterr().out == f"policy {second} changed\n"

    path.write_text(BAD)
    assert cli.main(["policy", "reload", "--router", address]) == 2
    refused = capsys.readouterr()
    assert "models.codegen.min_copies: must be an integer >= 0" in refused.err
    assert store.current.version == second

    assert cli.main(["policy", "show", "--router", address]) == 0
    shown = capsys.readouterr().out
    assert shown.splitlines()[0].startswith(f"# policy {second} from {path}, active since ")
    assert shown.endswith(GOOD_2)


def test_policy_show_when_the_router_does_not_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    assert cli.main(["policy", "show", "--router", address, "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_router_refuses_to_start_with_an_invalid_policy(tmp_path: Path) -> None:
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(BAD)
    started = _pointsman("router", "--policy", str(bad_file), "--listen", "127.0.0.1:0")
    assert started.returncode == 2
    assert started.stderr.strip() == (
        f"pointsman router: policy {bad_file}: models.codegen.min_copies: "
        "must be an integer >= 0, got -1"
    )
