"""Session affinity over in-memory Tritons: sticky while unsaturated, moved once when saturated.

The handler answers with the instance's address; a held call stays in flight (counted in the
sidecar's own in-flight count, what saturation is judged by) until the test releases it. The
same behaviour on real Tritons: tests/integration/test_sequences.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from pointsman.router.v1 import router_pb2
from sidecar.config import SidecarConfig
from sidecar.metrics import SidecarMetrics
from sidecar.routes import RouteCache
from sidecar.service import InferenceProxy
from sidecar.testing import MockCall, MockContext, MockTransport
from sidecar.upstream import UpstreamPool
from tests.support.fakes import FakeClock

A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"
MODEL = "codegen"


class Tritons:
    """Answers with the serving address; calls wait while `hold` is set and not `released`."""

    def __init__(self) -> None:
        self.hold = False
        self.released = asyncio.Event()

    async def handler(self, call: MockCall) -> bytes:
        if self.hold:
            await self.released.wait()
        data: bytes = pb.ModelInferResponse(model_name=MODEL, id=call.address).SerializeToString()
        return data


def table(holders: Iterable[str] = (A, B, C)) -> router_pb2.RouteTable:
    return router_pb2.RouteTable(
        model_name=MODEL,
        generation=1,
        candidates=[
            router_pb2.RouteCandidate(
                target=router_pb2.Target(instance_id=a, grpc_address=a, ready_versions=["1"]),
                weight=1.0,
            )
            for a in holders
        ],
    )


class Sidecar:
    def __init__(self, tritons: Tritons, **policy: object) -> None:
        self.clock = FakeClock()
        transport = MockTransport(tritons.handler)
        pool = UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60, connect=transport)
        self.cache = RouteCache(pool, clock=self.clock)
        message = router_pb2.WatchRoutesResponse(full_snapshot=True, tables=[table()])
        if policy:
            message.session_policy.CopyFrom(router_pb2.SessionPolicy(**policy))  # type: ignore[arg-type]
        self.cache.apply(message)
        self.registry = CollectorRegistry()
        self.proxy = InferenceProxy(
            SidecarConfig(listen="127.0.0.1:0"),
            self.cache,
            pool,
            rng=random.Random(1),
            metrics=SidecarMetrics(self.registry, cache=self.cache, pool=pool),
            clock=self.clock,
        )
        self._infer = self.proxy.method_handlers()["ModelInfer"].unary_unary

    async def turn(self, session: str | None, header: str = "x-session-id") -> str:
        request = pb.ModelInferRequest(model_name=MODEL)
        request.raw_input_contents.append(b"\x00" * 8)
        metadata = () if session is None else ((header, session),)
        answer = await self._infer(request.SerializeToString(), MockContext(metadata))
        return str(pb.ModelInferResponse.FromString(answer).id)

    def moves(self) -> float:
        return (
            self.registry.get_sample_value(
                "pointsman_sidecar_session_moves_total", {"model": MODEL}
            )
            or 0.0
        )


@pytest.mark.asyncio
async def test_sessions_stay_on_one_holder_and_two_sidecars_agree() -> None:
    tritons = Tritons()
    one, two = Sidecar(tritons), Sidecar(tritons)
    landed: dict[str, set[str]] = {}
    for turn in range(10):
        for n in range(50):
            session = f"conversation-{n}"
            through = one if turn % 2 else two
            landed.setdefault(session, set()).add(await through.turn(session))
    assert all(len(instances) == 1 for instances in landed.values())
    spread = Counter(next(iter(i)) for i in landed.values())
    assert set(spread) == {A, B, C} and min(spread.values()) >= 8
    assert one.moves() == two.moves() == 0


async def _saturate(sidecar: Sidecar, tritons: Tritons, session: str, calls: int) -> list[str]:
    """`calls` concurrent turns of `session`, held in flight until all are sent."""
    tritons.hold = True
    tritons.released.clear()
    turns = [asyncio.create_task(sidecar.turn(session)) for _ in range(calls)]
    for _ in range(10):
        await asyncio.sleep(0)
    tritons.hold = False
    tritons.released.set()
    return list(await asyncio.gather(*turns))


@pytest.mark.asyncio
async def test_a_saturated_holder_moves_the_session_once_and_later_turns_follow() -> None:
    tritons = Tritons()
    s = Sidecar(tritons, header="x-session-id", max_in_flight=4, move_ttl_s=60)
    home = await s.turn("busy")
    served = await _saturate(s, tritons, "busy", 6)
    # Four fill the home holder; the fifth moves the session, the sixth follows the move.
    assert served[:4] == [home] * 4
    moved_to = served[4]
    assert moved_to != home and served[5] == moved_to
    assert s.moves() == 1
    # Unsaturated again, the session stays where it moved (no bouncing back).
    assert {await s.turn("busy") for _ in range(10)} == {moved_to}
    assert s.moves() == 1
    # Another sidecar sees no saturation and keeps the session's first holder: the move is
    # this sidecar's (it saw the load).
    assert await Sidecar(tritons).turn("busy") == home
    # The move is forgotten `move_ttl_s` after the session's last turn.
    s.clock.advance(61)
    assert await s.turn("busy") == home


@pytest.mark.asyncio
async def test_when_every_holder_is_saturated_the_session_stays() -> None:
    tritons = Tritons()
    s = Sidecar(tritons, header="x-session-id", max_in_flight=1)
    home = await s.turn("s")
    served = await _saturate(s, tritons, "s", 5)
    assert served[0] == home and len(set(served[:3])) == 3  # moved twice, each counted
    assert s.moves() == 2
    assert served[3:] == [served[2]] * 2  # no unsaturated holder left: stays


@pytest.mark.asyncio
async def test_the_header_comes_from_the_policy_and_can_turn_affinity_off() -> None:
    tritons = Tritons()
    s = Sidecar(tritons, header="x-conversation")
    assert len({await s.turn("c", header="x-conversation") for _ in range(20)}) == 1
    assert len({await s.turn("c", header="x-session-id") for _ in range(40)}) > 1
    # A policy reload turns it off: the header is then an ordinary one.
    off = router_pb2.SessionPolicy(header="", max_in_flight=8, move_ttl_s=600)
    s.cache.apply(router_pb2.WatchRoutesResponse(generation=2, session_policy=off))
    assert s.proxy._decider.sessions.header == ""
    assert len({await s.turn("c", header="x-conversation") for _ in range(40)}) > 1
    # Without a session the balancer picks as usual.
    assert len({await s.turn(None) for _ in range(40)}) > 1


@pytest.mark.asyncio
async def test_an_ejected_holder_is_left_out_while_another_exists() -> None:
    tritons = Tritons()
    s = Sidecar(tritons)
    home = await s.turn("s")
    outliers = s.proxy._decider._outliers
    for _ in range(3):
        outliers.failure(home)
    assert outliers.is_ejected(home)
    away = await s.turn("s")
    assert away != home and {await s.turn("s") for _ in range(5)} == {away}
    assert s.moves() == 0  # not a saturation move
