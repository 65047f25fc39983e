"""Sequence affinity over in-memory Tritons that keep sequence state as Triton's batcher does.

`SequenceFleet` answers like a Triton serving a stateful accumulator: a START opens the
sequence's sum on the instance it reaches, a later step adds to it there, and a step without
START for a sequence the instance does not hold is refused before it runs (INVALID_ARGUMENT,
Triton's own message). So a wrong route shows as a wrong sum or a refusal. The same behaviour
on real Tritons: tests/integration/test_sequences.py.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from pointsman.router.v1 import router_pb2
from sidecar.config import SidecarConfig
from sidecar.metrics import SidecarMetrics
from sidecar.routes import RouteCache
from sidecar.sequences import NOT_STARTED
from sidecar.service import InferenceProxy
from sidecar.testing import MockAbort, MockCall, MockContext, MockTransport, rpc_error
from sidecar.upstream import UpstreamPool
from tests.support.fakes import FakeClock

A, B, C, D = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001", "10.0.0.4:8001"
S = grpc.StatusCode
MODEL = "accumulate"
REFUSED = "failed to connect to all addresses; connection refused"


@dataclass
class SequenceFleet:
    """The Tritons behind every sidecar of a test: per instance, the sums of its sequences."""

    sums: dict[str, dict[int | str, int]] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    queue_full: set[str] = field(default_factory=set)
    batched: bool = True
    idle_us: int = 2_000_000
    # (address, sequence id, start) of every step an instance RAN, in order.
    ran: list[tuple[str, int | str, bool]] = field(default_factory=list)

    def handler(self, call: MockCall) -> bytes:
        if call.address in self.dead:
            raise rpc_error(S.UNAVAILABLE, REFUSED)
        if call.method == "ModelConfig":
            config = pb.ModelConfigResponse()
            config.config.name = MODEL
            if self.batched:
                config.config.sequence_batching.max_sequence_idle_microseconds = self.idle_us
            return config.SerializeToString()
        assert call.method == "ModelInfer"
        request = pb.ModelInferRequest.FromString(call.request)
        params = request.parameters
        value = struct.unpack("<i", request.raw_input_contents[0])[0]
        held = self.sums.setdefault(call.address, {})
        if "sequence_id" not in params or not self.batched:
            return answer(call.address, value)  # Triton ignores a sequence id there
        choice = params["sequence_id"].WhichOneof("parameter_choice")
        sid = getattr(params["sequence_id"], choice)
        start, end = params["sequence_start"].bool_param, params["sequence_end"].bool_param
        if not start and sid not in held:
            raise rpc_error(
                S.INVALID_ARGUMENT,
                f"inference request for sequence {sid} to model '{MODEL}' {NOT_STARTED}",
            )
        if call.address in self.queue_full:
            raise rpc_error(S.UNAVAILABLE, "Exceeds maximum queue size")
        self.ran.append((call.address, sid, start))
        total = value + (0 if start else held[sid])
        if end:
            held.pop(sid, None)
        else:
            held[sid] = total
        return answer(call.address, total)


def answer(address: str, total: int) -> bytes:
    response = pb.ModelInferResponse(model_name=MODEL, id=address)
    response.raw_output_contents.append(struct.pack("<i", total))
    data: bytes = response.SerializeToString()
    return data


def step(
    sid: int | str | None, value: int, *, start: bool = False, end: bool = False, **extra: Any
) -> bytes:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.raw_input_contents.append(struct.pack("<i", value))
    if sid is not None:
        if isinstance(sid, str):
            request.parameters["sequence_id"].string_param = sid
        else:
            request.parameters["sequence_id"].int64_param = sid
        request.parameters["sequence_start"].bool_param = start
        request.parameters["sequence_end"].bool_param = end
    for key, parameter in extra.items():
        setattr(request.parameters[key], *parameter)
    data: bytes = request.SerializeToString()
    return data


def total_of(data: bytes) -> tuple[str, int]:
    response = pb.ModelInferResponse.FromString(data)
    return response.id, struct.unpack("<i", response.raw_output_contents[0])[0]


def routes(holders: Iterable[str], generation: int = 1) -> router_pb2.WatchRoutesResponse:
    table = router_pb2.RouteTable(
        model_name=MODEL,
        generation=generation,
        candidates=[
            router_pb2.RouteCandidate(
                target=router_pb2.Target(instance_id=a, grpc_address=a, ready_versions=["1"]),
                weight=1.0,
            )
            for a in holders
        ],
    )
    return router_pb2.WatchRoutesResponse(full_snapshot=True, tables=[table], generation=generation)


@dataclass
class Sidecar:
    transport: MockTransport
    cache: RouteCache
    registry: CollectorRegistry
    proxy: InferenceProxy
    clock: FakeClock

    async def infer(self, data: bytes) -> bytes:
        handler = self.proxy.method_handlers()["ModelInfer"]
        answer_bytes: bytes = await handler.unary_unary(data, MockContext(clock=self.clock))
        return answer_bytes

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    @property
    def pins(self) -> int:
        return self.proxy._decider.sequences.pins


def sidecar(
    fleet: SequenceFleet, holders: Iterable[str] = (A, B, C), clock: FakeClock | None = None,
    **config: Any,
) -> Sidecar:  # fmt: skip
    clock = clock or FakeClock()
    settings = SidecarConfig(listen="127.0.0.1:0", cold_start_wait_s=0, **config)
    transport = MockTransport(fleet.handler)
    pool = UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60, connect=transport)
    cache = RouteCache(pool, clock=clock)
    cache.apply(routes(holders))
    cache.set_connected(True)
    registry = CollectorRegistry()
    proxy = InferenceProxy(
        settings,
        cache,
        pool,
        rng=random.Random(5),
        metrics=SidecarMetrics(registry, cache=cache, pool=pool),
        clock=clock,
    )
    return Sidecar(transport, cache, registry, proxy, clock)


async def run_sequences(
    sidecars: list[Sidecar], sequences: Iterable[int | str], steps: int = 5
) -> dict[int | str, list[tuple[str, int]]]:
    """Steps 1..`steps` of every sequence, interleaved (step k of all, then k + 1), sidecar
    by step number in turn; the answers (instance, running sum) per sequence."""
    ids = list(sequences)
    answers: dict[int | str, list[tuple[str, int]]] = {sid: [] for sid in ids}
    for k in range(1, steps + 1):
        through = sidecars[(k - 1) % len(sidecars)]
        for sid in ids:
            data = step(sid, k, start=k == 1, end=k == steps)
            answers[sid].append(total_of(await through.infer(data)))
    return answers


async def start_all(through: Sidecar, fleet: SequenceFleet, ids: Iterable[int]) -> dict[int, str]:
    """Starts each sequence (adding 1); where each started."""
    for sid in ids:
        await through.infer(step(sid, 1, start=True))
    return {sid: a for a, sid, start in fleet.ran if start and isinstance(sid, int)}


def expect_correct(answers: dict[int | str, list[tuple[str, int]]]) -> None:
    for sid, steps in answers.items():
        assert [total for _, total in steps] == [1, 3, 6, 10, 15][: len(steps)], sid
        assert len({instance for instance, _ in steps}) == 1, sid


# -- one sidecar, two sidecars -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_interleaved_sequences_stay_on_one_instance_each() -> None:
    fleet = SequenceFleet()
    s = sidecar(fleet)
    answers = await run_sequences([s], [*range(1, 19), "session-a", "session-b"])
    expect_correct(answers)
    # Spread over the holders by the hash, no table needed.
    assert {steps[0][0] for steps in answers.values()} == {A, B, C}
    assert s.pins == 0 and not any(fleet.sums.values())  # every sequence ended
    assert s.metric("pointsman_sidecar_sequence_probes_total", model=MODEL) == 0


@pytest.mark.asyncio
async def test_two_sidecars_alternating_per_step_agree_without_talking() -> None:
    fleet = SequenceFleet()
    one, two = sidecar(fleet), sidecar(fleet)
    expect_correct(await run_sequences([one, two], range(100, 120)))
    assert one.metric("pointsman_sidecar_sequence_probes_total", model=MODEL) == 0
    assert two.metric("pointsman_sidecar_sequence_probes_total", model=MODEL) == 0


@pytest.mark.asyncio
async def test_a_sequence_started_off_its_first_holder_is_pinned_and_found_by_another_sidecar(
) -> None:  # fmt: skip
    fleet = SequenceFleet()
    one, two = sidecar(fleet), sidecar(fleet)
    sid = 7
    # Where every sidecar would send sequence 7 first: refuse connections there at its start.
    preferred = total_of(await one.infer(step(sid, 1, start=True, end=True)))[0]
    fleet.dead.add(preferred)
    started_on = total_of(await one.infer(step(sid, 1, start=True)))[0]
    assert started_on != preferred and one.pins == 1
    fleet.dead.clear()
    # The first sidecar goes straight to it; the second looks along the order and finds it.
    assert total_of(await one.infer(step(sid, 2))) == (started_on, 3)
    assert total_of(await two.infer(step(sid, 3))) == (started_on, 6)
    assert two.metric("pointsman_sidecar_sequence_probes_total", model=MODEL) == 1
    assert two.pins == 1
    assert total_of(await two.infer(step(sid, 4, end=True))) == (started_on, 10)
    assert two.pins == 0
    # Nothing ran anywhere but where the sequence lives.
    assert {a for a, s_, _ in fleet.ran if s_ == sid and a != preferred} == {started_on}


# -- route changes ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_holder_added_mid_sequence_moves_no_live_sequence() -> None:
    fleet = SequenceFleet()
    s = sidecar(fleet)
    ids = list(range(1, 41))
    before = await start_all(s, fleet, ids)
    s.cache.apply(routes((A, B, C, D), generation=2))  # D ranks first for about a quarter
    for sid in ids:
        assert total_of(await s.infer(step(sid, 2))) == (before[sid], 3)
    probes = s.metric("pointsman_sidecar_sequence_probes_total", model=MODEL)
    assert 0 < probes == s.pins < len(ids)  # one refused try each, then pinned
    for sid in ids:
        assert total_of(await s.infer(step(sid, 3, end=True))) == (before[sid], 6)
    assert s.metric("pointsman_sidecar_sequence_probes_total", model=MODEL) == probes
    assert s.pins == 0
    # New sequences use D too.
    assert D in {total_of(await s.infer(step(sid, 1, start=True)))[0] for sid in range(50, 70)}


@pytest.mark.asyncio
async def test_a_holder_that_leaves_the_routes_keeps_its_live_sequences() -> None:
    """Draining before an unload: the route table drops the holder, Triton still serves it."""
    fleet = SequenceFleet()
    one, two = sidecar(fleet), sidecar(fleet)
    ids = list(range(1, 31))
    on = await start_all(one, fleet, ids)
    for s in (one, two):
        s.cache.apply(routes((B, C), generation=2))
    for k, s in ((2, one), (3, two)):
        for sid in ids:
            assert total_of(await s.infer(step(sid, k))) == (on[sid], sum(range(1, k + 1)))
    assert two.metric("pointsman_sidecar_sequence_probes_total", model=MODEL) == 0
    # New sequences avoid the departed holder.
    assert A not in {total_of(await one.infer(step(s_, 1, start=True)))[0] for s_ in range(90, 99)}
    # After the model's idle time the departed holder is forgotten.
    one.clock.advance(2.5)
    a_ids = [sid for sid in ids if on[sid] == A]
    with pytest.raises(MockAbort) as aborted:
        await one.infer(step(a_ids[0], 4))
    assert aborted.value.code is S.FAILED_PRECONDITION


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_dead_instance_fails_its_sequences_clearly_and_no_step_runs_elsewhere() -> None:
    fleet = SequenceFleet()
    s = sidecar(fleet)
    ids = list(range(1, 21))
    on = await start_all(s, fleet, ids)
    victim = on[ids[0]]
    fleet.dead.add(victim)
    ran_before = len(fleet.ran)
    for sid in ids:
        if on[sid] == victim:
            with pytest.raises(MockAbort) as aborted:
                await s.infer(step(sid, 2))
            assert aborted.value.code is S.ABORTED
            assert f"sequence {sid} of model '{MODEL}'" in aborted.value.details
            assert "state is lost" in aborted.value.details and victim in aborted.value.details
        else:
            assert total_of(await s.infer(step(sid, 2))) == (on[sid], 3)
    lost = [sid for sid in ids if on[sid] == victim]
    # Only the other sequences' steps ran, each where its sequence lives.
    assert [(a, sid) for a, sid, _ in fleet.ran[ran_before:]] == [
        (on[sid], sid) for sid in ids if sid not in lost
    ]
    assert s.metric("pointsman_sidecar_sequence_failures_total", model=MODEL, code="ABORTED") == (
        len(lost)
    )
    assert s.pins == 0


@pytest.mark.asyncio
async def test_a_full_queue_at_the_holder_goes_to_the_caller_not_elsewhere() -> None:
    fleet = SequenceFleet()
    s = sidecar(fleet)
    home = total_of(await s.infer(step(5, 1, start=True)))[0]
    fleet.queue_full.add(home)
    with pytest.raises(MockAbort) as aborted:
        await s.infer(step(5, 2))
    assert (aborted.value.code, aborted.value.details) == (
        S.UNAVAILABLE,
        "Exceeds maximum queue size",
    )
    assert [c.address for c in s.transport.calls if c.method == "ModelInfer"][-1] == home
    fleet.queue_full.clear()
    assert total_of(await s.infer(step(5, 2))) == (home, 3)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (step("x" * 10240, 1, start=True), S.INVALID_ARGUMENT, "at most 128 characters"),
        (step(None, 1, sequence_id=("bool_param", True)), S.INVALID_ARGUMENT, "sequence_id"),
        (step(9, 1, sequence_start=("int64_param", 1)), S.INVALID_ARGUMENT, "sequence_start"),
        (step(404, 1), S.FAILED_PRECONDITION, "sequence 404 of model 'accumulate'"),
        (step(405, 1, end=True), S.FAILED_PRECONDITION, "no instance holds it"),
        (step("gone", 1), S.FAILED_PRECONDITION, "sequence 'gone'"),
    ],
    ids=["10 KiB string id", "bool id", "int start flag", "no start", "end of unknown", "string"],
)
@pytest.mark.asyncio
async def test_bad_sequence_input_gets_a_clear_status_and_leaves_nothing_behind(
    data: bytes, code: grpc.StatusCode, words: str
) -> None:
    fleet = SequenceFleet()
    s = sidecar(fleet)
    with pytest.raises(MockAbort) as aborted:
        await s.infer(data)
    assert aborted.value.code is code and words in aborted.value.details
    assert s.pins == 0 and fleet.ran == []
    infers = [c for c in s.transport.calls if c.method == "ModelInfer"]
    # Refused before any instance for bad bytes; looked for on every holder, never run, else.
    assert len(infers) == (0 if code is S.INVALID_ARGUMENT else 3)


@pytest.mark.asyncio
async def test_sequence_ids_of_a_model_without_a_sequence_batcher_route_as_usual() -> None:
    fleet = SequenceFleet(batched=False)
    s = sidecar(fleet)
    served = {total_of(await s.infer(step(3, 1)))[0] for _ in range(30)}
    assert served == {A, B, C}
    configs = [c for c in s.transport.calls if c.method == "ModelConfig"]
    assert len(configs) == 1  # asked once, kept while the route table stands


@pytest.mark.asyncio
async def test_the_pin_table_is_bounded() -> None:
    fleet = SequenceFleet()
    s = sidecar(fleet)
    s.proxy._decider.sequences._max_pins = 4
    fleet.dead.update({A, B})  # every start fails over to C: an exception each
    for sid in range(1, 30):
        await s.infer(step(sid, 1, start=True))
    assert s.pins == 4
