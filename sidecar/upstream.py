"""The channels to the Triton instances, behind one small protocol.

`Upstream` is what the sidecar needs of one Triton instance: its address, this sidecar's count
of requests in flight there (what the balancer compares), raw-bytes ModelInfer, the other unary
methods, and ModelStreamInfer. `GrpcUpstream` is the real one: a persistent grpc.aio channel,
opened on first use. The `UpstreamPool` hands out one per address, made by its `connect`
function: the swap point, as a transport is in httpx (`sidecar.testing.MockTransport` answers
from memory, so the request path has fast unit tests), and closes the upstreams of instances
that have left every route table for a while.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import grpc

from pointsman.tls import TlsConfig, channel_options

__all__ = [
    "SERVICE",
    "Connect",
    "GrpcUpstream",
    "Metadata",
    "StreamCall",
    "UnaryCall",
    "Upstream",
    "UpstreamPool",
    "grpc_connect",
    "method_path",
]

SERVICE = "inference.GRPCInferenceService"

Metadata = Sequence[tuple[str, str | bytes]]


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"


_MODEL_INFER = method_path("ModelInfer")
_MODEL_STREAM_INFER = method_path("ModelStreamInfer")


class UnaryCall(Protocol):
    """One raw-bytes unary method of an instance: request bytes in, response bytes out;
    Triton's errors raise as grpc.aio.AioRpcError."""

    def __call__(
        self, request: bytes, *, timeout: float | None, metadata: Metadata
    ) -> Awaitable[bytes]: ...


class StreamCall(Protocol):
    """An open ModelStreamInfer call (what grpc.aio.StreamStreamCall offers the sidecar)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def write(self, message: bytes) -> None: ...

    async def done_writing(self) -> None: ...

    def cancel(self) -> bool: ...


class Upstream(Protocol):
    """One Triton instance as the request path sees it."""

    address: str
    # Requests this sidecar has sent to the instance and not yet seen answered.
    in_flight: int

    @property
    def infer(self) -> UnaryCall:
        """ModelInfer (the hot path: an attribute, so a call costs no extra lookup)."""
        ...

    def unary(self, method: str) -> UnaryCall:
        """Any other unary method of the inference service, by name."""
        ...

    def open_stream(self, *, timeout: float | None, metadata: Metadata) -> StreamCall: ...

    async def close(self) -> None: ...


Connect = Callable[[str], Upstream]


class GrpcUpstream:
    """A Triton instance over a grpc.aio channel, created on first use."""

    __slots__ = ("_channel", "_credentials", "_options", "_unary", "address", "in_flight", "infer")

    def __init__(
        self,
        address: str,
        options: Sequence[tuple[str, Any]],
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.in_flight = 0
        # The first call opens the channel and puts the real multicallable here, so later
        # calls pay no "is it open" check.
        self.infer: UnaryCall = self._open_and_infer
        self._options = tuple(options)
        # None: plaintext; else TLS credentials (built once by `grpc_connect`).
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._unary: dict[str, UnaryCall] = {}

    def __repr__(self) -> str:
        return f"GrpcUpstream({self.address!r}, in_flight={self.in_flight})"

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

    def _open_and_infer(
        self, request: bytes, *, timeout: float | None, metadata: Metadata
    ) -> Awaitable[bytes]:
        self._open()
        return self.infer(request, timeout=timeout, metadata=metadata)

    def unary(self, method: str) -> UnaryCall:
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

    def open_stream(self, *, timeout: float | None, metadata: Metadata) -> StreamCall:
        multicallable = self._open().stream_stream(
            _MODEL_STREAM_INFER,
            request_serializer=None,
            response_deserializer=None,
            _registered_method=True,
        )
        call: StreamCall = multicallable(timeout=timeout, metadata=metadata)
        return call

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._unary.clear()
        self.infer = self._open_and_infer
        if channel is not None:
            await channel.close(grace=None)


def grpc_connect(max_message_bytes: int, tls: TlsConfig | None = None) -> Connect:
    """Makes GrpcUpstreams: message limits as configured, TLS credentials read once (a
    missing file fails the start, not the first request)."""
    options: tuple[tuple[str, Any], ...] = (
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A sidecar talks to its Tritons directly, never through an HTTP proxy.
        ("grpc.enable_http_proxy", 0),
        *channel_options(tls),
    )
    credentials = tls.channel_credentials() if tls is not None and tls.enabled else None

    def connect(address: str) -> Upstream:
        return GrpcUpstream(address, options, credentials)

    return connect


class UpstreamPool:
    """One Upstream per Triton address, shared by every route; reaps unreferenced ones."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        idle_close_s: float,
        clock: Callable[[], float] = time.monotonic,
        tls: TlsConfig | None = None,
        connect: Connect | None = None,
    ) -> None:
        self._connect = connect or grpc_connect(max_message_bytes, tls)
        self._idle_close_s = idle_close_s
        self._clock = clock
        self._upstreams: dict[str, Upstream] = {}
        self._last_used: dict[str, float] = {}
        # Since when no route table names the address; absent while one does.
        self._unreferenced_since: dict[str, float] = {}

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
            upstream = self._upstreams[address] = self._connect(address)
            # Not in a table until `retain` says so (e.g. a per-request pick).
            self._unreferenced_since[address] = now
        self._last_used[address] = now
        return upstream

    def unreferenced_since(self, address: str) -> float | None:
        """Since when no route table names `address`; None while one does."""
        return self._unreferenced_since.get(address)

    def retain(self, referenced: Iterable[str]) -> None:
        """Marks which addresses the route tables name now; the others start to age."""
        keep = set(referenced)
        now = self._clock()
        for address in self._upstreams:
            if address in keep:
                self._unreferenced_since.pop(address, None)
            else:
                self._unreferenced_since.setdefault(address, now)

    async def reap(self) -> list[str]:
        """Closes the upstreams unreferenced and unused for idle_close_s; their addresses."""
        now = self._clock()
        gone = [
            upstream
            for address, upstream in self._upstreams.items()
            if address in self._unreferenced_since
            and upstream.in_flight == 0
            and now - max(self._unreferenced_since[address], self._last_used[address])
            >= self._idle_close_s
        ]
        for upstream in gone:
            del self._upstreams[upstream.address]
            del self._unreferenced_since[upstream.address]
            del self._last_used[upstream.address]
        await asyncio.gather(*(u.close() for u in gone), return_exceptions=True)
        return [u.address for u in gone]

    async def close(self) -> None:
        upstreams = list(self._upstreams.values())
        self._upstreams.clear()
        self._unreferenced_since.clear()
        self._last_used.clear()
        await asyncio.gather(*(u.close() for u in upstreams), return_exceptions=True)
