"""Prefix routing in the sidecar (sidecar/prefix_routing.py and its wiring in decide.py).

Table tests of the bounded-load choice over a route's candidates (all equal, one holder, over
the bound, weights, ejected holders, the holder set changing), then the request path over an
in-memory upstream: route tables from a router that carry the policy, requests that share a
prompt prefix going to one instance, the spill when that instance is busy, requests without a
key, per-request mode passing the key to PickTarget, metrics and the span's reason. The proof
on real Tritons is tests/integration/test_prefix_routing.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2 as triton_pb

from pointsman.affinity import rendezvous_order
from pointsman.prefix import PrefixBlocks, prefix_key
from pointsman.prefix_routing import PrefixRouting, key_text, parse_affinity_key
from pointsman.router.v1 import router_pb2 as pb
from sidecar import prefix_routing
from sidecar.balancer import CandidateSet
from sidecar.config import SidecarConfig
from sidecar.metrics import SidecarMetrics
from sidecar.routes import RouteCache
from sidecar.service import InferenceProxy
from sidecar.testing import MockCall, MockContext, MockTransport, MockUpstream
from sidecar.tracing import PREFIX_ROUTE, RpcTracer
from sidecar.upstream import UpstreamPool
from tests.support.fakes import FakeClock

A, B, C, D = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001", "10.0.0.4:8001"
POLICY = PrefixRouting("PROMPT", block_bytes=64, max_blocks=16, epsilon=0.25)
CONTEXT = b"".join(b"def helper_%d(x):\n    return x * %d\n" % (i, i) for i in range(60))


def upstreams(*loads: int, addresses: tuple[str, ...] = (A, B, C, D)) -> list[MockUpstream]:
    made = []
    for address, load in zip(addresses, loads, strict=False):
        upstream = MockTransport(lambda call: b"")(address)
        assert isinstance(upstream, MockUpstream)
        upstream.in_flight = load
        made.append(upstream)
    return made


def in_key_order(key: int, loads: list[int], weights: list[float] | None = None) -> CandidateSet:
    """Candidates whose i-th member is the key's i-th holder in rendezvous order, with the
    i-th load (and weight)."""
    order = rendezvous_order(key, [A, B, C, D][: len(loads)])
    made = upstreams(*loads, addresses=order)
    return CandidateSet(made, weights or [1.0] * len(made))


KEY = 0x0123_4567_89AB_CDEF


# -- the choice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "weights", "rank", "outcome"),
    [
        pytest.param([0, 0, 0], None, 0, "preferred", id="idle"),
        pytest.param([5, 5, 5], None, 0, "preferred", id="all-equal"),
        pytest.param([7], None, 0, "preferred", id="one-holder"),
        # bound ceil(1.25 x (6 + 1) / 3) = 3: the first holder (3 + 1) is over it
        pytest.param([3, 2, 1], None, 1, "load_fallback", id="over-bound"),
        pytest.param([5, 5, 0], None, 2, "load_fallback", id="two-over-bound"),
        pytest.param([2, 2, 2], None, 0, "preferred", id="equal-at-bound"),
        # weight 0.5 counts the first holder's 2 as 4: over ceil(1.25 x (6 + 1) / 3) = 3
        pytest.param([2, 2, 0], [0.5, 1.0, 1.0], 1, "load_fallback", id="route-weight"),
    ],
)
def test_choose(loads: list[int], weights: list[float] | None, rank: int, outcome: str) -> None:
    candidates = in_key_order(KEY, loads, weights)
    chosen, got = prefix_routing.choose(KEY, candidates, POLICY.epsilon)
    assert (chosen, got) == (candidates.upstreams[rank], outcome)


def test_choose_leaves_out_ejected_holders_unless_all_are() -> None:
    candidates = in_key_order(KEY, [0, 0, 0])
    first, second, _ = (u.address for u in candidates.upstreams)
    chosen, outcome = prefix_routing.choose(KEY, candidates, 0.25, lambda a: a == first)
    assert (chosen.address, outcome) == (second, "preferred")
    chosen, _ = prefix_routing.choose(KEY, candidates, 0.25, lambda a: True)
    assert chosen.address == first


def keys(count: int) -> list[int]:
    rng = random.Random(7)
    return [rng.getrandbits(64) for _ in range(count)]


def choices(holders: tuple[str, ...], all_keys: list[int]) -> list[str]:
    candidates = CandidateSet(
        upstreams(*[0] * len(holders), addresses=holders), [1.0] * len(holders)
    )
    return [prefix_routing.choose(k, candidates, 0.25)[0].address for k in all_keys]


def test_a_new_holder_takes_only_the_keys_it_now_ranks_first() -> None:
    all_keys = keys(3000)
    before, after = choices((A, B, C), all_keys), choices((A, B, C, D), all_keys)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert {a for _, a in moved} == {D}
    assert 0.2 < len(moved) / len(all_keys) < 0.3  # about 1/4
    assert choices((A, B, C), all_keys) == before  # the same on every sidecar, every time


def test_a_holder_that_leaves_moves_only_its_own_keys() -> None:
    all_keys = keys(3000)
    before, after = choices((A, B, C), all_keys), choices((A, C), all_keys)
    assert all(b == a for b, a in zip(before, after, strict=True) if b != B)
    assert all(a in (A, C) for a in after)


def test_keys_spread_over_the_holders() -> None:
    spread = choices((A, B, C), keys(3000))
    assert all(900 < spread.count(h) < 1100 for h in (A, B, C))


def test_prefix_key_is_the_kernel_key_of_the_prompt_and_text_keys_round_trip() -> None:
    data = codegen_request(CONTEXT + b"# complete me")
    route_key = prefix_routing.prefix_key(cache_with(POLICY).routes["codegen"], data)
    assert route_key == prefix_key(CONTEXT, PrefixBlocks(64, 16))
    assert route_key is not None and parse_affinity_key(key_text(route_key)) == route_key
    assert prefix_routing.prefix_key(cache_with(None).routes["codegen"], data) is None


# -- the request path ----------------------------------------------------------------------------


def codegen_request(prompt: bytes) -> bytes:
    """The bytes tritonclient sends for codegen."""
    tensor = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[prompt]], dtype=np.object_))
    request = triton_utils._get_inference_request(
        model_name="codegen", inputs=[tensor], model_version="", request_id="",
        outputs=None, sequence_id=0, sequence_start=False, sequence_end=False, priority=0,
        timeout=None, parameters=None,
    )  # fmt: skip
    data: bytes = request.SerializeToString()
    return data


def table(prefix: PrefixRouting | None, addresses: tuple[str, ...] = (A, B, C)) -> pb.RouteTable:
    return pb.RouteTable(
        model_name="codegen",
        candidates=[
            pb.RouteCandidate(target=pb.Target(grpc_address=a, ready_versions=["1"]), weight=1.0)
            for a in addresses
        ],
        prefix_routing=None if prefix is None else prefix.to_proto(),
    )


def cache_with(prefix: PrefixRouting | None, pool: UpstreamPool | None = None) -> RouteCache:
    if pool is None:
        pool = UpstreamPool(
            max_message_bytes=1 << 20, idle_close_s=60, connect=MockTransport(served)
        )
    cache = RouteCache(pool)
    cache.apply(pb.WatchRoutesResponse(full_snapshot=True, tables=[table(prefix)], generation=1))
    return cache


def served(call: MockCall) -> bytes:
    data: bytes = triton_pb.ModelInferResponse(
        model_name="codegen", id=call.address
    ).SerializeToString()
    return data


@dataclass
class FakePicker:
    """PickTarget as the router would answer it: the key's first holder among `holders`."""

    holders: tuple[str, ...] = (A, B, C)
    keys: list[str] = field(default_factory=list)

    async def pick(
        self, model: str, version: str, headers: Any, timeout: Any, **extra: Any
    ) -> pb.PickTargetResponse:
        key = extra.get("affinity_key", "")
        self.keys.append(key)
        first = rendezvous_order(parse_affinity_key(key), self.holders)[0] if key else A
        return pb.PickTargetResponse(target=pb.Target(grpc_address=first, ready_versions=["1"]))


@dataclass
class Rig:
    cache: RouteCache
    transport: MockTransport
    registry: CollectorRegistry
    handlers: dict[str, grpc.RpcMethodHandler]
    spans: InMemorySpanExporter

    async def infer(self, prompt: bytes) -> str:
        context = MockContext((), clock=FakeClock())
        answer = await self.handlers["ModelInfer"].unary_unary(codegen_request(prompt), context)
        return str(triton_pb.ModelInferResponse.FromString(answer).id)

    def outcomes(self) -> dict[str, float]:
        return {
            o: self.registry.get_sample_value(
                "pointsman_sidecar_prefix_routing_total", {"model": "codegen", "outcome": o}
            ) or 0.0
            for o in prefix_routing.OUTCOMES
        }  # fmt: skip


def rig(
    prefix: PrefixRouting | None,
    handler: Callable[[MockCall], Any] = served,
    picker: FakePicker | None = None,
) -> Rig:
    transport = MockTransport(handler)
    pool = UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60, connect=transport)
    cache = cache_with(prefix, pool)
    registry = CollectorRegistry()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    proxy = InferenceProxy(
        SidecarConfig(listen="127.0.0.1:0", routers=("127.0.0.1:1",)),
        cache,
        pool,
        rng=random.Random(5),
        metrics=SidecarMetrics(registry, cache=cache, pool=pool),
        tracer=RpcTracer(provider.get_tracer("test")),
        picker=picker,  # type: ignore[arg-type]
    )
    return Rig(cache, transport, registry, proxy.method_handlers(), spans)


def repository(i: int) -> bytes:
    return b"# repository %d\n" % i + CONTEXT


@pytest.mark.asyncio
async def test_requests_that_share_a_prefix_go_to_its_holder() -> None:
    r = rig(POLICY)
    for repo in range(12):
        where = {await r.infer(repository(repo) + b"# completion %d" % n) for n in range(5)}
        key = prefix_key(repository(repo), POLICY.blocks)
        assert where == {rendezvous_order(key, [A, B, C])[0]}
    assert r.outcomes() == {"preferred": 60, "load_fallback": 0, "no_key": 0, "router": 0}
    reasons = {span.attributes.get(PREFIX_ROUTE) for span in r.spans.get_finished_spans()
               if span.name == "ModelInfer"}  # fmt: skip
    assert reasons == {"preferred"}


@pytest.mark.asyncio
async def test_without_the_policy_requests_spread_and_nothing_is_counted() -> None:
    r = rig(None)
    where = {await r.infer(repository(0) + b"# completion %d" % n) for n in range(30)}
    assert where == {A, B, C}
    assert sum(r.outcomes().values()) == 0
    assert all(PREFIX_ROUTE not in (s.attributes or {}) for s in r.spans.get_finished_spans())


@pytest.mark.asyncio
async def test_a_prompt_shorter_than_a_block_takes_the_usual_pick() -> None:
    r = rig(POLICY)
    where = {await r.infer(b"def f(): #%d" % n) for n in range(30)}
    assert where == {A, B, C}
    assert r.outcomes()["no_key"] == 30


@pytest.mark.asyncio
async def test_a_busy_holder_spills_its_prefix_to_the_next_one_in_order() -> None:
    release = asyncio.Event()

    async def held(call: MockCall) -> bytes:
        await release.wait()
        return served(call)

    r = rig(POLICY, held)
    hot = repository(1)
    order = rendezvous_order(prefix_key(hot, POLICY.blocks), [A, B, C])
    calls = [asyncio.create_task(r.infer(hot + b"# %d" % n)) for n in range(9)]
    while len(r.transport.calls) < 9:
        await asyncio.sleep(0)
    release.set()
    where = [await call for call in calls]
    # ceil(1.25 x (n + 1) / 3) caps each holder: 9 concurrent calls fill the first to 4
    assert (where.count(order[0]), where.count(order[1]), where.count(order[2])) == (4, 4, 1)
    assert r.outcomes()["preferred"] == 4 and r.outcomes()["load_fallback"] == 5


@pytest.mark.asyncio
async def test_a_policy_reload_turns_prefix_routing_on_and_off() -> None:
    r = rig(None)
    r.cache.apply(pb.WatchRoutesResponse(tables=[table(POLICY)], generation=2))
    key = prefix_key(repository(3), POLICY.blocks)
    assert {await r.infer(repository(3) + b"#%d" % n) for n in range(6)} == {
        rendezvous_order(key, [A, B, C])[0]
    }
    r.cache.apply(pb.WatchRoutesResponse(tables=[table(None)], generation=3))
    assert len({await r.infer(repository(3) + b"#%d" % n) for n in range(30)}) == 3


def test_a_bad_policy_in_a_table_is_ignored_and_routing_goes_on() -> None:
    bad = pb.RouteTable(
        model_name="codegen",
        candidates=[pb.RouteCandidate(target=pb.Target(grpc_address=A, ready_versions=["1"]))],
        prefix_routing=pb.PrefixRouting(block_bytes=64),  # no prompt input
    )
    pool = UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60, connect=MockTransport(served))
    cache = RouteCache(pool)
    cache.apply(pb.WatchRoutesResponse(full_snapshot=True, tables=[bad], generation=1))
    assert cache.routes["codegen"].prefix_routing is None


@pytest.mark.asyncio
async def test_per_request_mode_passes_the_key_to_pick_target() -> None:
    picker = FakePicker()
    r = rig(POLICY, picker=picker)
    prompt = repository(5) + b"# tail"
    key = prefix_key(repository(5), POLICY.blocks)
    assert await r.infer(prompt) == rendezvous_order(key, [A, B, C])[0]
    assert picker.keys == [key_text(key)]
    await r.infer(b"short")
    assert picker.keys[-1] == ""
    assert r.outcomes() == {"preferred": 0, "load_fallback": 0, "no_key": 1, "router": 1}
