"""Channels to the Triton instances, one persistent grpc.aio channel per instance.

An `Upstream` is one Triton instance as the sidecar sees it: its address, its own count of
requests in flight (what the balancer compares), and a channel created on first use. The
`UpstreamPool` hands out one Upstream per address and closes the channels of instances that
have left every route table for a while.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from pointsman.tls import TlsConfig, channel_options

__all__ = ["SERVICE", "Upstream", "UpstreamPool", "method_path"]

SERVICE = "inference.GRPCInferenceService"

Metadata = Sequence[tuple[str, str | bytes]]


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"


_MODEL_INFER = method_path("ModelInfer")
_MODEL_STREAM_INFER = method_path("ModelStreamInfer")


class Upstream:
    """One Triton instance: address, in-flight count and a lazily created channel."""

    __slots__ = (
        "_channel",
        "_clock",
        "_credentials",
        "_options",
        "_unary",
        "address",
        "in_flight",
        "infer",
        "last_used",
        "unreferenced_since",
    )

    def __init__(
        self,
        address: str,
        options: Sequence[tuple[str, Any]],
        clock: Callable[[], float] = time.monotonic,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        # Requests this sidecar has sent to the instance and not yet seen answered.
        self.in_flight = 0
        # Raw-bytes ModelInfer: bytes in, bytes out. The first call opens the channel and
        # puts the real multicallable here, so later calls pay no "is it open" check.
        self.infer: Callable[..., Any] = self._open_and_infer
        self.last_used = clock()
        # Monotonic time since which no route table names this instance; None while one does.
        self.unreferenced_since: float | None = None
        self._options = tuple(options)
        self._clock = clock
        # None: plaintext; else TLS credentials (built once by the pool).
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    def __repr__(self) -> str:
        return f"Upstream({self.address!r}, in_flight={self.in_flight})"

    @property
    def is_open(self) -> bool:
        return self._channel is not None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(self.address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(
                    self.address, self._credentials, options=self._options
                )
            self._channel = channel
            self.infer = channel.unary_unary(
                _MODEL_INFER,
                request_serializer=None,
                response_deserializer=None,
                _registered_method=True,
            )
        return self._channel

    def _open_and_infer(self, request: bytes, **kwargs: Any) -> Any:
        self._open()
        return self.infer(request, **kwargs)

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        """A raw-bytes multicallable for `method` of the inference service."""
        call = self._unary.get(method)
        if call is None:
            call = self._open().unary_unary(
                method_path(method),
                request_serializer=None,
                response_deserializer=None,
                _registered_method=True,
            )
            self._unary[method] = call
        return call

    def open_stream(
        self, *, timeout: float | None, metadata: Metadata
    ) -> grpc.aio.StreamStreamCall[bytes, bytes]:
        """A new raw-bytes ModelStreamInfer call, written to and read from by the caller."""
        multicallable = self._open().stream_stream(
            _MODEL_STREAM_INFER,
            request_serializer=None,
            response_deserializer=None,
            _registered_method=True,
        )
        return multicallable(timeout=timeout, metadata=metadata)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._unary.clear()
        self.infer = self._open_and_infer
        if channel is not None:
            await channel.close(grace=None)


class UpstreamPool:
    """One Upstream per Triton address, shared by every route; reaps unreferenced ones."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        idle_close_s: float,
        clock: Callable[[], float] = time.monotonic,
        tls: TlsConfig | None = None,
    ) -> None:
        self._options: tuple[tuple[str, Any], ...] = (
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # A sidecar talks to its Tritons directly, never through an HTTP proxy.
            ("grpc.enable_http_proxy", 0),
            *channel_options(tls),
        )
        # Read once at start-up: a missing file fails the start, not the first request.
        self._credentials = tls.channel_credentials() if tls is not None and tls.enabled else None
        self._idle_close_s = idle_close_s
        self._clock = clock
        self._upstreams: dict[str, Upstream] = {}

    def __len__(self) -> int:
        return len(self._upstreams)

    def __contains__(self, address: str) -> bool:
        return address in self._upstreams

    def upstreams(self) -> list[Upstream]:
        """Every upstream now in the pool (a copy: safe to read from another thread)."""
        return list(self._upstreams.values())

    def get(self, address: str) -> Upstream:
        """The Upstream for `address`, created if new (its channel opens on first use)."""
        now = self._clock()
        upstream = self._upstreams.get(address)
        if upstream is None:
            upstream = Upstream(address, self._options, self._clock, self._credentials)
            # Not in a table until `retain` says so (e.g. a per-request pick).
            upstream.unreferenced_since = now
            self._upstreams[address] = upstream
        upstream.last_used = now
        return upstream

    def retain(self, referenced: Iterable[str]) -> None:
        """Marks which addresses the route tables name now; the others start to age."""
        keep = set(referenced)
        now = self._clock()
        for address, upstream in self._upstreams.items():
            if address in keep:
                upstream.unreferenced_since = None
            elif upstream.unreferenced_since is None:
                upstream.unreferenced_since = now

    async def reap(self) -> list[str]:
        """Closes the upstreams unreferenced and unused for idle_close_s; their addresses."""
        now = self._clock()
        gone: list[Upstream] = []
        for upstream in self._upstreams.values():
            since = upstream.unreferenced_since
            if (
                since is not None
                and upstream.in_flight == 0
                and now - max(since, upstream.last_used) >= self._idle_close_s
            ):
                gone.append(upstream)
        for upstream in gone:
            del self._upstreams[upstream.address]
        await asyncio.gather(*(u.close() for u in gone), return_exceptions=True)
        return [u.address for u in gone]

    async def close(self) -> None:
        upstreams = list(self._upstreams.values())
        self._upstreams.clear()
        await asyncio.gather(*(u.close() for u in upstreams), return_exceptions=True)
