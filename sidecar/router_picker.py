"""Per-request picks: asking the router's PickTarget for each request (pick_mode per-request).

For heavy requests a router round trip (about a millisecond) is worth a fresher, fleet-wide
choice than the streamed tables give. The router replicas are tried in order; the one that
answered last is asked first next time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

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
    ) -> None:
        if not addresses:
            raise ValueError("RouterPicker needs at least one router address")
        self._addresses = tuple(addresses)
        self._timeout = timeout_s
        self._options = tuple(channel_options)
        self._tls = tls  # None or empty: plaintext
        self._stubs: dict[str, router_pb2_grpc.RouterServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._current = 0

    def _stub(self, address: str) -> router_pb2_grpc.RouterServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(address, self._tls, self._options)
            self._channels.append(channel)
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
    ) -> router_pb2.PickTargetResponse:
        """The router's answer; its own errors (e.g. NOT_FOUND) raise as AioRpcError.

        `metadata` goes with the call (the trace context, when tracing is on).

        Raises RouterUnreachableError when no replica answers.
        """
        request = router_pb2.PickTargetRequest(
            model_name=model_name,
            model_version=model_version,
            headers=headers,
            wait_for_load_ms=wait_for_load_ms,
        )
        # A cold pick may wait for a load on the router's side: the deadline covers that.
        limit = self._timeout + wait_for_load_ms / 1000
        deadline = limit if timeout is None else min(timeout, limit)
        n = len(self._addresses)
        for k in range(n):
            index = (self._current + k) % n
            try:
                response: router_pb2.PickTargetResponse = await self._stub(
                    self._addresses[index]
                ).PickTarget(request, timeout=deadline, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _UNREACHABLE:
                    raise
                continue
            self._current = index
            return response
        raise RouterUnreachableError(
            f"no router answered PickTarget ({', '.join(self._addresses)})"
        )

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
