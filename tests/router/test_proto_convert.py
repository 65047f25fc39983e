"""The router's types to and from RouterService messages (router/proto_convert.py)."""

from __future__ import annotations

import random

from pointsman.router.v1 import router_pb2 as pb
from router.contracts import FleetSnapshot, InstanceSnapshot, MemorySource, ModelOnInstance
from router.decision import DecisionPolicy, decide
from router.plugins.registry import default_profile
from router.proto_convert import (
    instances_to_proto,
    pick_to_proto,
    request_from_proto,
    table_to_proto,
)
from router.routes import ModelRoutes, RouteEntry

NOW = 10.0


def test_request_headers_are_lower_cased() -> None:
    request = request_from_proto(
        pb.PickTargetRequest(model_name="m", model_version="2", headers={"X-Canary": "1"})
    )
    assert (request.model_name, request.model_version) == ("m", "2")
    assert request.headers == {"x-canary": "1"}
    assert request.affinity_key == ""


def test_pick_lists_target_then_fallbacks_with_versions_in_numeric_order() -> None:
    model = ModelOnInstance("m", ready_versions=frozenset({"10", "9"}))
    instances = tuple(
        InstanceSnapshot(i, f"{i}:8001", healthy=True, refreshed_at=NOW, models={"m": model})
        for i in ("a", "b")
    )
    snapshot = FleetSnapshot(taken_at=NOW, instances=instances, known_models=frozenset({"m"}))
    decision = decide(
        request_from_proto(pb.PickTargetRequest(model_name="m")),
        snapshot,
        DecisionPolicy(default_profile()),
        now=NOW,
        rng=random.Random(0),
    )
    response = pick_to_proto(decision, generation=7)
    assert [response.target.instance_id, *(f.instance_id for f in response.fallbacks)] == [
        t.candidate.instance_id for t in decision.targets
    ]
    assert list(response.target.ready_versions) == ["9", "10"]
    assert response.generation == 7 and response.model_version == ""


def test_instances_report_age_and_model_states() -> None:
    model = ModelOnInstance(
        "m", ready_versions=frozenset({"1"}), loading_versions=frozenset({"2"}), pending_requests=3
    )
    fresh = InstanceSnapshot(
        "a",
        "a:8001",
        healthy=True,
        refreshed_at=NOW - 0.25,
        models={"m": model},
        memory_source=MemorySource.DECLARED,
    )
    never = InstanceSnapshot("b", "b:8001")
    snapshot = FleetSnapshot(taken_at=NOW, instances=(fresh, never))
    listed = instances_to_proto(snapshot, NOW).instances
    assert listed[0].data_age_ms == 250 and listed[1].data_age_ms == 2**32 - 1
    assert [(m.model_version, m.state, m.pending_requests) for m in listed[0].models] == [
        ("1", pb.MODEL_STATE_READY, 3),
        ("2", pb.MODEL_STATE_LOADING, 3),
    ]
    assert listed[0].memory_source == pb.MEMORY_SOURCE_DECLARED


def test_route_tables_carry_capacity_clamped_to_uint32() -> None:
    table = ModelRoutes(
        "codegen",
        (RouteEntry("a", "10.0.0.1:8001", ("1",), 1.0, concurrency=8, queue_capacity=2**40),
         RouteEntry("b", "10.0.0.2:8001", ("1",), 0.5)),
        default_version="1",
        generation=3,
    )  # fmt: skip
    message = table_to_proto(table, ttl_ms=1000)
    assert [(c.concurrency, c.queue_capacity) for c in message.candidates] == [
        (8, 2**32 - 1),
        (0, 0),
    ]
