"""Idempotent requests: the cache's rules with an injected clock, then on real Tritons
(the session fleet): duplicates of one request id run once, as Triton's own statistics see."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import Callable

import grpc
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from app.fleet import Fleet
from bench.calls import INFER_METHOD, codegen_request
from pointsman.errors import InvalidRequestError, NoReadyInstanceError, OverloadedError
from sidecar.idempotency import (
    ENTRY_OVERHEAD_BYTES,
    IdempotencyCache,
    IdempotencyStore,
    Reuse,
    StoredStatusError,
)
from tests.support.fakes import FakeClock

KEY = ("codegen", "", "r-1")


class Executions:
    """An execute() that counts its runs and answers when released."""

    def __init__(self, response: bytes = b"answer", error: Exception | None = None) -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.response = response
        self.error = error

    async def __call__(self) -> bytes:
        self.runs += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.response


def _cache(ttl_s: float = 10.0, max_bytes: int = 10_000) -> tuple[IdempotencyCache, FakeClock]:
    clock = FakeClock(100.0)
    return IdempotencyCache(ttl_s, max_bytes, clock=clock), clock


@pytest.mark.asyncio
async def test_concurrent_duplicates_run_once() -> None:
    cache, _ = _cache()
    execute = Executions()
    calls = [asyncio.create_task(cache.run(KEY, execute)) for _ in range(5)]
    await asyncio.sleep(0)
    execute.release.set()
    results = await asyncio.gather(*calls)
    assert execute.runs == 1
    assert [r for r, _ in results] == [b"answer"] * 5
    assert sorted(how.value for _, how in results) == ["coalesced"] * 4 + ["executed"]


@pytest.mark.asyncio
async def test_replay_within_ttl_then_run_again() -> None:
    cache, clock = _cache(ttl_s=10)
    execute = Executions()
    execute.release.set()
    assert await cache.run(KEY, execute) == (b"answer", Reuse.EXECUTED)
    clock.now += 9.9
    assert await cache.run(KEY, execute) == (b"answer", Reuse.REPLAYED)
    assert await cache.run(("codegen", "", "r-2"), execute) == (b"answer", Reuse.EXECUTED)
    assert await cache.run(("codegen", "2", "r-1"), execute) == (b"answer", Reuse.EXECUTED)
    clock.now += 0.2  # past the TTL of the first
    assert await cache.run(KEY, execute) == (b"answer", Reuse.EXECUTED)
    assert execute.runs == 4


async def errors_kept_unless_not_run(first: IdempotencyStore, later: IdempotencyStore) -> None:
    """The rule for errors, shared by every store: `first` runs, `later` sees a duplicate (the
    same store, or another sidecar's on the same Redis). A kept error is replayed with its code
    and message; one that says the request did not run (overload, UNAVAILABLE, deadlines...)
    is not kept, so a retry runs it."""
    bad = Executions(error=InvalidRequestError("bad input"))
    bad.release.set()
    with pytest.raises(InvalidRequestError):
        await first.run(KEY, bad)
    with pytest.raises(StoredStatusError) as replayed:
        await later.run(KEY, bad)
    assert replayed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert replayed.value.details() == "bad input"
    assert bad.runs == 1
    key = ("codegen", "", "r-9")
    for error in (OverloadedError("overloaded"), NoReadyInstanceError("no instance")):
        refused = Executions(error=error)
        refused.release.set()
        for store in (first, later):
            with pytest.raises(type(error)):
                await store.run(key, refused)
        assert refused.runs == 2


@pytest.mark.asyncio
async def test_errors_kept_unless_the_request_did_not_run() -> None:
    cache, _ = _cache()
    await errors_kept_unless_not_run(cache, cache)


@pytest.mark.parametrize(
    ("sizes", "budget_entries", "kept"),
    [
        # (payload sizes in order, budget in whole entries of 100 bytes, keys still kept)
        ([100, 100, 100], 3, [0, 1, 2]),
        ([100, 100, 100], 2, [1, 2]),
        ([100, 100, 100, 100], 1, [3]),
    ],
)
@pytest.mark.asyncio
async def test_budget_evicts_least_recently_used(
    sizes: list[int], budget_entries: int, kept: list[int]
) -> None:
    entry = 100 + len("codegen") + 1 + ENTRY_OVERHEAD_BYTES  # key "codegen", "", "<digit>"
    cache, _ = _cache(max_bytes=entry * budget_entries)
    for i, size in enumerate(sizes):
        execute = Executions(b"x" * size)
        execute.release.set()
        await cache.run(("codegen", "", str(i)), execute)
    assert cache.used_bytes <= cache.max_bytes
    assert [i for i in range(len(sizes)) if ("codegen", "", str(i)) in cache] == kept


@pytest.mark.asyncio
async def test_recent_use_protects_from_eviction_and_oversize_is_not_kept() -> None:
    entry = 100 + len("codegen") + 1 + ENTRY_OVERHEAD_BYTES
    cache, _ = _cache(max_bytes=entry * 2)
    for i in range(2):
        execute = Executions(b"x" * 100)
        execute.release.set()
        await cache.run(("codegen", "", str(i)), execute)
    hit = Executions()
    assert (await cache.run(("codegen", "", "0"), hit))[1] is Reuse.REPLAYED  # 0 is now recent
    newer = Executions(b"x" * 100)
    newer.release.set()
    await cache.run(("codegen", "", "2"), newer)  # evicts 1, the least recently used
    assert [i for i in range(3) if ("codegen", "", str(i)) in cache] == [0, 2]
    huge = Executions(b"x" * (entry * 3))
    huge.release.set()
    await cache.run(("codegen", "", "3"), huge)
    assert len(cache) == 2 and cache.used_bytes <= cache.max_bytes


@pytest.mark.asyncio
async def test_first_caller_leaving_does_not_cancel_the_execution() -> None:
    cache, _ = _cache()
    execute = Executions()
    first = asyncio.create_task(cache.run(KEY, execute))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.run(KEY, execute))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    execute.release.set()
    assert await second == (b"answer", Reuse.COALESCED)
    assert first.cancelled() and execute.runs == 1


@pytest.mark.asyncio
async def test_ttl_zero_coalesces_but_keeps_nothing() -> None:
    cache, _ = _cache(ttl_s=0)
    execute = Executions()
    execute.release.set()
    await cache.run(KEY, execute)
    await cache.run(KEY, execute)
    assert execute.runs == 2 and len(cache) == 0


# -- on real Tritons -----------------------------------------------------------------------------


def codegen_inferences(fleet: Fleet) -> int:
    """Triton's own count of codegen inferences, summed over every instance that has it."""
    total = 0
    for spec in fleet.tritons:
        if "codegen" not in spec.load_models:
            continue
        with grpcclient.InferenceServerClient(spec.grpc_address) as client:
            stats = client.get_inference_statistics("codegen", as_json=True)
        total += sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))
    return total


def _idempotent_counts(fleet: Fleet) -> dict[str, float]:
    with urllib.request.urlopen(fleet.sidecar_metrics_url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return {
            sample.labels["outcome"]: sample.value
            for family in families
            if family.name == "pointsman_sidecar_idempotent_requests"
            for sample in family.samples
            if sample.name.endswith("_total")
        }


async def _send_all(
    address: str, requests: list[tuple[bytes, tuple[tuple[str, str], ...]]]
) -> list[bytes]:
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            INFER_METHOD, request_serializer=None, response_deserializer=None
        )
        answers = await asyncio.gather(
            *(infer(data, metadata=md, timeout=60) for data, md in requests)
        )
    return [bytes(a) for a in answers]


def _after(fleet: Fleet, action: Callable[[], object]) -> int:
    before = codegen_inferences(fleet)
    action()
    return codegen_inferences(fleet) - before


@pytest.mark.triton
@pytest.mark.timeout(120)
def test_duplicates_run_once_on_triton(fleet: Fleet) -> None:
    address = fleet.sidecar_address
    request = codegen_request("def fibonacci(n):", 8)
    request_id = f"dup-{uuid.uuid4()}"
    by_header = ((request, (("x-request-id", request_id),)),)
    metrics_before = _idempotent_counts(fleet)
    answers: list[bytes] = []

    def duplicates() -> None:
        answers.extend(asyncio.run(_send_all(address, list(by_header * 8))))

    assert _after(fleet, duplicates) == 1  # 8 concurrent duplicates, one execution
    assert len(answers) == 8 and len(set(answers)) == 1
    # A later duplicate within the TTL is replayed: Triton sees nothing.
    replayed: list[bytes] = []
    assert (
        _after(fleet, lambda: replayed.extend(asyncio.run(_send_all(address, list(by_header)))))
        == 0
    )
    assert replayed == answers[:1]
    # A different id runs again.
    other = ((request, (("x-request-id", f"other-{uuid.uuid4()}"),)),)
    assert _after(fleet, lambda: asyncio.run(_send_all(address, list(other)))) == 1
    # The request's own `id` field serves when there is no x-request-id.
    by_field = codegen_request("def fibonacci(n):", 8, request_id=f"field-{uuid.uuid4()}")
    assert _after(fleet, lambda: asyncio.run(_send_all(address, [(by_field, ())] * 6))) == 1
    # Without any id nothing is coalesced.
    assert _after(fleet, lambda: asyncio.run(_send_all(address, [(request, ())] * 3))) == 3
    metrics = _idempotent_counts(fleet)
    gained = {k: v - metrics_before.get(k, 0.0) for k, v in metrics.items()}
    assert gained == {"executed": 3, "coalesced": 12, "replayed": 1}
