"""The request pipeline over an in-memory upstream (`sidecar.testing.MockTransport`).

Fast unit tests of what the sidecar decides per call: failover and its limits (attempts,
retry budget), outlier ejection, deadlines (never sent once expired; Triton's queue timeout per
attempt), the fields appended to the request's bytes, admission and shedding, idempotency, and
a stream's replay until its first response. The handlers are called directly with a
MockContext; one test goes through a real grpc server. The same behaviours are proven on real
Tritons in test_sidecar.py, test_stream_failover.py, test_overload.py and tests/integration/.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from itertools import pairwise
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from sidecar.admission import RETRY_AFTER_HEADER, PriorityClass, PriorityClasses
from sidecar.config import SidecarConfig
from sidecar.metrics import SidecarMetrics
from sidecar.routes import RouteCache
from sidecar.server import start_sidecar
from sidecar.service import InferenceProxy
from sidecar.testing import MockAbort, MockCall, MockContext, MockTransport, rpc_error
from sidecar.upstream import UpstreamPool
from tests.support.fakes import FakeClock

A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"
S = grpc.StatusCode
REFUSED = "failed to connect to all addresses; connection refused"
HIGH = PriorityClass("high", 1)
LOW = PriorityClass("low", 2, sheddable=True)


def request(model: str = "echo", **parameters: int) -> bytes:
    message = pb.ModelInferRequest(model_name=model)
    message.raw_input_contents.append(b"\x01" * 32)
    for key, value in parameters.items():
        message.parameters[key].int64_param = value
    data: bytes = message.SerializeToString()
    return data


def response(call: MockCall) -> bytes:
    """What an instance answers: its address, so tests see who served."""
    data: bytes = pb.ModelInferResponse(model_name="echo", id=call.address).SerializeToString()
    return data


def served_by(data: bytes) -> str:
    return str(pb.ModelInferResponse.FromString(data).id)


@dataclass
class Rig:
    transport: MockTransport
    cache: RouteCache
    registry: CollectorRegistry
    clock: FakeClock
    handlers: dict[str, grpc.RpcMethodHandler]

    async def infer(
        self, data: bytes | None = None, metadata: tuple[tuple[str, str], ...] = (),
        timeout: float | None = None,
    ) -> bytes:  # fmt: skip
        context = MockContext(metadata, timeout=timeout, clock=self.clock)
        answer: bytes = await self.handlers["ModelInfer"].unary_unary(data or request(), context)
        return answer

    async def stream(self, messages: list[bytes], context: MockContext) -> None:
        async def caller() -> AsyncIterator[bytes]:
            for message in messages:
                yield message

        await self.handlers["ModelStreamInfer"].stream_stream(caller(), context)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def addresses(self) -> list[str]:
        return [call.address for call in self.transport.calls]


def rig(
    handler: Callable[[MockCall], bytes | Awaitable[bytes]],
    instances: tuple[str, ...] = (A, B, C),
    **config: Any,
) -> Rig:
    settings = SidecarConfig(
        listen="127.0.0.1:0", static_routes={"echo": instances}, cold_start_wait_s=0, **config
    )
    transport = MockTransport(handler)
    pool = UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60, connect=transport)
    cache = RouteCache(pool, static_routes=settings.static_routes, expects_router=False)
    registry = CollectorRegistry()
    clock = FakeClock()
    proxy = InferenceProxy(
        settings,
        cache,
        pool,
        rng=random.Random(3),
        metrics=SidecarMetrics(registry, cache=cache, pool=pool),
        clock=clock,
    )
    return Rig(transport, cache, registry, clock, proxy.method_handlers())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def refuse(*dead: str) -> Callable[[MockCall], bytes]:
    """Instances in `dead` refuse the connection; the others answer."""

    def handler(call: MockCall) -> bytes:
        if call.address in dead:
            raise rpc_error(S.UNAVAILABLE, REFUSED)
        return response(call)

    return handler


# -- failover ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_refused_attempt_moves_to_another_instance_and_the_dead_one_is_ejected() -> None:
    r = rig(refuse(A))
    answers = [served_by(await r.infer()) for _ in range(40)]
    assert set(answers) == {B, C}
    refused = r.addresses().count(A)
    # Three refusals in a row eject A; from then on it is not picked.
    assert refused == 3
    assert r.metric("pointsman_sidecar_retries_total", model="echo") == refused
    assert r.metric("pointsman_sidecar_outlier_ejections_total", instance=A) == 1
    assert (
        r.metric("pointsman_sidecar_upstream_attempts_total", instance=A, code="UNAVAILABLE") == 3
    )
    assert (
        r.metric("pointsman_sidecar_requests_total", model="echo", method="infer", code="OK") == 40
    )


@pytest.mark.asyncio
async def test_an_ejected_instance_returns_when_its_ejection_ends() -> None:
    dead = {A}
    r = rig(lambda call: refuse(*dead)(call))
    for _ in range(30):
        await r.infer()
    assert r.addresses().count(A) == 3
    dead.clear()  # A recovers; the ejection (1 s) still holds for a while
    for _ in range(30):
        await r.infer()
    assert r.addresses().count(A) == 3
    r.clock.advance(1.01)
    assert A in {served_by(await r.infer()) for _ in range(30)}


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (S.INVALID_ARGUMENT, "unexpected shape for input 'INPUT0'"),
        (S.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        (S.UNAVAILABLE, "Request timeout expired"),  # Triton's queue timeout: the caller's own
        (S.INTERNAL, "model crashed"),
        (S.RESOURCE_EXHAUSTED, "out of memory"),
    ],
)
@pytest.mark.asyncio
async def test_answers_after_which_triton_may_have_run_it_are_not_retried(
    code: grpc.StatusCode, details: str
) -> None:
    def handler(call: MockCall) -> bytes:
        raise rpc_error(code, details)

    r = rig(handler)
    with pytest.raises(MockAbort) as aborted:
        await r.infer()
    assert (aborted.value.code, aborted.value.details) == (code, details)
    assert len(r.transport.calls) == 1


@pytest.mark.asyncio
async def test_attempts_stop_at_max_attempts() -> None:
    r = rig(refuse(A, B, C), max_attempts=2, outlier_consecutive_failures=100)
    with pytest.raises(MockAbort) as aborted:
        await r.infer()
    assert aborted.value.code is S.UNAVAILABLE
    assert len(set(r.addresses())) == 2 == len(r.addresses())


@pytest.mark.asyncio
async def test_a_spent_retry_budget_gives_the_caller_the_error() -> None:
    r = rig(refuse(A, B, C), retry_budget_min=1, retry_budget_ratio=0.0,
            outlier_consecutive_failures=100)  # fmt: skip
    # The first request spends the budget's one retry (2 attempts); later ones get none.
    for expected_calls in (2, 3, 4):
        with pytest.raises(MockAbort) as aborted:
            await r.infer()
        assert aborted.value.code is S.UNAVAILABLE
        assert len(r.transport.calls) == expected_calls
    assert r.metric("pointsman_sidecar_retry_budget_exhausted_total", model="echo") == 3


# -- deadlines -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_expired_request_is_never_sent() -> None:
    r = rig(refuse())
    with pytest.raises(MockAbort) as aborted:
        await r.infer(timeout=0.0)
    assert aborted.value.code is S.DEADLINE_EXCEEDED
    assert r.transport.calls == []


@pytest.mark.asyncio
async def test_each_attempt_gets_the_remaining_time_as_tritons_queue_timeout() -> None:
    r = rig(lambda call: (r.clock.advance(0.5), refuse(A)(call))[1])
    for _ in range(6):
        await r.infer(timeout=2.0)
    first, *_ = r.transport.calls
    assert first.timeout == 2.0
    timeouts: dict[str, list[int]] = {c.address: [] for c in r.transport.calls}
    for call in r.transport.calls:
        timeouts[call.address].append(
            pb.ModelInferRequest.FromString(call.request).parameters["timeout"].int64_param
        )
    assert set(timeouts[A]) == {2_000_000}  # a first attempt: the whole deadline
    retried = [c for prev, c in pairwise(r.transport.calls) if prev.address == A]
    assert retried and all(c.timeout == 1.5 for c in retried)  # A's attempt took 0.5 s
    assert all(
        pb.ModelInferRequest.FromString(c.request).parameters["timeout"].int64_param == 1_500_000
        for c in retried
    )


@pytest.mark.asyncio
async def test_a_deadline_spent_by_a_failed_attempt_stops_the_retry() -> None:
    def handler(call: MockCall) -> bytes:
        r.clock.advance(1.0)
        raise rpc_error(S.UNAVAILABLE, REFUSED)

    r = rig(handler)
    with pytest.raises(MockAbort) as aborted:
        await r.infer(timeout=1.0)
    assert aborted.value.code is S.DEADLINE_EXCEEDED
    assert len(r.transport.calls) == 1


# -- what the sidecar sets on the request ----------------------------------------------------------


@pytest.mark.asyncio
async def test_version_priority_and_queue_timeout_reach_triton_in_the_request() -> None:
    r = rig(refuse())
    r.cache.priorities = PriorityClasses(MappingProxyType({"high": HIGH, "low": LOW}), LOW)
    sent = request()
    await r.infer(sent, (("x-priority", "high"), ("x-model-version", "2")), timeout=3.0)
    await r.infer(request(priority=7), timeout=None)  # its own priority, no deadline
    ours, theirs = (pb.ModelInferRequest.FromString(c.request) for c in r.transport.calls)
    assert ours.model_version == "2"
    assert ours.parameters["priority"].uint64_param == 1
    assert ours.parameters["timeout"].int64_param == 3_000_000
    assert r.transport.calls[0].request.startswith(sent)  # appended: the tensors not re-encoded
    assert theirs.parameters["priority"].int64_param == 7 and "timeout" not in theirs.parameters
    assert r.transport.calls[1].request == request(priority=7)  # nothing to set: not copied


@pytest.mark.asyncio
async def test_the_callers_metadata_goes_on_without_hop_by_hop_keys() -> None:
    r = rig(refuse())
    await r.infer(metadata=(("user-agent", "grpc-python"), ("x-team", "search")))
    assert r.transport.calls[0].metadata == (("x-team", "search"),)


# -- admission and shedding ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_full_queue_sheds_the_lowest_class_with_a_retry_hint() -> None:
    release = asyncio.Event()

    async def slow(call: MockCall) -> bytes:
        await release.wait()
        return response(call)

    r = rig(slow, max_in_flight=1, max_queued=1, shed_retry_after_ms=250)
    r.cache.priorities = PriorityClasses(MappingProxyType({"high": HIGH, "low": LOW}), LOW)
    running = asyncio.ensure_future(r.infer(metadata=(("x-priority", "low"),)))
    queued_low = asyncio.ensure_future(r.infer(metadata=(("x-priority", "low"),)))
    await settle()
    with pytest.raises(MockAbort) as shed:  # the queue is full and nothing ranks below it
        await r.infer(metadata=(("x-priority", "low"),))
    assert shed.value.code is S.RESOURCE_EXHAUSTED
    assert dict(shed.value.trailing_metadata)[RETRY_AFTER_HEADER] == "250"
    queued_high = asyncio.ensure_future(r.infer(metadata=(("x-priority", "high"),)))
    await settle()  # the high one displaces the queued low one
    with pytest.raises(MockAbort) as displaced:
        await queued_low
    assert displaced.value.code is S.RESOURCE_EXHAUSTED
    release.set()
    await running
    await queued_high
    assert r.metric("pointsman_sidecar_shed_total", model="echo", priority="2") == 2
    assert len(r.transport.calls) == 2  # a shed request never reached an instance


@pytest.mark.asyncio
async def test_a_request_whose_deadline_passes_in_the_queue_is_never_sent() -> None:
    release = asyncio.Event()

    async def slow(call: MockCall) -> bytes:
        await release.wait()
        return response(call)

    r = rig(slow, max_in_flight=1, max_queued=4)
    running = asyncio.ensure_future(r.infer())
    await settle()
    with pytest.raises(MockAbort) as aborted:
        await r.infer(timeout=0.02)  # admission waits on the event loop's own clock
    assert aborted.value.code is S.DEADLINE_EXCEEDED
    release.set()
    await running
    assert len(r.transport.calls) == 1


# -- idempotency ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_duplicates_run_once_and_a_later_one_is_replayed() -> None:
    release = asyncio.Event()

    async def slow(call: MockCall) -> bytes:
        await release.wait()
        return response(call)

    r = rig(slow)
    same = (("x-request-id", "r-1"),)
    calls = [asyncio.ensure_future(r.infer(metadata=same)) for _ in range(3)]
    await settle()
    release.set()
    answers = await asyncio.gather(*calls)
    assert len(set(answers)) == 1 and len(r.transport.calls) == 1
    assert await r.infer(metadata=same) == answers[0] and len(r.transport.calls) == 1
    outcomes = {o: r.metric("pointsman_sidecar_idempotent_requests_total", outcome=o)
                for o in ("executed", "coalesced", "replayed")}  # fmt: skip
    assert outcomes == {"executed": 1, "coalesced": 2, "replayed": 1}


# -- streams -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stream_fails_over_before_its_first_response_replaying_what_it_sent() -> None:
    r = rig(refuse(A), instances=(A, B), outlier_consecutive_failures=100)
    messages = [request(), request(priority=2)]
    for _ in range(8):
        context = MockContext()
        await r.stream(messages, context)
        assert [served_by(m) for m in context.written] == [B, B]
    refused = r.addresses().count(A)
    assert refused >= 1  # some streams were first sent to A...
    assert [c.request for c in r.transport.calls if c.address == B] == messages * 8  # ...replayed
    assert r.metric("pointsman_sidecar_retries_total", model="echo") == refused


@pytest.mark.asyncio
async def test_a_stream_is_bound_to_its_instance_after_its_first_response() -> None:
    def handler(call: MockCall) -> bytes:
        if pb.ModelInferRequest.FromString(call.request).parameters:
            raise rpc_error(S.UNAVAILABLE, "Socket closed")  # the instance dies mid-stream
        return response(call)

    r = rig(handler, instances=(A, B))
    context = MockContext()
    with pytest.raises(MockAbort) as aborted:
        await r.stream([request(), request(priority=2)], context)
    assert aborted.value.code is S.UNAVAILABLE
    assert len(context.written) == 1 and len(r.transport.calls) == 2  # no second instance
    assert r.metric("pointsman_sidecar_retries_total", model="echo") == 0


# -- the same through a real grpc server ---------------------------------------------------------


@pytest.mark.asyncio
async def test_a_sidecar_server_over_a_mock_transport() -> None:
    transport = MockTransport(refuse(A))
    config = SidecarConfig(listen="127.0.0.1:0", static_routes={"echo": (A, B)},
                           cold_start_wait_s=0)  # fmt: skip
    sidecar = await start_sidecar(config, rng=random.Random(1), connect=transport)
    try:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            answers = [served_by(await infer(request(), timeout=5)) for _ in range(10)]
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await infer(request("nope"), timeout=5)
    finally:
        await sidecar.stop(0)
    assert set(answers) == {B}
    assert error.value.code() is S.NOT_FOUND
