"""Flow control keyed to Triton's queues, over the in-memory upstream (MockTransport).

`FakeTriton` behaves as Triton's dynamic batcher does at its queue bound: an instance takes
`capacity` requests at once and refuses the next at once with UNAVAILABLE "Exceeds maximum
queue size" (in a stream: an error response). The sidecar's route tables say what each
instance takes (`RouteCandidate.concurrency` + `.queue_capacity`); the sidecar holds the rest
in its admission queue, in class order and within deadlines, and resends what Triton refuses
all the same. The proof on real Tritons: tests/integration/test_flow_control.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from pointsman.errors import DeadlineExpiredError
from pointsman.router.v1 import router_pb2
from sidecar.admission import RETRY_AFTER_HEADER, Admission, PriorityClass
from sidecar.config import SidecarConfig
from sidecar.flow import TRITON_QUEUE_FULL, FlowControl, Place, stream_refusal
from sidecar.metrics import SidecarMetrics
from sidecar.routes import RouteCache
from sidecar.service import InferenceProxy
from sidecar.testing import MockAbort, MockCall, MockContext, MockTransport, rpc_error
from sidecar.upstream import UpstreamPool

A, B = "10.0.0.1:8001", "10.0.0.2:8001"
S = grpc.StatusCode
REFUSAL = f"[request id: <id_unknown>] {TRITON_QUEUE_FULL}"
HIGH = router_pb2.PriorityClass(name="high", triton_priority=1)
LOW = router_pb2.PriorityClass(name="low", triton_priority=2, sheddable=True)


def request(tag: str = "") -> bytes:
    data: bytes = pb.ModelInferRequest(model_name="echo", id=tag).SerializeToString()
    return data


def served_by(data: bytes) -> str:
    return str(pb.ModelInferResponse.FromString(data).id)


def stream_response(address: str) -> bytes:
    message = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=address))
    data: bytes = message.SerializeToString()
    return data


def stream_error(text: str) -> bytes:
    data: bytes = pb.ModelStreamInferResponse(error_message=text).SerializeToString()
    return data


@dataclass
class FakeTriton:
    """Instances that each take `capacity[address]` requests at once and refuse more."""

    capacity: dict[str, int]
    service_s: float = 0.005
    running: dict[str, int] = field(default_factory=dict)
    most: dict[str, int] = field(default_factory=dict)
    served: list[str] = field(default_factory=list)
    refused: int = 0
    # Set: requests wait for it instead of `service_s`.
    gate: asyncio.Event | None = None

    async def __call__(self, call: MockCall) -> bytes:
        address = call.address
        if self.running.get(address, 0) >= self.capacity[address]:
            self.refused += 1
            if call.method == "ModelStreamInfer":
                return stream_error(REFUSAL)
            raise rpc_error(S.UNAVAILABLE, REFUSAL)
        self.running[address] = self.running.get(address, 0) + 1
        self.most[address] = max(self.most.get(address, 0), self.running[address])
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(self.service_s)
        finally:
            self.running[address] -= 1
        self.served.append(pb.ModelInferRequest.FromString(call.request).id or address)
        if call.method == "ModelStreamInfer":
            return stream_response(address)
        data: bytes = pb.ModelInferResponse(model_name="echo", id=address).SerializeToString()
        return data


def table(limits: dict[str, tuple[int, int]]) -> router_pb2.WatchRoutesResponse:
    """A full snapshot: `echo` on each address with (concurrency, queue capacity)."""
    candidates = [
        router_pb2.RouteCandidate(
            target=router_pb2.Target(instance_id=a, grpc_address=a, ready_versions=["1"]),
            weight=1.0,
            concurrency=concurrency,
            queue_capacity=queue,
        )
        for a, (concurrency, queue) in limits.items()
    ]
    return router_pb2.WatchRoutesResponse(
        full_snapshot=True,
        generation=1,
        tables=[router_pb2.RouteTable(model_name="echo", candidates=candidates, generation=1)],
        priority_policy=router_pb2.PriorityPolicy(classes=[HIGH, LOW], default_class="low"),
    )


@dataclass
class Sidecar:
    transport: MockTransport
    cache: RouteCache
    registry: CollectorRegistry
    handlers: dict[str, grpc.RpcMethodHandler]

    async def infer(self, tag: str = "", priority: str = "", timeout: float | None = None) -> bytes:
        metadata = (("x-priority", priority),) if priority else ()
        context = MockContext(metadata, timeout=timeout)
        answer: bytes = await self.handlers["ModelInfer"].unary_unary(request(tag), context)
        return answer

    async def stream(self, timeout: float | None = None) -> list[bytes]:
        async def caller() -> AsyncIterator[bytes]:
            yield request()

        context = MockContext((), timeout=timeout)
        await self.handlers["ModelStreamInfer"].stream_stream(caller(), context)
        return context.written

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name, {"model": "echo"}) or 0.0


def sidecar(triton: FakeTriton, limits: dict[str, tuple[int, int]], **config: Any) -> Sidecar:
    settings = SidecarConfig(
        listen="127.0.0.1:0", routers=("router:1",), cold_start_wait_s=0,
        queue_full_backoff_ms=1, queue_full_max_backoff_ms=5, **config,
    )  # fmt: skip
    transport = MockTransport(triton)
    pool = UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60, connect=transport)
    cache = RouteCache(pool)
    cache.set_connected(True)
    cache.apply(table(limits))
    registry = CollectorRegistry()
    proxy = InferenceProxy(
        settings, cache, pool, rng=random.Random(7),
        metrics=SidecarMetrics(registry, cache=cache, pool=pool),
    )  # fmt: skip
    return Sidecar(transport, cache, registry, proxy.method_handlers())


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


# -- holding within what Triton takes -------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_burst_above_capacity_is_held_in_the_sidecar_and_none_is_refused() -> None:
    triton = FakeTriton({A: 3, B: 3})
    s = sidecar(triton, {A: (2, 1), B: (2, 1)})
    answers = await asyncio.gather(*(s.infer() for _ in range(60)))
    assert len(answers) == 60 and triton.refused == 0
    assert triton.most == {A: 3, B: 3}  # both filled, neither past its bound
    assert s.metric("pointsman_sidecar_held_total") > 0
    assert s.metric("pointsman_sidecar_queue_full_retries_total") == 0


@pytest.mark.asyncio
async def test_without_flow_control_the_same_burst_is_refused() -> None:
    triton = FakeTriton({A: 3, B: 3})
    s = sidecar(triton, {A: (2, 1), B: (2, 1)}, flow_control=False)
    results = await asyncio.gather(*(s.infer() for _ in range(60)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, MockAbort)]
    assert failed
    assert all(f.code is S.UNAVAILABLE and TRITON_QUEUE_FULL in f.details for f in failed)
    assert s.metric("pointsman_sidecar_held_total") == 0


@pytest.mark.asyncio
async def test_below_capacity_nothing_waits() -> None:
    triton = FakeTriton({A: 8})
    s = sidecar(triton, {A: (4, 4)})
    await asyncio.gather(*(s.infer() for _ in range(8)))
    assert s.metric("pointsman_sidecar_held_total") == 0 and triton.most == {A: 8}


@pytest.mark.asyncio
async def test_a_table_without_capacity_leaves_the_instance_unbounded() -> None:
    triton = FakeTriton({A: 100})
    s = sidecar(triton, {A: (0, 0)})
    await asyncio.gather(*(s.infer() for _ in range(50)))
    assert triton.most == {A: 50} and s.metric("pointsman_sidecar_held_total") == 0


@pytest.mark.asyncio
async def test_a_freed_place_goes_to_the_best_class_then_the_earliest() -> None:
    triton = FakeTriton({A: 2}, gate=asyncio.Event())
    s = sidecar(triton, {A: (1, 1)})
    running = [asyncio.create_task(s.infer(tag)) for tag in ("first", "second")]
    await settle()
    waiting = [
        asyncio.create_task(s.infer(tag, priority))
        for tag, priority in (("low-1", "low"), ("high-1", "high"), ("low-2", "low"))
    ]
    await settle()
    assert len(s.transport.calls) == 2
    assert triton.gate is not None
    triton.gate.set()
    await asyncio.gather(*running, *waiting)
    sent = [pb.ModelInferRequest.FromString(c.request).id for c in s.transport.calls]
    assert sent == ["first", "second", "high-1", "low-1", "low-2"]
    assert triton.refused == 0 and s.metric("pointsman_sidecar_held_total") == 3


@pytest.mark.asyncio
async def test_a_held_request_ends_with_its_deadline_and_is_never_sent() -> None:
    triton = FakeTriton({A: 2}, gate=asyncio.Event())
    s = sidecar(triton, {A: (1, 1)})
    running = [asyncio.create_task(s.infer()) for _ in range(2)]
    await settle()
    with pytest.raises(MockAbort) as aborted:
        await s.infer("late", timeout=0.05)
    assert aborted.value.code is S.DEADLINE_EXCEEDED
    assert "place at echo" in aborted.value.details
    assert len(s.transport.calls) == 2
    assert triton.gate is not None
    triton.gate.set()
    await asyncio.gather(*running)


@pytest.mark.asyncio
async def test_a_full_sidecar_queue_sheds_the_lowest_class_with_a_retry_hint() -> None:
    triton = FakeTriton({A: 2}, gate=asyncio.Event())
    s = sidecar(triton, {A: (1, 1)}, max_queued=1)
    running = [asyncio.create_task(s.infer()) for _ in range(2)]
    await settle()
    low = asyncio.create_task(s.infer("low", "low"))
    await settle()
    high = asyncio.create_task(s.infer("high", "high"))
    await settle()
    with pytest.raises(MockAbort) as shed:
        await low
    assert shed.value.code is S.RESOURCE_EXHAUSTED
    assert (RETRY_AFTER_HEADER, "200") in shed.value.trailing_metadata
    assert triton.gate is not None
    triton.gate.set()
    await asyncio.gather(*running, high)
    assert triton.refused == 0


# -- Triton's refusals ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_queue_full_refusal_is_resent_on_another_holder() -> None:
    triton = FakeTriton({A: 0, B: 1})  # A's queue is full of someone else's requests
    s = sidecar(triton, {A: (0, 0), B: (0, 0)})
    answers = [served_by(await s.infer()) for _ in range(10)]
    assert set(answers) == {B}
    assert s.metric("pointsman_sidecar_queue_full_retries_total") == triton.refused > 0
    assert s.metric("pointsman_sidecar_triton_queue_full_total") == 0
    assert s.metric("pointsman_sidecar_retries_total") == 0  # the retry budget is not spent


@pytest.mark.asyncio
async def test_a_refusal_on_the_only_holder_is_resent_after_a_back_off() -> None:
    refusals = [2]

    async def busy_then_free(call: MockCall) -> bytes:
        if refusals[0]:
            refusals[0] -= 1
            raise rpc_error(S.UNAVAILABLE, REFUSAL)
        return await FakeTriton({A: 1})(call)

    s = sidecar(FakeTriton({A: 1}), {A: (1, 1)})
    s.transport.handler = busy_then_free
    started = time.monotonic()
    assert served_by(await s.infer()) == A
    assert len(s.transport.calls) == 3
    assert time.monotonic() - started >= 0.0015  # 1 ms, then 2 ms, each at least halved
    assert s.metric("pointsman_sidecar_queue_full_retries_total") == 2


@pytest.mark.asyncio
async def test_refusals_end_at_the_deadline_or_after_queue_full_retries() -> None:
    s = sidecar(FakeTriton({A: 0}), {A: (1, 1)}, queue_full_retries=3)
    with pytest.raises(MockAbort) as refused:
        await s.infer()
    assert refused.value.code is S.UNAVAILABLE and TRITON_QUEUE_FULL in refused.value.details
    assert len(s.transport.calls) == 4
    assert s.metric("pointsman_sidecar_triton_queue_full_total") == 1
    s = sidecar(FakeTriton({A: 0}), {A: (1, 1)}, queue_full_retries=10_000)
    with pytest.raises(MockAbort) as expired:
        await s.infer(timeout=0.05)
    assert expired.value.code is S.DEADLINE_EXCEEDED


@pytest.mark.asyncio
async def test_a_streams_first_response_refusal_is_resent_and_never_reaches_the_caller() -> None:
    triton = FakeTriton({A: 0, B: 1})
    s = sidecar(triton, {A: (0, 0), B: (0, 0)})
    for _ in range(6):
        written = await s.stream()
        assert written == [stream_response(B)]
    assert triton.refused > 0
    assert s.metric("pointsman_sidecar_queue_full_retries_total") == triton.refused


@pytest.mark.asyncio
async def test_a_refusal_after_a_response_reached_the_caller_is_passed_on() -> None:
    answers = [stream_response(A), stream_error(REFUSAL)]

    def two_requests(call: MockCall) -> bytes:
        return answers.pop(0)

    s = sidecar(FakeTriton({A: 1}), {A: (1, 1)})
    s.transport.handler = two_requests

    async def caller() -> AsyncIterator[bytes]:
        yield request()
        yield request()

    context = MockContext(())
    await s.handlers["ModelStreamInfer"].stream_stream(caller(), context)
    assert context.written == [stream_response(A), stream_error(REFUSAL)]
    assert s.metric("pointsman_sidecar_queue_full_retries_total") == 0


def test_stream_refusal_reads_only_queue_full_error_responses() -> None:
    error = stream_refusal(stream_error(REFUSAL))
    assert error is not None and error.code() is S.UNAVAILABLE
    assert error.details() == REFUSAL
    assert stream_refusal(stream_error("INVALID_ARG: PROMPT is empty")) is None
    assert stream_refusal(stream_response(A)) is None
    assert stream_refusal(b"") is None
    assert stream_refusal(b"\x0a\xff") is None  # truncated: no message, not a refusal


# -- two sidecars, one fleet ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_sidecars_sharing_one_fleet_lose_nothing() -> None:
    """Each sidecar holds to the whole capacity as if alone, so together they send up to
    twice what Triton takes: Triton refuses the excess and each resends its own, with what
    it allows lowered after each refusal."""
    triton = FakeTriton({A: 4, B: 4})
    one, two = (sidecar(triton, {A: (2, 2), B: (2, 2)}) for _ in range(2))
    results = await asyncio.gather(
        *(s.infer() for s in (one, two) for _ in range(100)), return_exceptions=True
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    assert triton.most == {A: 4, B: 4} and triton.refused > 0
    resent = sum(s.metric("pointsman_sidecar_queue_full_retries_total") for s in (one, two))
    assert resent == triton.refused


# -- the pieces -----------------------------------------------------------------------------------


def test_a_refused_place_backs_off_then_allows_what_triton_accepted() -> None:
    place = Place(A, "echo", 10)
    place.outstanding = 6  # the refused one among them
    assert place.refused()  # a back-off starts: nothing more goes there meanwhile
    assert place.allowed == 0 and place.resume == 5
    place.timer = object()  # type: ignore[assignment]  # backing off
    place.outstanding = 3
    assert not place.refused()  # refused again while backing off: the same back-off
    assert place.resume == 2
    place.served()  # no growth while backing off
    place.reopen()
    assert place.allowed == 2
    place.outstanding = 1
    place.refused()
    place.reopen()
    assert place.allowed == 1  # never below one
    for _ in range(100):
        place.served()
    assert place.allowed == 10
    place.set_limit(4)
    assert place.allowed == 4 and place.limit == 4


@pytest.mark.asyncio
async def test_a_refusal_holds_the_place_for_a_back_off_that_doubles_while_refusals_go_on() -> None:
    admission = Admission(10, 10, retry_after_ms=100)
    flow = FlowControl(admission, backoff_s=0.01, max_backoff_s=1.0)
    flow.set_limits({(A, "echo"): 4})
    place = flow.place(A, "echo")
    loop = asyncio.get_running_loop()

    def back_off_s() -> float:
        assert place.timer is not None
        return place.timer.when() - loop.time()

    place.outstanding = 3
    flow.refused(place)
    assert 0.004 <= back_off_s() <= 0.01
    place.outstanding = 2
    flow.refused(place)  # a second refusal of the same burst: the same back-off
    assert place.strikes == 1 and not admission.take(place)
    place.outstanding = 0
    while place.timer is not None:
        await asyncio.sleep(0.005)
    assert place.allowed == 1 and admission.take(place)
    flow.refused(place)  # refused again before it served one: twice as long
    assert place.strikes == 2 and 0.009 <= back_off_s() <= 0.02
    while place.timer is not None:
        await asyncio.sleep(0.005)
    place.served()
    assert place.strikes == 0 and place.allowed == 2  # 1 + 1/1


@pytest.mark.asyncio
async def test_wait_for_place_lends_its_slot_and_takes_it_back_on_failure() -> None:
    admission = Admission(2, 4, retry_after_ms=100)
    full, other = Place(A, "echo", 1), Place(B, "other", 1)
    assert admission.try_enter() and admission.take(full)
    assert admission.try_enter()
    waiting = asyncio.create_task(
        admission.wait_for_place((full,), PriorityClass("low", 2, True), None)
    )
    await settle()
    # Its slot is lent: a request for another model goes on at once.
    assert admission.in_flight == 1 and admission.queued == 1
    assert admission.try_enter() and admission.take(other)
    admission.release(full)
    await settle()
    assert not waiting.done()  # a place, but no slot free
    admission.leave()
    assert await waiting is full and admission.in_flight == 2
    with pytest.raises(DeadlineExpiredError):
        await admission.wait_for_place((full,), PriorityClass("low", 2, True), 0.01)
    assert admission.in_flight == 2 and admission.queued == 0


@pytest.mark.asyncio
async def test_new_limits_from_the_router_let_waiters_go() -> None:
    admission = Admission(10, 10, retry_after_ms=100)
    flow = FlowControl(admission)
    flow.set_limits({(A, "echo"): 1})
    place = flow.place(A, "echo")
    assert admission.try_enter() and admission.take(place)
    assert admission.try_enter()
    waiting = asyncio.create_task(
        admission.wait_for_place((place,), PriorityClass("low", 2, True), None)
    )
    await settle()
    assert not waiting.done()
    flow.set_limits({(A, "echo"): 2})
    await settle()
    assert await waiting is place and place.outstanding == 2
    flow.set_limits({})
    assert place.limit == float("inf")


def test_backoff_doubles_up_to_its_ceiling_with_jitter() -> None:
    flow = FlowControl(Admission(1, 1, retry_after_ms=1), backoff_s=0.01, max_backoff_s=0.05)
    for refusals, ceiling in ((1, 0.01), (2, 0.02), (3, 0.04), (4, 0.05), (40, 0.05)):
        delays = [flow.backoff_s(refusals) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
