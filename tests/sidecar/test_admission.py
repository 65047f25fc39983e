"""Priority classes and the sidecar's admission (pure logic; no servers)."""

from __future__ import annotations

import asyncio
from types import MappingProxyType

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from tritonclient.grpc import service_pb2

from pointsman.errors import ConfigError, DeadlineExpiredError
from pointsman.router.v1 import router_pb2
from sidecar.admission import (
    NO_CLASSES,
    RETRY_AFTER_HEADER,
    STATUS_DETAILS_HEADER,
    UNCLASSED,
    Admission,
    PriorityClass,
    PriorityClasses,
    ShedError,
    priority_classes_from_proto,
)
from sidecar.config import config_from_mapping
from sidecar.head import read_head
from sidecar.routes import RouteCache
from sidecar.upstream import UpstreamPool
from sidecar.wire import sets_parameter, uint64_parameter_field

HIGH = PriorityClass("high", 1)
LOW = PriorityClass("low", 2, sheddable=True)
BULK = PriorityClass("bulk", 3, sheddable=True)
CLASSES = PriorityClasses(MappingProxyType({"high": HIGH, "low": LOW, "bulk": BULK}), LOW)


@pytest.mark.parametrize(
    ("classes", "name", "expected"),
    [
        (CLASSES, "high", HIGH),
        (CLASSES, "bulk", BULK),
        (CLASSES, "", LOW),
        (CLASSES, "urgent", LOW),
        (CLASSES, "HIGH", LOW),  # names are exact
        (NO_CLASSES, "high", UNCLASSED),
        (NO_CLASSES, "", UNCLASSED),
    ],
)
def test_resolve(classes: PriorityClasses, name: str, expected: PriorityClass) -> None:
    assert classes.resolve(name) == expected


def test_classes_from_proto() -> None:
    message = router_pb2.PriorityPolicy(
        classes=[
            router_pb2.PriorityClass(name="high", triton_priority=1),
            router_pb2.PriorityClass(name="low", triton_priority=2, sheddable=True),
        ],
        default_class="low",
    )
    classes = priority_classes_from_proto(message)
    assert classes.resolve("high") == PriorityClass("high", 1, False)
    assert classes.resolve("nope") == PriorityClass("low", 2, True)
    # A default naming no class leaves unknown names unclassed.
    assert priority_classes_from_proto(router_pb2.PriorityPolicy()).resolve("x") == UNCLASSED


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, ("", "")),
        ((), ("", "")),
        ((("x-request-id", "r1"),), ("r1", "")),
        ((("x-priority", "high"), ("other", "v")), ("", "high")),
        ((("x-request-id", "a"), ("x-priority", "low"), ("x-request-id", "b")), ("b", "low")),
        ((("x-request-id-bin", b"\x00"),), ("", "")),
    ],
)
def test_request_keys(
    metadata: tuple[tuple[str, str | bytes], ...] | None, expected: tuple[str, str]
) -> None:
    head = read_head(service_pb2.ModelInferRequest(model_name="m").SerializeToString(), metadata)
    assert (head.request_id, head.priority) == expected


def _request(**parameters: int) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="codegen", id="r")
    tensor = request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1, 1])
    tensor.parameters["priority"].int64_param = 9  # a tensor's parameter is not the request's
    for key, value in parameters.items():
        request.parameters[key].uint64_param = value
    # Tensor bytes that look like a parameters entry must not fool the check.
    request.raw_input_contents.append(b"\x22\x0a\x0a\x08priority" * 50)
    return request


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_request().SerializeToString(), False),
        (_request(priority=1).SerializeToString(), True),
        (_request(timeout=5).SerializeToString(), False),
        (_request(timeout=5, priority=2).SerializeToString(), True),
        (_request().SerializeToString() + uint64_parameter_field("priority", 1), True),
        (b"", False),
        (b"\x0a\xff", False),  # truncated: answers False rather than raising
    ],
)
def test_sets_parameter(data: bytes, expected: bool) -> None:
    assert sets_parameter(data, "priority") is expected


def test_shed_error_carries_retry_hint() -> None:
    error = ShedError("overloaded", priority=LOW, retry_after_ms=250)
    trailers = dict(error.trailing_metadata())
    assert trailers[RETRY_AFTER_HEADER] == "250"
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_HEADER])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 250
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED


# -- Admission ---------------------------------------------------------------------------------


def _admission(max_in_flight: int = 1, max_queued: int = 2) -> Admission:
    return Admission(max_in_flight, max_queued, retry_after_ms=100)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_fast_path_until_full() -> None:
    admission = _admission(max_in_flight=2)
    assert admission.try_enter() and admission.try_enter()
    assert not admission.try_enter()
    admission.leave()
    assert admission.try_enter()
    assert admission.in_flight == 2


@pytest.mark.asyncio
async def test_waiters_admitted_best_class_first_then_in_arrival_order() -> None:
    admission = _admission(max_in_flight=1, max_queued=4)
    assert admission.try_enter()
    order: list[str] = []

    async def request(label: str, priority: PriorityClass) -> None:
        await admission.wait(priority, None)
        order.append(label)

    tasks = [
        asyncio.create_task(request(label, priority))
        for label, priority in (("low-1", LOW), ("high-1", HIGH), ("low-2", LOW), ("high-2", HIGH))
    ]
    await _settle()
    assert admission.queued == 4
    for _ in range(4):
        admission.leave()  # the running one ends; the best waiter takes its slot
        await _settle()
    await asyncio.gather(*tasks)
    assert order == ["high-1", "high-2", "low-1", "low-2"]
    assert admission.in_flight == 1 and admission.queued == 0


@pytest.mark.asyncio
async def test_full_queue_sheds_the_newcomer_when_nothing_ranks_lower() -> None:
    admission = _admission(max_in_flight=1, max_queued=1)
    assert admission.try_enter()
    waiting = asyncio.create_task(admission.wait(HIGH, None))
    await _settle()
    with pytest.raises(ShedError) as shed:
        await admission.wait(LOW, None)
    assert shed.value.priority == LOW and shed.value.retry_after_ms == 100
    # Not sheddable, but a full queue of equal or better requests still refuses it.
    with pytest.raises(ShedError):
        await admission.wait(HIGH, None)
    admission.leave()
    await waiting
    assert admission.in_flight == 1 and admission.queued == 0


@pytest.mark.asyncio
async def test_newcomer_displaces_the_lowest_sheddable_waiter() -> None:
    admission = _admission(max_in_flight=1, max_queued=2)
    assert admission.try_enter()
    low = asyncio.create_task(admission.wait(LOW, None))
    bulk = asyncio.create_task(admission.wait(BULK, None))
    await _settle()
    high = asyncio.create_task(admission.wait(HIGH, None))
    await _settle()
    with pytest.raises(ShedError) as shed:
        await bulk  # the lowest class goes first
    assert shed.value.priority == BULK
    assert not low.done() and admission.queued == 2
    # A second high displaces the low one; a third finds only highs and is refused.
    high_2 = asyncio.create_task(admission.wait(HIGH, None))
    await _settle()
    with pytest.raises(ShedError):
        await low
    with pytest.raises(ShedError):
        await admission.wait(HIGH, None)
    admission.leave()
    await high
    admission.leave()
    await high_2
    admission.leave()
    assert admission.in_flight == 0 and admission.queued == 0


@pytest.mark.asyncio
async def test_queued_bytes_are_bounded() -> None:
    admission = Admission(1, 10, retry_after_ms=100, max_queued_bytes=1000)
    assert admission.try_enter()
    small = [asyncio.create_task(admission.wait(LOW, None, 300)) for _ in range(3)]
    await _settle()
    assert admission.queued == 3 and admission.queued_bytes == 900
    # Another low one would pass the byte budget: shed, though the count has room.
    with pytest.raises(ShedError):
        await admission.wait(LOW, None, 200)
    # A request bigger than the whole budget never queues.
    with pytest.raises(ShedError):
        await admission.wait(HIGH, None, 1001)
    # A high one of 500 bytes displaces as few low ones as make room: two (the latest).
    big = asyncio.create_task(admission.wait(HIGH, None, 500))
    await _settle()
    assert [t.done() for t in small] == [False, True, True]
    for task in small[1:]:
        with pytest.raises(ShedError):
            await task
    assert admission.queued == 2 and admission.queued_bytes == 800
    admission.leave()
    await big  # the high one first
    assert admission.queued_bytes == 300
    admission.leave()
    await small[0]
    admission.leave()
    assert admission.queued_bytes == 0 and admission.in_flight == 0


@pytest.mark.asyncio
async def test_unclassed_is_never_displaced() -> None:
    admission = _admission(max_in_flight=1, max_queued=1)
    assert admission.try_enter()
    waiting = asyncio.create_task(admission.wait(UNCLASSED, None))
    await _settle()
    with pytest.raises(ShedError):
        await admission.wait(HIGH, None)
    admission.leave()
    await waiting


@pytest.mark.asyncio
async def test_deadline_while_queued_leaves_the_queue() -> None:
    admission = _admission(max_in_flight=1, max_queued=1)
    assert admission.try_enter()
    with pytest.raises(DeadlineExpiredError):
        await admission.wait(HIGH, 0.01)
    assert admission.queued == 0
    admission.leave()
    assert admission.in_flight == 0


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_the_queue_and_passes_a_granted_slot_on() -> None:
    admission = _admission(max_in_flight=1, max_queued=2)
    assert admission.try_enter()
    first = asyncio.create_task(admission.wait(HIGH, None))
    second = asyncio.create_task(admission.wait(LOW, None))
    await _settle()
    admission.leave()  # grants `first` its slot...
    first.cancel()  # ...but it is cancelled before it runs: the slot goes to `second`
    await _settle()
    assert first.cancelled()
    await second
    assert admission.in_flight == 1 and admission.queued == 0
    third = asyncio.create_task(admission.wait(LOW, None))
    await _settle()
    third.cancel()
    await _settle()
    assert admission.queued == 0 and admission.in_flight == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_in_flight", 0),
        ("max_queued", -1),
        ("max_queued_bytes", -5),
        ("max_in_flight", True),
        ("shed_retry_after_ms", 1.5),
        ("idempotency_ttl_s", -1),
        ("idempotency_max_bytes", "big"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        config_from_mapping({field: value})


def test_config_accepts_overload_and_idempotency_fields() -> None:
    config = config_from_mapping(
        {"max_in_flight": 8, "max_queued": 0, "idempotency_ttl_s": 0, "shed_retry_after_ms": 50}
    )
    assert (config.max_in_flight, config.max_queued, config.idempotency_ttl_s) == (8, 0, 0)


def test_route_cache_keeps_the_last_priority_classes() -> None:
    cache = RouteCache(UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60))
    assert cache.priorities == NO_CLASSES
    policy = router_pb2.PriorityPolicy(
        classes=[router_pb2.PriorityClass(name="high", triton_priority=1)], default_class="high"
    )
    cache.apply(router_pb2.WatchRoutesResponse(full_snapshot=True, priority_policy=policy))
    assert cache.priorities.resolve("") == PriorityClass("high", 1)
    # Heartbeats and table updates without the field keep the classes.
    cache.apply(router_pb2.WatchRoutesResponse(generation=2))
    cache.apply(router_pb2.WatchRoutesResponse(removed_models=["gone"], generation=3))
    assert cache.priorities.resolve("x") == PriorityClass("high", 1)
    changed = router_pb2.PriorityPolicy(
        classes=[router_pb2.PriorityClass(name="low", triton_priority=2, sheddable=True)],
        default_class="low",
    )
    cache.apply(router_pb2.WatchRoutesResponse(generation=4, priority_policy=changed))
    assert cache.priorities.resolve("high") == PriorityClass("low", 2, True)
