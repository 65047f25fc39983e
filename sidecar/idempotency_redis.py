"""Idempotency shared by every sidecar: `IdempotencyStore` kept in Redis.

The rules of `sidecar.idempotency` hold across sidecars: a duplicate sent through another pod's
sidecar runs once. One request id is one Redis key, `{prefix}{sha256 of (model, version, id)}`
(a 10 KiB id is a 64-character key), in one of three states:

    absent  --ACQUIRE--------> running   SET with a lease (PX lease_s), renewed by its executor
    running --FINISH---------> outcome   SET with PX ttl_s; every waiting sidecar is told
    running --FINISH (free)--> absent    not run, or too large to keep; waiters are told
    running --lease expires--> absent    its sidecar died (or lost Redis) before the end

Each transition is one Lua script, so it is atomic. ACQUIRE answers in one round trip: the
kept outcome (replayed), None (this sidecar now runs it), or "running": then the sidecar's
channel is added to the key's waiter set in the same script, and the sidecar waits for a
message on it (one pub/sub subscription per sidecar), looking again every `poll_interval_s`
in case a message was lost. Whenever it looks it runs ACQUIRE again, so a key freed by a
"not run" answer, a too large outcome or an expired lease is taken by exactly one waiter,
which runs the request itself. While the lease is alive nobody else runs it; once it has
expired a waiter may, so an execution still running on a sidecar cut off from Redis for
longer than the lease can be duplicated.

Within one sidecar duplicates are coalesced before Redis (`SingleFlight`): one Redis
conversation per key per sidecar, and coalescing within a sidecar even while Redis is down.

Redis down: every call has `timeout_s`. A failed call marks the store down (logged once,
`store_up` 0, counted by operation) and the request runs without it (`Reuse.BYPASSED`); until
a probe every `retry_interval_s` finds Redis back, requests do not call it at all, so a dead
Redis costs one timeout per outage, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pointsman.errors import status_of
from sidecar.config import IdempotencyConfig
from sidecar.idempotency import (
    NOT_RUN,
    Key,
    Reuse,
    SingleFlight,
    StoredStatusError,
)
from sidecar.metrics import IdempotencyMetrics

__all__ = ["RedisIdempotencyStore", "redacted"]

log = logging.getLogger(__name__)

# The first byte of a key's value says its state.
_RUNNING = b"R"
_RESPONSE = b"O"
_ERROR = b"E"

# KEYS: state, waiters. ARGV: running value, lease ms, this sidecar's channel.
# -> false (now held by the caller), "R" (running elsewhere; caller registered), or the outcome.
_ACQUIRE = """
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
if string.sub(value, 1, 1) == 'R' then
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 'R'
end
return value
"""

# KEYS: state, waiters. ARGV: running value, outcome ("" frees the key), ttl ms.
# An outcome is kept where the key is still ours or has expired; a key another sidecar took
# over (its lease ran out) is left alone. -> 1 if the key was still ours.
_FINISH = """
local value = redis.call('GET', KEYS[1])
local mine = value == ARGV[1]
if ARGV[2] == '' then
  if not mine then return 0 end
  redis.call('DEL', KEYS[1])
elseif mine or not value then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  return 0
end
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('PUBLISH', channel, KEYS[1])
end
redis.call('DEL', KEYS[2])
if mine then return 1 end
return 0
"""

# KEYS: state, waiters. ARGV: running value, lease ms. -> 1 if still ours (lease extended).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


class _StoreDown(Exception):
    """A store call failed; the store is marked down and the request runs without it."""


def redacted(url: str) -> str:
    """`url` without its credentials, for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class RedisIdempotencyStore:
    """Coalesces and replays requests by key across every sidecar sharing one Redis."""

    def __init__(
        self,
        redis: Redis,
        listener: Redis,
        *,
        ttl_s: float,
        metrics: IdempotencyMetrics,
        config: IdempotencyConfig,
    ) -> None:
        """`redis` runs the scripts (its timeouts short); `listener` holds the one pub/sub
        subscription (no read timeout: it waits for messages)."""
        self._redis = redis
        self._listener = listener
        self._metrics = metrics
        self._where = redacted(config.url)
        self._prefix = config.key_prefix
        self._ttl_ms = str(max(1, round(ttl_s * 1000)))
        self._lease_ms = str(max(1, round(config.lease_s * 1000)))
        self._renew_every_s = config.lease_s / 3
        self._max_value_bytes = config.max_value_bytes
        self._poll_s = config.poll_interval_s
        self._timeout_s = config.timeout_s
        self._retry_s = config.retry_interval_s
        self._acquire = redis.register_script(_ACQUIRE)
        self._finish = redis.register_script(_FINISH)
        self._renew = redis.register_script(_RENEW)
        sidecar_id = uuid.uuid4().hex
        self._channel = f"{self._prefix}waiters:{sidecar_id}"
        self._tokens = (f"{sidecar_id}:{n}".encode() for n in itertools.count())
        self._flights: SingleFlight[tuple[bytes, Reuse]] = SingleFlight()
        # State key -> the event its local waiter sleeps on (one per key: SingleFlight).
        self._waiting: dict[str, asyncio.Event] = {}
        self._up = True
        self._down_since = 0.0
        self._listening: asyncio.Task[None] | None = None
        self._probing: asyncio.Task[None] | None = None
        metrics.store_up = True

    @classmethod
    def from_config(
        cls, config: IdempotencyConfig, *, ttl_s: float, metrics: IdempotencyMetrics
    ) -> RedisIdempotencyStore:
        def client(read_timeout_s: float | None) -> Redis:
            return Redis.from_url(
                config.url,
                socket_connect_timeout=config.timeout_s,
                socket_timeout=read_timeout_s,
                retry=Retry(NoBackoff(), 0),  # a failed call marks the store down instead
                client_name="pointsman-sidecar",
            )

        return cls(
            client(config.timeout_s), client(None), ttl_s=ttl_s, metrics=metrics, config=config
        )

    @property
    def up(self) -> bool:
        """False while Redis is unreachable and requests run without it."""
        return self._up

    def state_key(self, key: Key) -> str:
        """The Redis key of `key`: namespaced, and hashed so its length is fixed."""
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        return f"{self._prefix}{{{digest}}}"

    def start(self) -> None:
        """Subscribes to this sidecar's channel (and keeps it subscribed)."""
        if self._listening is None:
            self._listening = asyncio.ensure_future(self._listen())

    async def close(self) -> None:
        for task in (self._listening, self._probing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._redis.aclose()
        await self._listener.aclose()

    async def run(self, key: Key, execute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, Reuse]:
        """The response for `key`: replayed, awaited from the execution running here or on
        another sidecar, or from `execute()`. An error outcome raises (kept ones as
        StoredStatusError)."""
        self.start()
        (response, reuse), started = await self._flights.run(
            key, lambda: self._resolve(key, execute)
        )
        if not started and reuse is not Reuse.REPLAYED:
            reuse = Reuse.COALESCED  # it waited on this sidecar's own execution
        return response, reuse

    async def _resolve(
        self, key: Key, execute: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, Reuse]:
        if not self._up:
            return await execute(), Reuse.BYPASSED
        state = self.state_key(key)
        running = _RUNNING + next(self._tokens)
        try:
            value, waited = await self._outcome_or_turn(state, running)
        except _StoreDown:
            return await execute(), Reuse.BYPASSED
        if value is None:
            if waited:
                self._metrics.takeovers.inc()
            return await self._execute(state, running, execute), Reuse.EXECUTED
        kind, payload = value[:1], value[1:]
        if kind == _RESPONSE:
            return payload, Reuse.COALESCED if waited else Reuse.REPLAYED
        if kind == _ERROR:
            raise _stored_error(payload)
        log.debug("%s holds no value of this store; running the request without it", state)
        return await execute(), Reuse.BYPASSED

    async def _outcome_or_turn(self, state: str, running: bytes) -> tuple[bytes | None, bool]:
        """(the kept outcome of `state`, or None once this sidecar holds it), and whether it
        waited for another sidecar's execution first."""
        woken = self._waiting[state] = asyncio.Event()
        waited = False
        try:
            while True:
                if not self._up:
                    raise _StoreDown  # it went down while this one waited
                value = await self._call(
                    "acquire",
                    self._acquire(keys=[state, _waiters(state)],
                                  args=[running, self._lease_ms, self._channel]),
                )  # fmt: skip
                if value != _RUNNING:
                    return value, waited
                waited = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_s):
                        await woken.wait()
                woken.clear()  # before ACQUIRE: a message during it wakes the next wait
        finally:
            del self._waiting[state]

    async def _execute(
        self, state: str, running: bytes, execute: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """Runs the request under this sidecar's lease, then keeps or frees the key."""
        renewal = asyncio.ensure_future(self._keep_lease(state, running))
        try:
            response = await execute()
        except Exception as error:
            code, message = status_of(error)
            kept = None if code in NOT_RUN else _ERROR + f"{code.name} {message}".encode()
            await self._end(state, running, kept)
            raise
        finally:
            renewal.cancel()  # cancelled (shutdown) too: then the lease expires by itself
        await self._end(state, running, _RESPONSE + response)
        return response

    async def _end(self, state: str, running: bytes, outcome: bytes | None) -> None:
        """Keeps `outcome` for the TTL, or frees the key (None: not run; or too large)."""
        if outcome is not None and len(outcome) > self._max_value_bytes:
            self._metrics.too_large.inc()
            outcome = None
        if not self._up:
            return  # the lease expires by itself
        with contextlib.suppress(_StoreDown):
            await self._call(
                "finish",
                self._finish(keys=[state, _waiters(state)],
                             args=[running, outcome or b"", self._ttl_ms]),
            )  # fmt: skip

    async def _keep_lease(self, state: str, running: bytes) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            if not self._up:
                continue
            with contextlib.suppress(_StoreDown):
                held = await self._call(
                    "renew",
                    self._renew(keys=[state, _waiters(state)], args=[running, self._lease_ms]),
                )
                if not held:
                    log.debug("lost the lease of %s: it expired and was taken over", state)
                    return

    # -- Redis down and back -------------------------------------------------------------------

    async def _call(self, operation: str, call: Awaitable[Any]) -> Any:
        """`call`'s answer within the timeout; a failure marks the store down (_StoreDown)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except (RedisError, OSError) as error:  # TimeoutError is an OSError
            self._metrics.store_error(operation)
            self._mark_down(error)
            raise _StoreDown from error

    def _mark_down(self, error: BaseException) -> None:
        if not self._up:
            return
        self._up = False
        self._metrics.store_up = False
        self._down_since = asyncio.get_running_loop().time()
        log.warning(
            "idempotency store %s unreachable (%s): requests with an id run without "
            "coalescing across sidecars until it is back",
            self._where, _describe(error),
        )  # fmt: skip
        self._probing = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        """Pings Redis every `retry_interval_s` until it answers, then marks the store up."""
        while True:
            await asyncio.sleep(self._retry_s)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._redis.ping()
            except (RedisError, OSError):
                self._metrics.store_error("probe")
                continue
            self._up = True
            self._metrics.store_up = True
            down_s = asyncio.get_running_loop().time() - self._down_since
            log.warning("idempotency store %s is back after %.1fs", self._where, down_s)
            for woken in self._waiting.values():
                woken.set()
            return

    async def _listen(self) -> None:
        """Keeps this sidecar's channel subscribed and wakes the waiter a message names;
        after a reconnect wakes them all (messages may have been missed meanwhile)."""
        while True:
            pubsub = self._listener.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":  # (re)subscribed: every waiter looks
                        for woken in self._waiting.values():
                            woken.set()
                    elif message["type"] == "message":
                        waiter = self._waiting.get(message["data"].decode())
                        if waiter is not None:
                            waiter.set()
            except (RedisError, OSError) as error:
                self._metrics.store_error("subscribe")
                log.debug("idempotency store subscription lost: %s", _describe(error))
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(self._retry_s)


def _waiters(state: str) -> str:
    return f"{state}:waiters"


def _stored_error(payload: bytes) -> StoredStatusError:
    name, _, message = payload.decode("utf-8", "replace").partition(" ")
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    return StoredStatusError(code, message)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
