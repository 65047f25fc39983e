"""Idempotency across sidecars on real Tritons and a real Redis: two sidecars over the session
fleet share one Redis store, and Triton's own statistics count the executions."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from app.fleet import Fleet
from bench.calls import INFER_METHOD, codegen_request
from sidecar.config import IdempotencyConfig, SidecarConfig
from sidecar.metrics import STORE_OPERATIONS
from sidecar.server import SidecarServer, start_sidecar
from tests.sidecar.test_idempotency import codegen_inferences
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.triton

REQUEST = codegen_request("def fibonacci(n):", 8)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def _sidecar(fleet: Fleet, redis: RedisServer, seed: int) -> SidecarServer:
    config = SidecarConfig(
        listen="127.0.0.1:0",
        routers=(fleet.router_address,),
        cold_start_wait_s=0,
        idempotency=IdempotencyConfig(
            backend="redis",
            url=redis.url,
            # The test machine is shared and busy: a slow answer must not count Redis down.
            timeout_s=1.0,
            retry_interval_s=0.2,
        ),
    )
    sidecar = await start_sidecar(config, rng=random.Random(seed), registry=CollectorRegistry())
    async with asyncio.timeout(30):
        while "codegen" not in sidecar.cache.routes:
            await asyncio.sleep(0.05)
    return sidecar


async def _send(sidecar: SidecarServer, request_id: str) -> bytes:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        infer = channel.unary_unary(INFER_METHOD, request_serializer=None,
                                    response_deserializer=None)  # fmt: skip
        answer = await infer(REQUEST, metadata=(("x-request-id", request_id),), timeout=60)
    return bytes(answer)


async def _duplicates(sidecars: list[SidecarServer], request_id: str, n: int) -> list[bytes]:
    """`n` concurrent duplicates of one request id, split over `sidecars` in turn."""
    return await asyncio.gather(*(_send(sidecars[i % len(sidecars)], request_id) for i in range(n)))


async def _executions(fleet: Fleet) -> int:
    return await asyncio.to_thread(codegen_inferences, fleet)


def _count(sidecars: list[SidecarServer], name: str, **labels: str) -> float:
    return sum(
        s.metrics.registry.get_sample_value(name, labels) or 0.0 for s in sidecars
    )  # fmt: skip


@pytest.mark.timeout(180)
def test_duplicates_across_two_sidecars_run_once_and_redis_down_fails_nothing(
    fleet: Fleet, redis: RedisServer
) -> None:
    async def scenario() -> None:
        sidecars = [await _sidecar(fleet, redis, seed) for seed in (1, 2)]
        try:
            # 8 concurrent duplicates, 4 through each sidecar: one execution in Triton.
            request_id = f"across-{uuid.uuid4()}"
            before = await _executions(fleet)
            answers = await _duplicates(sidecars, request_id, 8)
            assert await _executions(fleet) - before == 1
            assert len(set(answers)) == 1
            # A later duplicate through either sidecar is replayed: nothing more runs.
            before = await _executions(fleet)
            later = [await _send(s, request_id) for s in sidecars]
            assert await _executions(fleet) - before == 0
            assert later == answers[:2]

            # Redis stopped mid-run: no request fails, they run, and the bypass is counted.
            ids = [f"outage-{n}-{uuid.uuid4()}" for n in range(24)]
            before = await _executions(fleet)

            results: list[bytes | BaseException] = []
            for batch in range(6):
                sending = asyncio.gather(
                    *(_send(sidecars[i % 2], rid)
                      for i, rid in enumerate(ids[batch * 4:batch * 4 + 4])),
                    return_exceptions=True,
                )  # fmt: skip
                if batch == 2:
                    await asyncio.to_thread(redis.stop)  # while this batch is in flight
                results += await sending
            failed = [r for r in results if isinstance(r, BaseException)]
            assert failed == []
            assert await _executions(fleet) - before == len(ids)
            bypassed = _count(
                sidecars, "pointsman_sidecar_idempotent_requests_total", outcome="bypassed"
            )
            assert bypassed > 0, "Redis was stopped while requests were being sent"
            errors = sum(
                _count(sidecars, "pointsman_sidecar_idempotency_store_errors_total", operation=op)
                for op in STORE_OPERATIONS
            )
            assert errors >= 1
            assert _count(sidecars, "pointsman_sidecar_idempotency_store_up") == 0
            # Still down: requests keep working (each runs; none is coalesced across).
            down_id = f"down-{uuid.uuid4()}"
            assert len(await _duplicates(sidecars, down_id, 4)) == 4

            # Redis back (empty): the sidecars find it by themselves and coalesce again.
            redis.start()  # from this thread, which outlives it (see RedisServer.start)
            async with asyncio.timeout(30):
                while _count(sidecars, "pointsman_sidecar_idempotency_store_up") < 2:
                    await asyncio.sleep(0.05)
            request_id = f"after-{uuid.uuid4()}"
            before = await _executions(fleet)
            answers = await _duplicates(sidecars, request_id, 8)
            assert await _executions(fleet) - before == 1
            assert len(set(answers)) == 1
        finally:
            for sidecar in sidecars:
                await sidecar.stop(1.0)

    asyncio.run(scenario())
