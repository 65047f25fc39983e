"""Table tests for the scorers: one score in [0, 1] per candidate, compared with a tolerance."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from pointsman.affinity import rendezvous_order
from pointsman.errors import ConfigError
from pointsman.prefix_routing import PrefixRouting, key_text
from router.contracts import (
    Candidate,
    InstanceSnapshot,
    ModelOnInstance,
    RoutingRequest,
    SchedulingCycle,
    Scorer,
)
from router.plugins.load import LoadScorer
from router.plugins.memory_headroom import MemoryHeadroomScorer
from router.plugins.model_affinity import ModelAffinityScorer
from router.plugins.prefix_affinity import PrefixAffinityScorer
from router.plugins.queue_depth import QueueDepthScorer

MODEL = "resnet"
GIB = 1 << 30


def holding(ready: tuple[str, ...] = (), loading: tuple[str, ...] = ()) -> Candidate:
    models = {}
    if ready or loading:
        models[MODEL] = ModelOnInstance(
            MODEL, ready_versions=frozenset(ready), loading_versions=frozenset(loading)
        )
    return Candidate(InstanceSnapshot("i", "i:8001", models=models))


def memory(free_gib: float, budget_gib: float = 16) -> Candidate:
    """budget_gib=0 means the budget is unknown."""
    budget = int(budget_gib * GIB)
    used = max(0, budget - int(free_gib * GIB))
    return Candidate(
        InstanceSnapshot("i", "i:8001", memory_budget_bytes=budget, memory_used_bytes=used)
    )


def queued(pending: int, assumed_inflight: int = 0, model: str = MODEL) -> Candidate:
    models = {
        model: ModelOnInstance(model, ready_versions=frozenset({"1"}), pending_requests=pending)
    }
    return Candidate(
        InstanceSnapshot("i", "i:8001", models=models), assumed_inflight=assumed_inflight
    )


def busy(ips: float) -> Candidate:
    return Candidate(InstanceSnapshot("i", "i:8001", inferences_per_second=ips))


def scores(scorer: Scorer, candidates: list[Candidate], version: str = "") -> list[float]:
    cycle = SchedulingCycle(RoutingRequest(MODEL, model_version=version), now=0.0)
    return scorer.score(cycle, candidates)


@pytest.mark.parametrize(
    ("scorer", "version", "candidates", "expected"),
    [
        pytest.param(
            ModelAffinityScorer(),
            "",
            [holding(("1",)), holding(loading=("1",)), holding()],
            [1.0, 0.5, 0.0],
            id="tiers",
        ),
        pytest.param(
            ModelAffinityScorer(loading_score=0.8),
            "",
            [holding(loading=("1",)), holding()],
            [0.8, 0.0],
            id="loading-score-param",
        ),
        pytest.param(
            ModelAffinityScorer(),
            "2",
            [holding(("1",)), holding(("1",), ("2",)), holding(("2",))],
            [0.0, 0.5, 1.0],
            id="pinned-version",
        ),
        pytest.param(
            ModelAffinityScorer(), "", [holding(("1",)), holding(("2",))], [1.0, 1.0], id="equal"
        ),
        pytest.param(
            ModelAffinityScorer(), "", [holding(), holding()], [0.0, 0.0], id="zero-absolute"
        ),
        pytest.param(ModelAffinityScorer(), "", [holding()], [0.0], id="single-absolute"),
        pytest.param(ModelAffinityScorer(), "", [], [], id="empty"),
    ],
)
def test_model_affinity(
    scorer: Scorer, version: str, candidates: list[Candidate], expected: list[float]
) -> None:
    assert scores(scorer, candidates, version) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("scorer", "candidates", "expected"),
    [
        pytest.param(
            MemoryHeadroomScorer(),
            [memory(4), memory(2), memory(0)],
            [1.0, 0.5, 0.0],
            id="distinct",
        ),
        pytest.param(
            MemoryHeadroomScorer(buffer_bytes=2 * GIB),
            [memory(5), memory(3), memory(1)],
            [1.0, 1 / 3, 0.0],
            id="buffer",
        ),
        pytest.param(MemoryHeadroomScorer(), [memory(3), memory(3)], [1.0, 1.0], id="equal"),
        pytest.param(
            MemoryHeadroomScorer(), [memory(0), memory(0)], [0.0, 0.0], id="zero-all-full"
        ),
        pytest.param(
            MemoryHeadroomScorer(buffer_bytes=8 * GIB),
            [memory(4), memory(6)],
            [0.0, 0.0],
            id="all-under-buffer",
        ),
        pytest.param(
            MemoryHeadroomScorer(),
            [memory(4), memory(9, budget_gib=0), memory(2)],
            [1.0, 0.5, 0.0],
            id="unknown-neutral",
        ),
        pytest.param(
            MemoryHeadroomScorer(),
            [memory(0, budget_gib=0), memory(0, budget_gib=0)],
            [1.0, 1.0],
            id="all-unknown",
        ),
        pytest.param(MemoryHeadroomScorer(), [memory(4)], [1.0], id="single"),
        pytest.param(MemoryHeadroomScorer(), [], [], id="empty"),
    ],
)
def test_memory_headroom(
    scorer: Scorer, candidates: list[Candidate], expected: list[float]
) -> None:
    assert scores(scorer, candidates) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("scorer", "candidates", "expected"),
    [
        pytest.param(
            QueueDepthScorer(), [queued(0), queued(5), queued(10)], [1.0, 0.5, 0.0], id="distinct"
        ),
        pytest.param(
            QueueDepthScorer(),
            [queued(4, assumed_inflight=6), queued(5)],
            [0.0, 1.0],
            id="assumed-inflight-counts",
        ),
        pytest.param(
            QueueDepthScorer(),
            [queued(9, model="other"), queued(3)],
            [1.0, 0.0],
            id="other-models-ignored",
        ),
        pytest.param(
            QueueDepthScorer(), [queued(7), queued(7), queued(7)], [1.0, 1.0, 1.0], id="equal"
        ),
        pytest.param(QueueDepthScorer(), [queued(0), queued(0)], [1.0, 1.0], id="zero"),
        pytest.param(
            QueueDepthScorer(saturation=4),
            [queued(0), queued(4), queued(10)],
            [1.0, 0.0, 0.0],
            id="saturated",
        ),
        pytest.param(
            QueueDepthScorer(saturation=20),
            [queued(0), queued(4), queued(10)],
            [1.0, 0.6, 0.0],
            id="under-saturation",
        ),
        pytest.param(QueueDepthScorer(saturation=3), [queued(5)], [0.0], id="single-saturated"),
        pytest.param(QueueDepthScorer(), [queued(5)], [1.0], id="single"),
        pytest.param(QueueDepthScorer(), [], [], id="empty"),
    ],
)
def test_queue_depth(scorer: Scorer, candidates: list[Candidate], expected: list[float]) -> None:
    assert scores(scorer, candidates) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("scorer", "candidates", "expected"),
    [
        pytest.param(LoadScorer(), [busy(0), busy(50), busy(100)], [1.0, 0.5, 0.0], id="distinct"),
        pytest.param(LoadScorer(), [busy(30), busy(30)], [1.0, 1.0], id="equal"),
        pytest.param(LoadScorer(), [busy(0), busy(0)], [1.0, 1.0], id="zero"),
        pytest.param(
            LoadScorer(capacity_ips=200),
            [busy(0), busy(50), busy(300)],
            [1.0, 0.75, 0.0],
            id="capacity-absolute",
        ),
        pytest.param(LoadScorer(capacity_ips=100), [busy(25)], [0.75], id="capacity-single"),
        pytest.param(LoadScorer(), [busy(25)], [1.0], id="single"),
        pytest.param(LoadScorer(), [], [], id="empty"),
    ],
)
def test_load(scorer: Scorer, candidates: list[Candidate], expected: list[float]) -> None:
    assert scores(scorer, candidates) == pytest.approx(expected)


KEY = key_text(0x5EED_C0DE_0000_0001)
PREFIX = PrefixRouting("PROMPT", epsilon=0.25)


def holders_in_key_order(loads: list[int]) -> list[Candidate]:
    """One candidate per load, ordered as the key's rendezvous order ranks their addresses:
    the first is the key's preferred holder, the second its next choice, ..."""
    addresses = [f"10.0.0.{i}:8001" for i in range(len(loads))]
    order = rendezvous_order(int(KEY, 16), addresses)
    return [
        Candidate(
            InstanceSnapshot(
                address,
                address,
                models={MODEL: ModelOnInstance(MODEL, frozenset({"1"}), pending_requests=load)},
            )
        )
        for address, load in zip(order, loads, strict=True)
    ]


@pytest.mark.parametrize(
    ("key", "prefix", "loads", "expected"),
    [
        pytest.param(KEY, PREFIX, [0, 0, 0], [1.0, 0.0, 0.0], id="idle-preferred"),
        pytest.param(KEY, PREFIX, [4, 4, 4], [1.0, 0.0, 0.0], id="all-equal-preferred"),
        # bound ceil(1.25 x (6 + 1) / 3) = 3: the preferred (3 + 1) is over it, the next is not
        pytest.param(KEY, PREFIX, [3, 2, 1], [0.0, 1.0, 0.0], id="over-bound-next"),
        pytest.param(KEY, PREFIX, [5, 5, 0], [0.0, 0.0, 1.0], id="two-over-bound-third"),
        pytest.param(
            KEY, PrefixRouting("PROMPT", epsilon=2.0), [3, 2, 1], [1.0, 0.0, 0.0], id="epsilon"
        ),
        pytest.param(KEY, PREFIX, [50], [1.0], id="single-holder"),
        pytest.param("", PREFIX, [0, 0], [0.0, 0.0], id="no-key-zero"),
        pytest.param(KEY, None, [0, 0], [0.0, 0.0], id="prefix-routing-off-zero"),
        pytest.param(KEY, PREFIX, [], [], id="empty"),
    ],
)
def test_prefix_affinity(
    key: str, prefix: PrefixRouting | None, loads: list[int], expected: list[float]
) -> None:
    cycle = SchedulingCycle(RoutingRequest(MODEL, affinity_key=key), now=0.0, prefix=prefix)
    got = PrefixAffinityScorer().score(cycle, holders_in_key_order(loads))
    assert got == pytest.approx(expected)


def test_prefix_affinity_counts_assumed_inflight_and_reads_any_text_key() -> None:
    candidates = holders_in_key_order([0, 0])
    busy_first = [Candidate(candidates[0].instance, assumed_inflight=9), candidates[1]]
    cycle = SchedulingCycle(RoutingRequest(MODEL, affinity_key=KEY), now=0.0, prefix=PREFIX)
    assert PrefixAffinityScorer().score(cycle, busy_first) == [0.0, 1.0]
    session = SchedulingCycle(RoutingRequest(MODEL, affinity_key="user-7"), now=0.0, prefix=PREFIX)
    first = rendezvous_order("user-7", [c.instance.grpc_address for c in candidates])[0]
    assert PrefixAffinityScorer().score(session, candidates) == [
        1.0 if c.instance.grpc_address == first else 0.0 for c in candidates
    ]


Factory = Callable[[str, Mapping[str, Any]], object]


@pytest.mark.parametrize(
    ("factory", "params", "expected"),
    [
        pytest.param(
            ModelAffinityScorer.from_params,
            {"loading_score": 0.7},
            ModelAffinityScorer("s", 0.7),
            id="affinity",
        ),
        pytest.param(
            MemoryHeadroomScorer.from_params,
            {"buffer_bytes": 2 * GIB},
            MemoryHeadroomScorer("s", 2.0 * GIB),
            id="memory",
        ),
        pytest.param(
            QueueDepthScorer.from_params, {"saturation": 8}, QueueDepthScorer("s", 8.0), id="queue"
        ),
        pytest.param(
            QueueDepthScorer.from_params,
            {"saturation": None},
            QueueDepthScorer("s", None),
            id="queue-null",
        ),
        pytest.param(LoadScorer.from_params, {}, LoadScorer("s", None), id="load-defaults"),
        pytest.param(
            PrefixAffinityScorer.from_params, {}, PrefixAffinityScorer("s"), id="prefix-affinity"
        ),
    ],
)
def test_factory_builds(factory: Factory, params: dict[str, Any], expected: object) -> None:
    assert factory("s", params) == expected


@pytest.mark.parametrize(
    ("factory", "params", "message"),
    [
        pytest.param(
            ModelAffinityScorer.from_params,
            {"loading_score": 1.5},
            "loading_score: must be <= 1",
            id="affinity-over-1",
        ),
        pytest.param(
            ModelAffinityScorer.from_params,
            {"loading_score": -0.1},
            "loading_score: must be >= 0",
            id="affinity-negative",
        ),
        pytest.param(
            MemoryHeadroomScorer.from_params,
            {"buffer_bytes": -1},
            "buffer_bytes: must be >= 0",
            id="buffer-negative",
        ),
        pytest.param(
            MemoryHeadroomScorer.from_params,
            {"buffer_bytes": "2GiB"},
            "buffer_bytes: must be a number, got str",
            id="buffer-string",
        ),
        pytest.param(
            QueueDepthScorer.from_params,
            {"saturation": 0},
            "saturation: must be > 0",
            id="saturation-zero",
        ),
        pytest.param(
            LoadScorer.from_params,
            {"capacity_ips": -5},
            "capacity_ips: must be > 0",
            id="capacity-negative",
        ),
        pytest.param(
            LoadScorer.from_params,
            {"capacity": 5},
            "capacity: unknown parameter (allowed: capacity_ips)",
            id="misspelt",
        ),
        pytest.param(
            PrefixAffinityScorer.from_params,
            {"epsilon": 0.5},
            "epsilon: unknown parameter (allowed: none)",
            id="prefix-affinity-takes-none",
        ),
    ],
)
def test_factory_rejects_bad_params(factory: Factory, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        factory("s", params)
    assert str(caught.value).startswith(message)
