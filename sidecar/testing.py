"""In-memory stand-ins for the sidecar's I/O, for fast tests and benchmarks of the request path.

`MockTransport` is to the sidecar what httpx's MockTransport is to httpx: one handler function
answers every call to every Triton address, or raises, so failover, admission, deadlines and
shedding run without a Triton (their proofs on real Tritons stay in the tests beside them):

    def triton(call: MockCall) -> bytes:
        if call.address == "10.0.0.1:8001":
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
        return RESPONSE

    transport = MockTransport(triton)
    pool = UpstreamPool(max_message_bytes=1 << 20, idle_close_s=60, connect=transport)
    # or: await start_sidecar(config, connect=transport)

The handler may be a coroutine function (to hold a call, e.g. on an asyncio.Event). A stream
calls it once per message the sidecar writes (method "ModelStreamInfer"), and sends back
what it returns as one response. `MockContext` is a ServicerContext for calling the handlers
directly: its metadata, a deadline on an injected clock, and `abort` raising `MockAbort`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from sidecar.upstream import Metadata, StreamCall, UnaryCall, Upstream

__all__ = [
    "MockAbort",
    "MockCall",
    "MockContext",
    "MockTransport",
    "MockUpstream",
    "rpc_error",
]


@dataclass(frozen=True)
class MockCall:
    """One call as an instance received it."""

    address: str
    method: str  # "ModelInfer", "ModelReady", ..., "ModelStreamInfer" (one per message)
    request: bytes
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...]


Handler = Callable[[MockCall], bytes | Awaitable[bytes]]


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    """The error a grpc.aio call raises when the instance answers (code, details)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class MockTransport:
    """Makes MockUpstreams (pass it as `connect`); `calls` records every call, in order."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls: list[MockCall] = []

    def __call__(self, address: str) -> Upstream:
        return MockUpstream(self, address)

    async def answer(self, call: MockCall) -> bytes:
        self.calls.append(call)
        answer = self.handler(call)
        return await answer if inspect.isawaitable(answer) else answer


class MockUpstream:
    """An Upstream whose calls the transport's handler answers."""

    def __init__(self, transport: MockTransport, address: str) -> None:
        self.address = address
        self.in_flight = 0
        self._transport = transport
        self.infer: UnaryCall = self.unary("ModelInfer")

    def unary(self, method: str) -> UnaryCall:
        async def call(request: bytes, *, timeout: float | None, metadata: Metadata) -> bytes:
            return await self._transport.answer(
                MockCall(self.address, method, request, timeout, tuple(metadata))
            )

        return call

    def open_stream(self, *, timeout: float | None, metadata: Metadata) -> StreamCall:
        return _MockStream(self._transport, self.address, timeout, tuple(metadata))

    async def close(self) -> None:
        return None


class _MockStream:
    """A ModelStreamInfer call: one response per message written, in order."""

    def __init__(
        self,
        transport: MockTransport,
        address: str,
        timeout: float | None,
        metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self._transport = transport
        self._call = (address, timeout, metadata)
        self._messages: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._cancelled = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[bytes]:
        address, timeout, metadata = self._call
        while (message := await self._messages.get()) is not None:
            yield await self._transport.answer(
                MockCall(address, "ModelStreamInfer", message, timeout, metadata)
            )

    async def write(self, message: bytes) -> None:
        if self._cancelled:
            raise rpc_error(grpc.StatusCode.CANCELLED, "the stream was cancelled")
        self._messages.put_nowait(message)

    async def done_writing(self) -> None:
        self._messages.put_nowait(None)

    def cancel(self) -> bool:
        if self._cancelled:
            return False
        self._cancelled = True
        self._messages.put_nowait(None)
        return True


class MockAbort(Exception):
    """What `MockContext.abort` raises: the status the handler ended the call with."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[Any]
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


class MockContext:
    """The grpc.aio.ServicerContext of one call, for calling the handlers directly."""

    def __init__(
        self,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        *,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metadata = tuple(metadata)
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        # What a stream handler wrote to the caller.
        self.written: list[bytes] = []

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - self._clock()

    async def write(self, message: bytes) -> None:
        self.written.append(message)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> None:
        raise MockAbort(code, details, trailing_metadata)
