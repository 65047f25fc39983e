"""Table tests for the filters: which candidates survive, in which order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from pointsman.errors import ConfigError
from router.contracts import (
    Candidate,
    Filter,
    InstanceSnapshot,
    ModelOnInstance,
    RoutingRequest,
    SchedulingCycle,
)
from router.plugins.healthy_fresh import HealthyFreshFilter
from router.plugins.model_ready import ModelReadyFilter

NOW = 100.0
MODEL = "resnet"


def on(
    instance_id: str, *, ready: tuple[str, ...] = (), loading: tuple[str, ...] = ()
) -> Candidate:
    """A healthy, fresh candidate holding MODEL with the given versions."""
    models = {}
    if ready or loading:
        models[MODEL] = ModelOnInstance(
            MODEL, ready_versions=frozenset(ready), loading_versions=frozenset(loading)
        )
    return Candidate(
        InstanceSnapshot(
            instance_id, f"{instance_id}:8001", healthy=True, refreshed_at=NOW, models=models
        )
    )


def seen(instance_id: str, *, healthy: bool = True, refreshed_at: float = NOW) -> Candidate:
    return Candidate(
        InstanceSnapshot(
            instance_id, f"{instance_id}:8001", healthy=healthy, refreshed_at=refreshed_at
        )
    )


def survivors(
    candidate_filter: Filter, candidates: list[Candidate], version: str = "", now: float = NOW
) -> list[str]:
    cycle = SchedulingCycle(RoutingRequest(MODEL, model_version=version), now=now)
    return [c.instance_id for c in candidate_filter.filter(cycle, candidates)]


@pytest.mark.parametrize(
    ("version", "candidates", "expected"),
    [
        pytest.param(
            "",
            [on("a", ready=("1",)), on("b"), on("c", ready=("2",))],
            ["a", "c"],
            id="ready-kept-in-order",
        ),
        pytest.param(
            "", [on("a", loading=("1",)), on("b", ready=("1",))], ["b"], id="ready-beats-loading"
        ),
        pytest.param(
            "",
            [on("a", loading=("1",)), on("b"), on("c", loading=("1",))],
            ["a", "c"],
            id="none-ready-keeps-loading",
        ),
        pytest.param("", [on("a"), on("b")], [], id="nowhere"),
        pytest.param(
            "2",
            [on("a", ready=("1",)), on("b", ready=("1", "2"))],
            ["b"],
            id="pinned-version-ready",
        ),
        pytest.param(
            "2",
            [on("a", ready=("1",), loading=("2",)), on("b", ready=("1",))],
            ["a"],
            id="pinned-version-loading",
        ),
        pytest.param(
            "3", [on("a", ready=("1",)), on("b", loading=("2",))], [], id="pinned-version-nowhere"
        ),
        pytest.param("", [on("a", ready=("1",))], ["a"], id="single"),
        pytest.param("", [], [], id="empty"),
    ],
)
def test_model_ready(version: str, candidates: list[Candidate], expected: list[str]) -> None:
    assert survivors(ModelReadyFilter(), candidates, version) == expected


@pytest.mark.parametrize(
    ("stale_after_s", "candidates", "expected"),
    [
        pytest.param(
            1.0,
            [seen("a"), seen("b", healthy=False), seen("c")],
            ["a", "c"],
            id="unhealthy-dropped",
        ),
        pytest.param(
            1.0,
            [seen("a", refreshed_at=NOW - 1.5), seen("b", refreshed_at=NOW - 0.5)],
            ["b"],
            id="stale-dropped",
        ),
        pytest.param(1.0, [seen("a", refreshed_at=NOW - 1.0)], ["a"], id="at-threshold-kept"),
        pytest.param(5.0, [seen("a", refreshed_at=NOW - 4.0)], ["a"], id="longer-threshold"),
        pytest.param(1.0, [seen("a", healthy=False, refreshed_at=0.0)], [], id="never-refreshed"),
        pytest.param(
            1.0, [seen("a", healthy=False, refreshed_at=NOW - 9)], [], id="unhealthy-and-stale"
        ),
        pytest.param(1.0, [], [], id="empty"),
    ],
)
def test_healthy_fresh(
    stale_after_s: float, candidates: list[Candidate], expected: list[str]
) -> None:
    assert survivors(HealthyFreshFilter(stale_after_s=stale_after_s), candidates) == expected


Factory = Callable[[str, Mapping[str, Any]], object]


@pytest.mark.parametrize(
    ("factory", "params", "message"),
    [
        pytest.param(
            ModelReadyFilter.from_params,
            {"x": 1},
            "x: unknown parameter",
            id="model-ready-no-params",
        ),
        pytest.param(
            HealthyFreshFilter.from_params,
            {"stale_after_s": 0},
            "stale_after_s: must be > 0",
            id="stale-zero",
        ),
        pytest.param(
            HealthyFreshFilter.from_params,
            {"stale_after_s": "1s"},
            "stale_after_s: must be a number",
            id="stale-string",
        ),
        pytest.param(
            HealthyFreshFilter.from_params,
            {"stale_after_s": True},
            "stale_after_s: must be a number",
            id="stale-bool",
        ),
        pytest.param(
            HealthyFreshFilter.from_params,
            {"stale_after_s": float("inf")},
            "stale_after_s: must be finite",
            id="stale-inf",
        ),
        pytest.param(
            HealthyFreshFilter.from_params,
            {"stale": 1},
            "stale: unknown parameter (allowed: stale_after_s)",
            id="misspelt",
        ),
    ],
)
def test_factory_rejects_bad_params(factory: Factory, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        factory("f", params)
    assert str(caught.value).startswith(message)


def test_factories_take_name_and_params() -> None:
    built = HealthyFreshFilter.from_params("fresh-enough", {"stale_after_s": 2})
    assert built == HealthyFreshFilter(name="fresh-enough", stale_after_s=2.0)
    assert ModelReadyFilter.from_params("ready", {}).name == "ready"
