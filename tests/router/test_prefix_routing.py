"""Prefix routing in the router: decisions with an affinity key, route tables that carry the
policy (and change with it), the protos, and the prefix caches' hit ratio from the collector's
counters to ListInstances, ListModels and /metrics. The scorer's own table is in
test_scorers.py; the proof on real Tritons is tests/integration/test_prefix_routing.py."""

from __future__ import annotations

import random

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pointsman.affinity import rendezvous_order
from pointsman.prefix_routing import PrefixRouting, key_text
from pointsman.router.v1 import router_pb2 as pb
from router.contracts import FleetSnapshot, InstanceSnapshot, ModelOnInstance, RoutingRequest
from router.datalayer.counters import CounterWindow
from router.decision import DecisionPolicy, decide
from router.metrics import FleetView
from router.plugins.registry import default_profile
from router.proto_convert import (
    instances_to_proto,
    models_to_proto,
    request_from_proto,
    table_to_proto,
)
from router.routes import RouteBook
from router.service import _describe_decision

NOW = 100.0
MODEL = "codegen"
PREFIX = PrefixRouting("PROMPT", epsilon=0.25)
KEY = 0x00C0_FFEE_0000_0042
ADDRESSES = ("10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001")
ORDER = rendezvous_order(KEY, ADDRESSES)  # the key's holders, preferred first


def instance(
    address: str, pending: int = 0, lookups: float = 0.0, hits: float = 0.0
) -> InstanceSnapshot:
    model = ModelOnInstance(
        MODEL,
        ready_versions=frozenset({"1"}),
        pending_requests=pending,
        prefix_cache_lookup_blocks=lookups,
        prefix_cache_hit_blocks=hits,
    )
    return InstanceSnapshot(
        address, address, healthy=True, refreshed_at=NOW, models={MODEL: model},
        memory_budget_bytes=1000,
    )  # fmt: skip


def fleet(*instances: InstanceSnapshot) -> FleetSnapshot:
    return FleetSnapshot(taken_at=NOW, instances=instances, known_models=frozenset({MODEL}))


def policy(prefix: PrefixRouting | None = PREFIX) -> DecisionPolicy:
    return DecisionPolicy(default_profile(), prefix_routing={MODEL: prefix} if prefix else {})


def pick(snapshot: FleetSnapshot, key: str, prefix: PrefixRouting | None = PREFIX) -> str:
    request = RoutingRequest(MODEL, affinity_key=key)
    decision = decide(request, snapshot, policy(prefix), now=NOW, rng=random.Random(1))
    assert decision.pick is not None
    return decision.pick.candidate.instance.grpc_address


def test_a_key_picks_its_holder_over_a_shorter_queue_while_within_the_bound() -> None:
    # The preferred holder has the longest queue (2 + 1 of 5): within ceil(1.25 x 5 / 3) = 3.
    loads = {ORDER[0]: 2, ORDER[1]: 1, ORDER[2]: 1}
    snapshot = fleet(*(instance(a, loads[a]) for a in ADDRESSES))
    assert {pick(snapshot, key_text(KEY)) for _ in range(20)} == {ORDER[0]}


def test_a_key_spills_to_its_next_holder_over_the_bound() -> None:
    loads = {ORDER[0]: 3, ORDER[1]: 2, ORDER[2]: 1}
    snapshot = fleet(*(instance(a, loads[a]) for a in ADDRESSES))
    assert pick(snapshot, key_text(KEY)) == ORDER[1]


def test_without_a_key_or_prefix_routing_the_usual_scores_decide() -> None:
    loads = {ORDER[0]: 9, ORDER[1]: 0, ORDER[2]: 9}
    snapshot = fleet(*(instance(a, loads[a]) for a in ADDRESSES))
    assert pick(snapshot, "") == ORDER[1]
    assert pick(snapshot, key_text(KEY), prefix=None) == ORDER[1]


def test_route_tables_carry_the_policy_and_a_reload_republishes_them_unweighted_by_it() -> None:
    snapshot = fleet(*(instance(a, p) for a, p in zip(ADDRESSES, (0, 4, 8), strict=True)))
    plain = RouteBook(policy(None), ttl_ms=1000)
    plain.rebuild(snapshot, NOW)
    book = RouteBook(policy(PREFIX), ttl_ms=1000)
    book.rebuild(snapshot, NOW)
    table = book.tables[MODEL]
    assert table.prefix_routing == PREFIX
    # Tables are ranked without a key: the scorer adds nothing to their weights.
    assert table.candidates == plain.tables[MODEL].candidates
    message = table_to_proto(table, ttl_ms=1000)
    assert PrefixRouting.from_proto(message.prefix_routing) == PREFIX
    book.policy = policy(None)
    update = book.rebuild(snapshot, NOW)
    assert update is not None and [t.model_name for t in update.tables] == [MODEL]
    assert not table_to_proto(book.tables[MODEL], ttl_ms=1000).HasField("prefix_routing")
    assert book.rebuild(snapshot, NOW) is None


def test_pick_target_requests_carry_the_key() -> None:
    request = request_from_proto(pb.PickTargetRequest(model_name=MODEL, affinity_key="00ab"))
    assert request.affinity_key == "00ab"


def test_hit_ratio_per_instance_and_over_the_fleet() -> None:
    snapshot = fleet(
        instance(ADDRESSES[0], lookups=100, hits=90),
        instance(ADDRESSES[1], lookups=300, hits=30),
        instance(ADDRESSES[2]),
    )
    listed = instances_to_proto(snapshot, NOW).instances
    assert [(m.prefix_cache_lookup_blocks, round(m.prefix_cache_hit_ratio, 6))
            for i in listed for m in i.models] == [(100, 0.9), (300, 0.1), (0, 0.0)]  # fmt: skip
    summary = models_to_proto(snapshot, {}, 1000, None).models[0]
    assert summary.prefix_cache_lookup_blocks == 400
    assert summary.prefix_cache_hit_ratio == 0.3
    book = RouteBook(policy(), ttl_ms=1000)
    samples = {
        (s.name, tuple(s.labels.values())): s.value
        for family in FleetView(lambda: snapshot, book, lambda: NOW).collect()
        for s in family.samples
    }
    assert samples[("pointsman_router_prefix_cache_hit_ratio", (MODEL,))] == 0.3


def test_no_lookups_means_no_ratio() -> None:
    snapshot = fleet(instance(ADDRESSES[0]))
    assert snapshot.instances[0].models[MODEL].prefix_cache_hit_ratio is None
    assert models_to_proto(snapshot, {}, 1000, None).models[0].prefix_cache_lookup_blocks == 0
    families = FleetView(lambda: snapshot, RouteBook(policy(), ttl_ms=1000), lambda: NOW).collect()
    ratio = next(f for f in families if f.name == "pointsman_router_prefix_cache_hit_ratio")
    assert not ratio.samples


def test_counter_window_gives_increases_per_series_and_ignores_resets() -> None:
    window = CounterWindow(window_s=5.0)
    assert window.increases() == (0.0, [])
    window.add(0.0, {"m": 10.0}, {"m": 5.0})
    window.add(1.0, {"m": 30.0, "new": 4.0}, {"m": 2.0})  # the second series was reset
    window.add(7.0, {"m": 50.0, "new": 6.0}, {"m": 3.0})
    seconds, (first, second) = window.increases()
    assert seconds == 6.0  # the scrape at 0.0 left the window
    assert first == {"m": 20.0, "new": 2.0} and second == {"m": 1.0}


def test_the_pick_span_names_the_key_and_the_scorer_that_chose() -> None:
    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    loads = {ORDER[0]: 2, ORDER[1]: 1, ORDER[2]: 1}
    snapshot = fleet(*(instance(a, loads[a]) for a in ADDRESSES))
    request = RoutingRequest(MODEL, affinity_key=key_text(KEY))
    decision = decide(request, snapshot, policy(), now=NOW, rng=random.Random(1))
    with provider.get_tracer("test").start_as_current_span("PickTarget") as span:
        _describe_decision(span, decision)
    (finished,) = spans.get_finished_spans()
    attributes = finished.attributes or {}
    assert attributes["pointsman.affinity_key"] == key_text(KEY)
    assert attributes["pointsman.target_address"] == ORDER[0]
    assert "prefix-affinity=1.00" in str(attributes["pointsman.target_scores"])
