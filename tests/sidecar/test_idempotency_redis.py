"""The Redis idempotency store's rules against a real redis-server, without Triton: two stores
on one Redis play two sidecars. Coalescing across them, replay for the TTL, "not run" errors
never kept, the size bound, lease renewal and expiry, and Redis going away and coming back."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from pointsman.errors import ConfigError, NoReadyInstanceError
from sidecar.config import IdempotencyConfig, SidecarConfig, config_from_mapping
from sidecar.idempotency import IdempotencyCache, Reuse, idempotency_store
from sidecar.idempotency_redis import RedisIdempotencyStore, redacted
from sidecar.main import add_arguments, build_config
from sidecar.metrics import IdempotencyMetrics
from tests.sidecar.test_idempotency import Executions, errors_kept_unless_not_run
from tests.support.redis_server import RedisServer

KEY = ("codegen", "", "r-1")


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class Sidecars:
    """Stores on one Redis (each one sidecar's), with their metrics, closed at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"
        self.stores: list[RedisIdempotencyStore] = []
        self.metrics: list[IdempotencyMetrics] = []
        self.redis = Redis.from_url(url)

    def store(self, ttl_s: float = 30.0, **options: Any) -> RedisIdempotencyStore:
        # Generous timeouts: the test machine is shared and busy, and a timeout here would
        # (rightly) count the store down.
        settings = {"timeout_s": 2.0, "retry_interval_s": 0.1, "poll_interval_s": 0.1} | options
        config = IdempotencyConfig(
            backend="redis", url=self.url, key_prefix=self.prefix, **settings
        )
        metrics = IdempotencyMetrics(CollectorRegistry())
        store = RedisIdempotencyStore.from_config(config, ttl_s=ttl_s, metrics=metrics)
        store.start()
        self.stores.append(store)
        self.metrics.append(metrics)
        return store

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        await self.redis.aclose()


@pytest_asyncio.fixture
async def sidecars(redis: RedisServer) -> AsyncIterator[Sidecars]:
    group = Sidecars(redis.url)
    yield group
    await group.close()


def count(metrics: IdempotencyMetrics, name: str, **labels: str) -> float:
    """A series of `metrics` as Prometheus reads it (`name` without its prefix)."""
    value = metrics.registry.get_sample_value(f"pointsman_sidecar_idempotency_{name}_total", labels)
    return value or 0.0


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


# -- coalescing and replay across sidecars -------------------------------------------------------


@pytest.mark.asyncio
async def test_duplicates_over_two_sidecars_run_once_and_later_ones_replay(
    sidecars: Sidecars,
) -> None:
    a, b = sidecars.store(), sidecars.store()
    execute = Executions()
    calls = [asyncio.ensure_future((a if n % 2 else b).run(KEY, execute)) for n in range(8)]
    await until(lambda: execute.runs == 1)
    await asyncio.sleep(0.2)  # the other sidecar's duplicates are waiting, not running
    execute.release.set()
    results = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert execute.runs == 1
    assert [r for r, _ in results] == [b"answer"] * 8
    assert sorted(how.value for _, how in results) == ["coalesced"] * 7 + ["executed"]
    assert await a.run(KEY, execute) == (b"answer", Reuse.REPLAYED)
    assert await b.run(KEY, execute) == (b"answer", Reuse.REPLAYED)
    assert await b.run(("codegen", "2", "r-1"), execute) == (b"answer", Reuse.EXECUTED)
    assert execute.runs == 2


@pytest.mark.asyncio
async def test_a_waiter_is_woken_by_the_message_not_the_poll(sidecars: Sidecars) -> None:
    a, b = sidecars.store(), sidecars.store(poll_interval_s=60)
    execute = Executions()
    first = asyncio.ensure_future(a.run(KEY, execute))
    await until(lambda: execute.runs == 1)
    second = asyncio.ensure_future(b.run(KEY, execute))
    await asyncio.sleep(0.2)
    execute.release.set()
    assert await asyncio.wait_for(second, 10) == (b"answer", Reuse.COALESCED)
    assert (await first)[1] is Reuse.EXECUTED


@pytest.mark.asyncio
async def test_replayed_for_the_ttl_then_run_again(sidecars: Sidecars) -> None:
    a, b = sidecars.store(ttl_s=0.5), sidecars.store(ttl_s=0.5)
    execute = Executions()
    execute.release.set()
    assert await a.run(KEY, execute) == (b"answer", Reuse.EXECUTED)
    ttl_ms = await sidecars.redis.pttl(a.state_key(KEY))
    assert 0 < ttl_ms <= 500
    assert await b.run(KEY, execute) == (b"answer", Reuse.REPLAYED)
    await asyncio.sleep(0.6)
    assert await b.run(KEY, execute) == (b"answer", Reuse.EXECUTED)
    assert execute.runs == 2


@pytest.mark.asyncio
async def test_errors_kept_unless_the_request_did_not_run(sidecars: Sidecars) -> None:
    a, b = sidecars.store(), sidecars.store()
    await errors_kept_unless_not_run(a, b)  # the same rule as in memory, across sidecars
    assert await sidecars.redis.exists(a.state_key(("codegen", "", "r-9"))) == 0  # not kept


@pytest.mark.asyncio
async def test_a_not_run_answer_frees_the_key_for_a_waiter_elsewhere(sidecars: Sidecars) -> None:
    a, b = sidecars.store(), sidecars.store()
    refused = Executions(error=NoReadyInstanceError("no instance"))
    first = asyncio.ensure_future(a.run(KEY, refused))
    await until(lambda: refused.runs == 1)
    works = Executions()
    works.release.set()
    waiting = asyncio.ensure_future(b.run(KEY, works))
    await asyncio.sleep(0.2)
    assert works.runs == 0  # waits while the first runs
    refused.release.set()
    with pytest.raises(NoReadyInstanceError):
        await first
    assert await asyncio.wait_for(waiting, 10) == (b"answer", Reuse.EXECUTED)
    assert count(sidecars.metrics[1], "takeovers") == 1


@pytest.mark.asyncio
async def test_an_outcome_over_the_size_bound_is_not_kept(sidecars: Sidecars) -> None:
    a, b = sidecars.store(max_value_bytes=1000), sidecars.store(max_value_bytes=1000)
    big = Executions(response=b"x" * 1000)  # 1001 bytes with its tag
    big.release.set()
    assert await a.run(KEY, big) == (b"x" * 1000, Reuse.EXECUTED)
    assert await sidecars.redis.exists(a.state_key(KEY)) == 0
    assert count(sidecars.metrics[0], "too_large") == 1
    assert await b.run(KEY, big) == (b"x" * 1000, Reuse.EXECUTED)  # runs again
    small = Executions(response=b"x" * 999)
    small.release.set()
    assert (await a.run(("m", "", "small"), small))[1] is Reuse.EXECUTED
    assert (await b.run(("m", "", "small"), small))[1] is Reuse.REPLAYED


@pytest.mark.asyncio
async def test_keys_are_namespaced_and_hashed(sidecars: Sidecars) -> None:
    a = sidecars.store()
    long_id = ("codegen", "", "i" * 10 * 1024)
    assert a.state_key(long_id).startswith(sidecars.prefix)
    assert len(a.state_key(long_id)) == len(sidecars.prefix) + 66
    keys = {a.state_key(k) for k in [KEY, ("codegen", "2", "r-1"), ("echo", "", "r-1"), long_id]}
    assert len(keys) == 4
    execute = Executions()
    execute.release.set()
    await a.run(long_id, execute)
    stored = [k async for k in sidecars.redis.scan_iter(match=f"{sidecars.prefix}*")]
    assert stored == [a.state_key(long_id).encode()]


# -- leases --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_executor_renews_its_lease_so_nobody_else_runs(sidecars: Sidecars) -> None:
    a, b = sidecars.store(lease_s=0.3), sidecars.store(lease_s=0.3)
    execute = Executions()
    first = asyncio.ensure_future(a.run(KEY, execute))
    await until(lambda: execute.runs == 1)
    second = asyncio.ensure_future(b.run(KEY, execute))
    await asyncio.sleep(1.2)  # four leases long
    assert execute.runs == 1 and not second.done()
    execute.release.set()
    assert await asyncio.wait_for(second, 10) == (b"answer", Reuse.COALESCED)
    assert (await first)[1] is Reuse.EXECUTED


@pytest.mark.asyncio
async def test_a_dead_executors_lease_expires_and_one_waiter_runs(sidecars: Sidecars) -> None:
    a, b = sidecars.store(lease_s=0.5), sidecars.store()
    # What a sidecar killed mid-execution leaves: a running value under a lease nobody renews.
    await sidecars.redis.set(a.state_key(KEY), b"Rdead-sidecar:0", px=500)
    execute = Executions()
    execute.release.set()
    waiting = [asyncio.ensure_future(s.run(KEY, execute)) for s in (a, b, a, b)]
    await asyncio.sleep(0.3)
    assert execute.runs == 0  # never while the lease is alive
    results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert execute.runs == 1
    assert sorted(how.value for _, how in results) == ["coalesced"] * 3 + ["executed"]
    assert sum(count(m, "takeovers") for m in sidecars.metrics) == 1


# -- Redis down and back -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_down_requests_run_and_it_recovers(
    redis: RedisServer, sidecars: Sidecars
) -> None:
    a, b = sidecars.store(), sidecars.store()
    execute = Executions()
    execute.release.set()
    assert (await a.run(KEY, execute))[1] is Reuse.EXECUTED
    redis.stop()
    # The kept outcome is gone with Redis: each request runs, bypassing the store.
    assert await a.run(KEY, execute) == (b"answer", Reuse.BYPASSED)
    assert not a.up and sidecars.metrics[0].store_up is False
    assert count(sidecars.metrics[0], "store_errors", operation="acquire") == 1
    assert await a.run(("codegen", "", "r-2"), execute) == (b"answer", Reuse.BYPASSED)
    # Down: no more calls (and no more errors) per request, until a probe finds it back.
    assert count(sidecars.metrics[0], "store_errors", operation="acquire") == 1
    assert await b.run(KEY, execute) == (b"answer", Reuse.BYPASSED)
    assert execute.runs == 4

    redis.start()
    await until(lambda: a.up and b.up)
    assert sidecars.metrics[0].store_up is True
    racing = Executions()
    calls = [asyncio.ensure_future((a if n % 2 else b).run(KEY, racing)) for n in range(6)]
    await until(lambda: racing.runs == 1)
    await asyncio.sleep(0.2)
    racing.release.set()
    results = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert racing.runs == 1
    assert sorted(how.value for _, how in results) == ["coalesced"] * 5 + ["executed"]


@pytest.mark.asyncio
async def test_an_unreachable_redis_at_start_never_fails_a_request() -> None:
    group = Sidecars(f"redis://127.0.0.1:{_closed_port()}/0")
    try:
        store = group.store()
        execute = Executions()
        execute.release.set()
        assert await store.run(KEY, execute) == (b"answer", Reuse.BYPASSED)
        # Duplicates on this sidecar are still coalesced while Redis is down.
        slow = Executions()
        calls = [asyncio.ensure_future(store.run(("m", "", "x"), slow)) for _ in range(3)]
        await until(lambda: slow.runs == 1)
        slow.release.set()
        results = await asyncio.gather(*calls)
        assert sorted(how.value for _, how in results) == ["bypassed", "coalesced", "coalesced"]
    finally:
        await group.close()


def _closed_port() -> int:
    from app.processes import free_port

    return free_port()


# -- configuration -------------------------------------------------------------------------------


def test_the_config_picks_the_store(redis: RedisServer) -> None:
    metrics = IdempotencyMetrics(CollectorRegistry())
    memory = idempotency_store(SidecarConfig(), metrics)
    assert isinstance(memory, IdempotencyCache) and metrics.store_up is None
    shared = config_from_mapping(
        {"idempotency_ttl_s": 5, "idempotency": {"backend": "redis", "url": redis.url}}
    )
    assert isinstance(idempotency_store(shared, metrics), RedisIdempotencyStore)
    assert idempotency_store(SidecarConfig(idempotency_ttl_s=0), metrics) is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"backend": "redis"}, "idempotency.url: required with backend: redis"),
        ({"url": "redis://r:6379"}, "idempotency.url: only with backend: redis"),
        ({"backend": "redis", "url": "http://r:6379"}, "must be a redis://, rediss:// or unix"),
        ({"backend": "disk"}, "idempotency.backend: must be one of memory, redis"),
        ({"backend": "redis", "url": "redis://r", "lease_s": 0}, "idempotency.lease_s: must be"),
        ({"backend": "redis", "url": "redis://r", "hosts": 1}, "idempotency.hosts: unknown"),
    ],
)
def test_bad_idempotency_sections_are_refused(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({"idempotency": section})


def test_flags_set_the_store_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("idempotency:\n  lease_s: 4\n  key_prefix: 'fleet-a:'\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--idempotency-backend", "redis", "--idempotency-url", "redis://r:6379/1"]
    config = build_config(parser.parse_args(["--config", str(path), *flags]))
    assert config.idempotency == IdempotencyConfig(
        backend="redis", url="redis://r:6379/1", lease_s=4, key_prefix="fleet-a:"
    )
    with pytest.raises(ConfigError, match=r"^idempotency\.url: required with backend: redis$"):
        build_config(parser.parse_args(["--idempotency-backend", "redis"]))


def test_logs_never_show_the_password() -> None:
    assert redacted("redis://user:s3cret@redis:6379/0") == "redis://redis:6379/0"
    assert redacted("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"


@pytest.mark.asyncio
async def test_the_memory_store_counts_outcomes_too_large_to_keep() -> None:
    metrics = IdempotencyMetrics(CollectorRegistry())
    cache = IdempotencyCache(10, 300, metrics=metrics)
    big = Executions(response=b"x" * 300)
    big.release.set()
    await cache.run(KEY, big)
    assert len(cache) == 0 and count(metrics, "too_large") == 1
