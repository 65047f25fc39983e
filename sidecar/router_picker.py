"""Per-request picks: asking the router's PickTarget for each request (pick_mode per-request).

For heavy requests a router round trip (about a millisecond) is worth a fresher, fleet-wide
choice than the streamed tables give. The router replicas are tried in order; the one that
answered last is asked first next time.

Fail-static: a replica that did not answer is skipped for `skip_unreachable_s`, so while a
router is down (a dead pod's address may take the whole pick timeout to fail) requests do not
each pay for finding that out again; when every replica is being skipped the caller falls back
to its route tables at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import grpc

from pointsman.router.v1 import router_pb2, router_pb2_grpc
from pointsman.tls import TlsConfig, aio_channel

__all__ = ["ROUTER_SERVICE", "RouterPicker", "RouterUnreachableError"]

ROUTER_SERVICE = "pointsman.router.v1.RouterService"

# Codes that mean "this replica did not answer", as opposed to an answer such as NOT_FOUND.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class RouterUnreachableError(Exception):
    """No router replica answered PickTarget; the caller falls back to its route tables."""


class RouterPicker:
    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout_s: float,
        channel_options: Sequence[tuple[str, object]] = (),
        tls: TlsConfig | None = None,
        skip_unreachable_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not addresses:
            raise ValueError("RouterPicker needs at least one router address")
        self._addresses = tuple(addresses)
        self._timeout = timeout_s
        # These channels live on: cap grpc's reconnect backoff (default up to two minutes)
        # so a router that comes back is asked again within about a second.
        self._options = (*channel_options, ("grpc.max_reconnect_backoff_ms", 1000))
        self._tls = tls  # None or empty: plaintext
        self._stubs: dict[str, router_pb2_grpc.RouterServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._channel_of: dict[str, grpc.aio.Channel] = {}
        self._current = 0
        self._skip_s = skip_unreachable_s
        self._clock = clock
        # Replica index -> clock time until which it is not asked (it did not answer).
        self._skipped_until: dict[int, float] = {}

    def _stub(self, address: str) -> router_pb2_grpc.RouterServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(address, self._tls, self._options)
            self._channels.append(channel)
            self._channel_of[address] = channel
            stub = self._stubs[address] = router_pb2_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        return stub

    async def pick(
        self,
        model_name: str,
        model_version: str,
        headers: Mapping[str, str],
        timeout: float | None = None,
        *,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        wait_for_load_ms: int = 0,
        affinity_key: str = "",
    ) -> router_pb2.PickTargetResponse:
        """The router's answer; its own errors (e.g. NOT_FOUND) raise as AioRpcError.

        `metadata` goes with the call (the trace context, when tracing is on);
        `affinity_key` is the request's key for the router's affinity scorers ("": none).

        Raises RouterUnreachableError when no replica answers.
        """
        request = router_pb2.PickTargetRequest(
            model_name=model_name,
            model_version=model_version,
            headers=headers,
            wait_for_load_ms=wait_for_load_ms,
            affinity_key=affinity_key,
        )
        # A cold pick may wait for a load on the router's side: the deadline covers that.
        limit = self._timeout + wait_for_load_ms / 1000
        deadline = limit if timeout is None else min(timeout, limit)
        n = len(self._addresses)
        now = self._clock()
        for k in range(n):
            index = (self._current + k) % n
            if self._skipped_until.get(index, now) > now:
                continue
            try:
                response: router_pb2.PickTargetResponse = await self._stub(
                    self._addresses[index]
                ).PickTarget(request, timeout=deadline, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _UNREACHABLE:
                    raise
                if self._connection_down(self._addresses[index]):
                    self._skipped_until[index] = self._clock() + self._skip_s
                continue
            self._skipped_until.pop(index, None)
            self._current = index
            return response
        raise RouterUnreachableError(
            f"no router answered PickTarget ({', '.join(self._addresses)})"
        )

    def _connection_down(self, address: str) -> bool:
        """True when the replica itself is unreachable (its channel is not connected), as
        opposed to a live router that answered UNAVAILABLE (e.g. nothing can serve)."""
        channel = self._channel_of.get(address)
        if channel is None:
            return True
        state: grpc.ChannelConnectivity = channel.get_state(try_to_connect=False)
        return state is not grpc.ChannelConnectivity.READY

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        self._stubs.clear()
        self._channel_of.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
