"""Pickers: deterministic with a seeded random source, and they do not herd."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pointsman.errors import ConfigError
from router.contracts import Candidate, InstanceSnapshot, Picker, ScoredCandidate
from router.plugins.max_score import MaxScorePicker
from router.plugins.power_of_two import PowerOfTwoPicker
from router.plugins.registry import PluginKind, default_registry
from router.plugins.weighted_random import WeightedRandomPicker

PICKS = 3000
_REGISTRY = default_registry()
# Every registered picker with its default parameters: the properties below hold for all.
ALL_PICKERS = [
    pytest.param(_REGISTRY.create_picker(type_name, type_name, {}), id=type_name)
    for type_name in _REGISTRY.type_names(PluginKind.PICKER)
]


def scored(**totals: float) -> list[ScoredCandidate]:
    """scored(a=3, b=1): one scored candidate per keyword, instance id = keyword."""
    return [
        ScoredCandidate(Candidate(InstanceSnapshot(instance_id, f"{instance_id}:8001")), total)
        for instance_id, total in totals.items()
    ]


def ids(ordered: list[ScoredCandidate]) -> list[str]:
    return [item.candidate.instance_id for item in ordered]


def primary_shares(
    picker: Picker, candidates: list[ScoredCandidate], seed: int = 7
) -> dict[str, float]:
    rng = random.Random(seed)
    counts = Counter(picker.pick(candidates, rng)[0].candidate.instance_id for _ in range(PICKS))
    return {instance_id: counts[instance_id] / PICKS for instance_id in ids(candidates)}


@pytest.mark.parametrize("picker", ALL_PICKERS)
def test_empty_and_single(picker: Picker) -> None:
    assert picker.pick([], random.Random(1)) == []
    assert ids(picker.pick(scored(a=0.4), random.Random(1))) == ["a"]


@pytest.mark.parametrize("picker", ALL_PICKERS)
def test_seeded_picks_repeat(picker: Picker) -> None:
    candidates = scored(a=3, b=3, c=2.9, d=1)
    first = [ids(picker.pick(candidates, random.Random(42))) for _ in range(5)]
    random.seed(999)  # the global source must play no part
    second = [ids(picker.pick(candidates, random.Random(42))) for _ in range(5)]
    assert first == second


@pytest.mark.parametrize("picker", ALL_PICKERS)
def test_fallbacks_follow_total_descending(picker: Picker) -> None:
    candidates = scored(c=1, a=5, d=0, b=4.9)
    rng = random.Random(3)
    for _ in range(50):
        ordered = picker.pick(candidates, rng)
        assert sorted(ids(ordered)) == ["a", "b", "c", "d"]
        fallbacks = [item.total for item in ordered[1:]]
        assert fallbacks == sorted(fallbacks, reverse=True)


@pytest.mark.parametrize("picker", ALL_PICKERS)
def test_equal_totals_share_fairly(picker: Picker) -> None:
    shares = primary_shares(picker, scored(a=2, b=2, c=2))
    assert shares == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=0.04)


def test_weighted_random_clear_best_always_wins() -> None:
    assert primary_shares(WeightedRandomPicker(tolerance=0.1), scored(a=5, b=7, c=4)) == {
        "a": 0.0,
        "b": 1.0,
        "c": 0.0,
    }


def test_weighted_random_near_best_proportional_to_total() -> None:
    shares = primary_shares(WeightedRandomPicker(tolerance=0.1), scored(a=10, b=9.5, c=5))
    assert shares == pytest.approx({"a": 10 / 19.5, "b": 9.5 / 19.5, "c": 0.0}, abs=0.04)


def test_weighted_random_full_tolerance_shortlists_all() -> None:
    shares = primary_shares(WeightedRandomPicker(tolerance=1.0), scored(a=3, b=1, c=0))
    assert shares == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.0}, abs=0.04)


def test_weighted_random_zero_tolerance_only_ties() -> None:
    shares = primary_shares(WeightedRandomPicker(tolerance=0.0), scored(a=2, b=2, c=1.99))
    assert shares == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0}, abs=0.04)


def test_weighted_random_all_zero_totals_uniform() -> None:
    shares = primary_shares(WeightedRandomPicker(), scored(a=0, b=0))
    assert shares == pytest.approx({"a": 0.5, "b": 0.5}, abs=0.04)


def test_power_of_two_better_of_pair_wins() -> None:
    # Pairs ab, ac, bc are equally likely: a wins two of them, b one, c none.
    shares = primary_shares(PowerOfTwoPicker(), scored(a=3, b=2, c=1))
    assert shares == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 0.0}, abs=0.04)


def test_max_score_only_best_wins_and_rounding_ties() -> None:
    shares = primary_shares(MaxScorePicker(), scored(a=0.1 + 0.2, b=0.3, c=0.29))
    assert shares == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0}, abs=0.04)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"tolerance": 1.5}, "tolerance: must be <= 1", id="over-1"),
        pytest.param({"tolerance": -0.1}, "tolerance: must be >= 0", id="negative"),
        pytest.param({"tolerance": "10%"}, "tolerance: must be a number, got str", id="string"),
        pytest.param({"tol": 0.1}, "tol: unknown parameter (allowed: tolerance)", id="misspelt"),
    ],
)
def test_weighted_random_rejects_bad_params(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WeightedRandomPicker.from_params("p", params)
    assert str(caught.value).startswith(message)


def test_parameterless_pickers_reject_params() -> None:
    with pytest.raises(ConfigError, match=r"^k: unknown parameter"):
        PowerOfTwoPicker.from_params("p", {"k": 2})
    with pytest.raises(ConfigError, match=r"^tolerance: unknown parameter"):
        MaxScorePicker.from_params("p", {"tolerance": 0})
    assert WeightedRandomPicker.from_params("p", {}) == WeightedRandomPicker("p", 0.1)
