"""RouterService registered so that a request that does not parse gets INVALID_ARGUMENT.

grpc's generated `add_RouterServiceServicer_to_server` hands request bytes to protobuf's
parser inside grpc itself, and a parse error leaves as UNKNOWN "Unexpected DecodeError" (found
by tests/test_fuzz.py). Here every method takes raw bytes and parses them itself, so malformed
input is the caller's error, named as such, and the servicer's code is unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from pointsman.router.v1 import router_pb2

__all__ = ["SERVICE_NAME", "add_router_service", "parse_request"]

SERVICE_NAME = "pointsman.router.v1.RouterService"


async def parse_request(
    message_class: type[Message], data: bytes, context: grpc.aio.ServicerContext
) -> Message:
    """The parsed request; aborts the call with INVALID_ARGUMENT when the bytes do not parse."""
    try:
        return message_class.FromString(data)
    except DecodeError as error:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request is not a valid {message_class.DESCRIPTOR.full_name}: {error}",
        )
        raise AssertionError("unreachable: context.abort raises") from None  # pragma: no cover


def _unary(
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], request_class: type[Message]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await method(await parse_request(request_class, data, context), context)

    return handler


def _server_stream(
    method: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    request_class: type[Message],
) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request = await parse_request(request_class, data, context)
        async for response in method(request, context):
            yield response

    return handler


def add_router_service(servicer: object, server: grpc.aio.Server) -> None:
    """Registers every RouterService method of `servicer` on `server` (see module doc)."""
    service = router_pb2.DESCRIPTOR.services_by_name["RouterService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming:  # none today; each would need its own wrapper
            raise NotImplementedError(f"{method.name}: client streaming is not wrapped")
        request_class = getattr(router_pb2, method.input_type.name)
        serialize = getattr(router_pb2, method.output_type.name).SerializeToString
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(implementation, request_class), response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(implementation, request_class), response_serializer=serialize
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
