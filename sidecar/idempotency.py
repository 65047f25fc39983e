"""Idempotent requests: one execution per request id, and its outcome replayed for a while.

A request that carries an id (`x-request-id` metadata, else the ModelInferRequest's `id`) is
keyed by (model, version asked for, id). While one execution of a key runs, duplicates wait
for its outcome instead of running again (coalescing). A finished outcome, the response
bytes or the error status, is kept for `ttl_s` and replayed to later duplicates, within
`max_bytes`: least recently used outcomes go first, and one larger than the whole budget is
not kept. Outcomes that say the request was not run (UNAVAILABLE, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED, CANCELLED, ABORTED) are not kept, so a retry of those runs again: safe
retries build on this.

The execution runs in a task of its own, so the caller that started it can leave (cancel,
deadline) without taking the result from the others; Triton would run it anyway.

`IdempotencyStore` is what the request path needs (`run`); `IdempotencyCache` is the embedded,
per-sidecar store; `sidecar.idempotency_redis.RedisIdempotencyStore` is shared by every sidecar
and follows the same rules across them. Both coalesce their own duplicates with `SingleFlight`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import grpc

from pointsman.errors import status_of

if TYPE_CHECKING:
    from sidecar.config import SidecarConfig
    from sidecar.metrics import IdempotencyMetrics

__all__ = [
    "NOT_RUN",
    "IdempotencyCache",
    "IdempotencyStore",
    "Key",
    "Reuse",
    "SingleFlight",
    "StoredStatusError",
    "idempotency_store",
]

# (model, version asked for, request id)
Key = tuple[str, str, str]
T = TypeVar("T")

# Bytes an outcome costs besides its payload (entry, key strings' headers, dict slot):
# counted so that many tiny outcomes are bounded too.
ENTRY_OVERHEAD_BYTES = 256

# Codes that mean the request was not executed: a retry must run it again.
NOT_RUN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


class Reuse(Enum):
    """How a request with an id was answered (the `outcome` label of its metric)."""

    EXECUTED = "executed"
    COALESCED = "coalesced"
    REPLAYED = "replayed"
    # Executed without the shared store, which was unreachable: not coalesced across sidecars.
    BYPASSED = "bypassed"


class StoredStatusError(grpc.RpcError):  # type: ignore[misc]  # grpc ships no types
    """A kept error outcome, replayed with its original code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self._code = code
        self._message = message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


class IdempotencyStore(Protocol):
    """Where requests with an id are coalesced and their outcomes kept."""

    async def run(self, key: Key, execute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, Reuse]:
        """The response for `key` (model, version asked for, request id): a kept outcome, the
        running execution's, or `execute()`'s. An error outcome raises (kept ones as
        StoredStatusError); one that says the request did not run is never kept."""
        ...

    def start(self) -> None:
        """Starts what the store does in the background (on the running loop)."""
        ...

    async def close(self) -> None:
        """Stops the background work and lets go of connections."""
        ...


class SingleFlight(Generic[T]):
    """At most one running call per key; a duplicate awaits the running one's result. The call
    runs in a task of its own, so a caller that leaves (cancel, deadline) does not take the
    result from the others. Runs on one event loop: no locks."""

    def __init__(self) -> None:
        self._running: dict[Key, asyncio.Task[T]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._running

    async def run(self, key: Key, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """`call()`'s result, or the running call's for `key`; True when this caller started
        the call."""
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running), False
        task = asyncio.ensure_future(self._call(key, call))
        task.add_done_callback(_retrieve)
        self._running[key] = task
        return await asyncio.shield(task), True

    async def _call(self, key: Key, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        finally:
            # Before the task ends, so a duplicate arriving after it starts afresh.
            self._running.pop(key, None)


def idempotency_store(
    config: SidecarConfig, metrics: IdempotencyMetrics
) -> IdempotencyStore | None:
    """The store `config` asks for; None when replay is off (`idempotency_ttl_s` 0)."""
    if config.idempotency_ttl_s <= 0:
        return None
    if config.idempotency.backend == "redis":
        # Imported only here: a sidecar with the memory store never loads the Redis client.
        from sidecar.idempotency_redis import RedisIdempotencyStore

        return RedisIdempotencyStore.from_config(
            config.idempotency, ttl_s=config.idempotency_ttl_s, metrics=metrics
        )
    return IdempotencyCache(config.idempotency_ttl_s, config.idempotency_max_bytes, metrics=metrics)


@dataclass(frozen=True, slots=True)
class _Outcome:
    expires_at: float
    size: int
    response: bytes | None
    error: StoredStatusError | None


class IdempotencyCache:
    """Coalesces and replays requests by key. Runs on one event loop: no locks."""

    def __init__(
        self,
        ttl_s: float,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: IdempotencyMetrics | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._done: OrderedDict[Key, _Outcome] = OrderedDict()
        self._running: SingleFlight[bytes] = SingleFlight()
        self.used_bytes = 0
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._done)

    def __contains__(self, key: object) -> bool:
        """Whether an outcome of `key` is kept (expired or not)."""
        return key in self._done

    async def run(self, key: Key, execute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, Reuse]:
        """The response for `key`: replayed, awaited from the running execution, or from
        `execute()`. An error outcome raises (kept ones as StoredStatusError)."""
        kept = self._done.get(key)
        if kept is not None:
            if kept.expires_at > self._clock():
                self._done.move_to_end(key)
                if kept.error is not None:
                    raise kept.error
                assert kept.response is not None
                return kept.response, Reuse.REPLAYED
            self._drop(key)
        response, started = await self._running.run(key, lambda: self._execute(key, execute))
        return response, Reuse.EXECUTED if started else Reuse.COALESCED

    def start(self) -> None:
        """Nothing runs in the background."""

    async def close(self) -> None:
        """Nothing to let go of."""

    async def _execute(self, key: Key, execute: Callable[[], Awaitable[bytes]]) -> bytes:
        try:
            response = await execute()
        except Exception as error:
            code, message = status_of(error)
            if code not in NOT_RUN:
                self._keep(key, None, StoredStatusError(code, message), len(message))
            raise
        self._keep(key, response, None, len(response))
        return response

    def _keep(
        self, key: Key, response: bytes | None, error: StoredStatusError | None, payload: int
    ) -> None:
        size = payload + sum(map(len, key)) + ENTRY_OVERHEAD_BYTES
        if self.ttl_s <= 0:
            return
        if size > self.max_bytes:
            if self._metrics is not None:
                self._metrics.too_large.inc()
            return
        self._drop(key)
        now = self._clock()
        # Expired outcomes at the old end go first, then the least recently used.
        while self._done:
            oldest_key, oldest = next(iter(self._done.items()))
            if oldest.expires_at > now and self.used_bytes + size <= self.max_bytes:
                break
            self._drop(oldest_key)
        self._done[key] = _Outcome(now + self.ttl_s, size, response, error)
        self.used_bytes += size

    def _drop(self, key: Key) -> None:
        gone = self._done.pop(key, None)
        if gone is not None:
            self.used_bytes -= gone.size


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Marks an execution's exception as seen: every caller may have left before it ended."""
    if not task.cancelled():
        task.exception()
