"""Keeping the route tables current: the `RouterService.WatchRoutes` stream, for ever.

`RouterWatch` keeps one stream open at a time, trying each router address in turn with
jittered backoff, and feeds every message to a `RouteCache` (sidecar.routes), which keeps its
last tables, marked stale, while no router answers. `RouteSource` is the swap point: tests
feed a cache from anything with a `run(cache)`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import grpc

from pointsman.router.v1 import router_pb2, router_pb2_grpc
from pointsman.tls import TlsConfig, aio_channel
from sidecar.routes import RouteCache

__all__ = ["RouteSource", "RouterWatch"]

log = logging.getLogger(__name__)


class RouteSource(Protocol):
    """Whatever feeds a RouteCache: runs until cancelled (the swap point for tests)."""

    async def run(self, cache: RouteCache) -> None: ...


class RouterWatch:
    """Feeds a RouteCache from RouterService.WatchRoutes, reconnecting for ever.

    Each attempt opens a stream to the next router address. A stream that breaks, ends, or
    stays silent for `idle_timeout_s` is dropped and the next address tried after a delay drawn
    uniformly from [0, ceiling] (full jitter, so sidecars that lost the same router do not
    return in step); the ceiling doubles per consecutive failure from `initial_backoff_s` up to
    `max_backoff_s`, and starts again once a stream has delivered a message.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        client_id: str,
        models: Iterable[str] = (),
        initial_backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        idle_timeout_s: float = 30.0,
        rng: random.Random | None = None,
        channel_options: Sequence[tuple[str, object]] = (),
        sleep: Callable[[float], object] = asyncio.sleep,
        tls: TlsConfig | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("RouterWatch needs at least one router address")
        self.addresses = tuple(addresses)
        self._request = router_pb2.WatchRoutesRequest(client_id=client_id, model_names=models)
        self._initial = initial_backoff_s
        self._max = max_backoff_s
        self._idle_timeout = idle_timeout_s
        self._rng = rng or random.Random()
        # Each attempt gets a channel with its own subchannel: in grpc's shared pool the
        # subchannel of a router that was down keeps its own reconnect backoff (up to two
        # minutes), and a new channel would fail at once until it ends, long after the router
        # is back. The sidecar's own backoff (above) paces the attempts instead.
        self._options = (*channel_options, ("grpc.use_local_subchannel_pool", 1))
        self._sleep = sleep
        self._tls = tls  # None or empty: plaintext
        # For tests and status: how many streams have been opened and have delivered.
        self.attempts = 0
        self.streams_with_messages = 0

    async def run(self, cache: RouteCache) -> None:
        index = 0
        failures = 0
        while True:
            address = self.addresses[index]
            delivered = False
            try:
                delivered = await self._watch(address, cache)
                log.info("route stream from %s ended", address)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                log.warning(
                    "route stream from %s failed: %s %s", address, error.code(), error.details()
                )
            except TimeoutError:
                log.warning("route stream from %s silent for %.1fs", address, self._idle_timeout)
            except Exception:  # never let the watcher die: the sidecar would route blind
                log.exception("route stream from %s broke", address)
            finally:
                cache.set_connected(False)
            failures = 0 if delivered else failures + 1
            index = (index + 1) % len(self.addresses)
            ceiling = min(self._max, self._initial * (2 ** min(failures, 30)))
            delay = self._rng.uniform(0.0, ceiling)
            await self._sleep(delay)  # type: ignore[misc]

    async def _watch(self, address: str, cache: RouteCache) -> bool:
        """Reads one stream until it ends; True if it delivered at least one message."""
        self.attempts += 1
        delivered = False
        async with aio_channel(address, self._tls, self._options) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.WatchRoutes(self._request)
            try:
                while True:
                    # asyncio.timeout: wait_for can swallow a racing cancel on 3.11.
                    async with asyncio.timeout(self._idle_timeout):
                        message = await call.read()
                    if message is grpc.aio.EOF:
                        return delivered
                    cache.apply(message)
                    cache.set_connected(True)
                    if not delivered:
                        delivered = True
                        self.streams_with_messages += 1
                        log.info(
                            "route stream from %s: router %s, generation %d, %d models",
                            address,
                            cache.router_id,
                            cache.generation,
                            len(cache.routes),
                        )
            finally:
                call.cancel()
