"""pointsman/affinity.py: rendezvous hashing with bounded loads, for prefixes and sessions."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from pointsman.affinity import (
    AffinityChoice,
    choose_holder,
    key_hash,
    load_bound,
    rendezvous_order,
)

HOLDERS = ("triton-0", "triton-1", "triton-2")


@pytest.mark.parametrize(
    ("case", "holders", "loads_by_rank", "epsilon", "cost", "expected_rank"),
    [
        ("all idle: the preferred holder", HOLDERS, [0, 0, 0], 0.25, 1, 0),
        ("all equal: the preferred holder", HOLDERS, [4, 4, 4], 0.0, 1, 0),
        ("one holder takes everything", ("only",), [100], 0.0, 1, 0),
        ("preferred at the bound: the next", HOLDERS, [3, 2, 2], 0.0, 1, 1),
        ("epsilon gives room above the mean", HOLDERS, [3, 2, 2], 0.5, 1, 0),
        ("two over the bound: the third", HOLDERS, [9, 9, 0], 0.1, 1, 2),
        ("within a large epsilon", HOLDERS, [9, 9, 0], 0.5, 1, 0),
        ("fractional loads that fit", HOLDERS[:2], [0.9, 0.9], 0.0, 0.5, 0),
        ("none fits: the least loaded", HOLDERS[:2], [1.5, 1.4], 0.0, 1, 1),
        ("none fits, ties: earliest in order", HOLDERS, [0, 0, 0], 0.0, 3, 0),
    ],
)
def test_bounded_choice(
    case: str,
    holders: tuple[str, ...],
    loads_by_rank: list[float],
    epsilon: float,
    cost: float,
    expected_rank: int,
) -> None:
    for key in (b"prefix", 0xDEADBEEF, "session-42"):
        order = rendezvous_order(key, holders)
        loads = dict(zip(order, loads_by_rank, strict=True))
        choice = choose_holder(key, holders, loads, epsilon, cost)
        assert choice == AffinityChoice(order[expected_rank], order[0], expected_rank), case
        assert choice.fell_back == (expected_rank > 0)


def test_holders_without_a_load_carry_none() -> None:
    order = rendezvous_order(b"k", HOLDERS)
    assert choose_holder(b"k", HOLDERS, {}, 0.0).holder == order[0]
    # The preferred holder busy, the others unknown to `loads`: the next one takes it.
    assert choose_holder(b"k", HOLDERS, {order[0]: 5}, 0.0).holder == order[1]


def test_the_order_ignores_how_holders_are_listed() -> None:
    for key in range(200):
        order = rendezvous_order(key, HOLDERS)
        assert rendezvous_order(key, tuple(reversed(HOLDERS))) == order
        assert rendezvous_order(key, HOLDERS + HOLDERS[:1]) == order  # duplicates dropped
        assert sorted(order) == sorted(HOLDERS)


@pytest.mark.parametrize(("holders", "epsilon"), [((), 0.1), (HOLDERS, -0.01)])
def test_bad_arguments_are_refused(holders: tuple[str, ...], epsilon: float) -> None:
    with pytest.raises(ValueError):
        choose_holder(b"k", holders, {}, epsilon)


def test_keys_of_every_kind_hash_to_64_bits() -> None:
    assert key_hash(5) == 5 and key_hash(-1) == (1 << 64) - 1
    assert key_hash("s") == key_hash(b"s")
    assert 0 <= key_hash(b"") < 1 << 64


def test_keys_spread_evenly_over_holders() -> None:
    holders = [f"triton-{i}" for i in range(6)]
    counts = Counter(rendezvous_order(key, holders)[0] for key in range(6000))
    assert set(counts) == set(holders)
    assert all(850 <= c <= 1150 for c in counts.values()), counts


def test_adding_a_holder_moves_only_the_keys_it_now_prefers() -> None:
    before = [f"triton-{i}" for i in range(5)]
    after = [*before, "triton-5"]
    keys = range(6000)
    moved = 0
    for key in keys:
        old, new = rendezvous_order(key, before)[0], rendezvous_order(key, after)[0]
        if old != new:
            assert new == "triton-5", key  # nothing moves between the old holders
            moved += 1
    assert abs(moved / len(keys) - 1 / 6) < 0.03, moved


def test_removing_a_holder_moves_only_its_own_keys() -> None:
    before = [f"triton-{i}" for i in range(5)]
    after = [h for h in before if h != "triton-2"]
    for key in range(3000):
        old_order = rendezvous_order(key, before)
        new = rendezvous_order(key, after)[0]
        if old_order[0] != "triton-2":
            assert new == old_order[0], key
        else:
            assert new == old_order[1], key  # the next in its own order: no reshuffle


def test_a_hot_prefix_with_half_the_traffic_never_pushes_a_holder_past_the_bound() -> None:
    rng = random.Random(20240607)
    holders = [f"triton-{i}" for i in range(4)]
    epsilon = 0.25
    loads = dict.fromkeys(holders, 0)
    in_flight: list[tuple[int, str]] = []  # (finish step, holder)
    hot = b"hot repository context"
    hot_placed: Counter[str] = Counter()
    worst_excess = 0.0  # load over (1 + eps) x mean, in requests
    for step in range(20_000):
        for done in [f for f in in_flight if f[0] <= step]:
            in_flight.remove(done)
            loads[done[1]] -= 1
        key: bytes | int = hot if rng.random() < 0.5 else rng.getrandbits(64)
        choice = choose_holder(key, holders, loads, epsilon)
        loads[choice.holder] += 1
        total = sum(loads.values())
        # The chosen holder stays within ceil((1 + eps) x mean), the mean with this request.
        assert loads[choice.holder] <= math.ceil((1 + epsilon) * total / len(holders)), step
        bound = (1 + epsilon) * total / len(holders)
        worst_excess = max(worst_excess, loads[choice.holder] - bound)
        in_flight.append((step + rng.randint(5, 40), choice.holder))
        if key == hot:
            hot_placed[choice.holder] += 1
    preferred = rendezvous_order(hot, holders)[0]
    # The hot prefix stays mostly on its holder, and spills over rather than burying it.
    assert hot_placed[preferred] == max(hot_placed.values())
    assert len(hot_placed) > 1
    assert worst_excess < 1  # only the rounding up of ceil(), less than one request


def test_load_bound_counts_the_new_request() -> None:
    assert load_bound(0, 3, 0.0) == 1  # an idle fleet still takes a request
    assert load_bound(11, 4, 0.25) == 4  # ceil(1.25 x 12 / 4) = ceil(3.75)
    assert load_bound(0, 1, 0.0, cost=3) == 3
