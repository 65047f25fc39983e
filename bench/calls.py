"""The calls the load generator makes: raw-bytes Triton gRPC, unary and streaming.

`TritonCalls(channel)` makes `ModelInfer` and `ModelStreamInfer` calls with per-request
metadata (`x-priority`, `x-request-id`, ...) over one grpc.aio channel, sending bytes built
once (`infer_request_bytes`, `codegen_request`), so the generator spends no time on protobuf
per request. A streaming call returns the clock time of each response, from which the
generator takes the time to first token and the inter-token gaps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.grpc import service_pb2 as triton_pb

from bench.loadgen import Call, Responses

__all__ = [
    "INFER_METHOD",
    "PROMPTS",
    "STREAM_METHOD",
    "Metadata",
    "StreamError",
    "TritonCalls",
    "closing",
    "codegen_inputs",
    "codegen_request",
    "infer_request_bytes",
]

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
PROMPTS = (
    "def fibonacci(n):",
    "class LRUCache:",
    "async def fetch(url):",
    "def parse_args(argv):",
    "def quicksort(items):",
    "SELECT name FROM users WHERE",
    "func main() {",
    "fn binary_search(v: &[i32], x: i32)",
)

Metadata = tuple[tuple[str, str], ...]


def codegen_inputs(prompt: str, max_tokens: int) -> list[InferInput]:
    """The inputs of `codegen` and `codegen_stream`: PROMPT BYTES[1,1], MAX_TOKENS INT32[1,1]."""
    prompt_input = InferInput("PROMPT", [1, 1], "BYTES")
    prompt_input.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    tokens_input = InferInput("MAX_TOKENS", [1, 1], "INT32")
    tokens_input.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [prompt_input, tokens_input]


def infer_request_bytes(
    model: str,
    inputs: Sequence[InferInput],
    outputs: Sequence[str] = (),
    version: str = "",
    request_id: str = "",
) -> bytes:
    """A serialised ModelInferRequest with the tensors as raw contents, as tritonclient sends."""
    request = triton_pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for tensor in inputs:
        request.inputs.add().CopyFrom(tensor._get_tensor())
        content = tensor._get_content()
        if content is not None:
            request.raw_input_contents.append(content)
    for name in outputs:
        request.outputs.add(name=name)
    data: bytes = request.SerializeToString()
    return data


def codegen_request(
    prompt: str, max_tokens: int, *, model: str = "codegen", request_id: str = ""
) -> bytes:
    """A serialised request for `codegen` (or a copy of it, or `codegen_stream`)."""
    return infer_request_bytes(model, codegen_inputs(prompt, max_tokens), request_id=request_id)


class StreamError(Exception):
    """A ModelStreamInfer response carried an error message, or the stream ended early."""


@contextlib.asynccontextmanager
async def closing(channels: Mapping[str, grpc.aio.Channel]) -> AsyncIterator[None]:
    """Closes every channel of `channels` (which may still grow inside) on the way out."""
    try:
        yield
    finally:
        for channel in channels.values():
            await channel.close()


class TritonCalls:
    """Unary and streaming Triton calls over one channel (a sidecar, or a Triton directly)."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._infer = channel.unary_unary(
            INFER_METHOD, request_serializer=None, response_deserializer=None
        )
        self._open_stream = channel.stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=None
        )

    def unary(self, body: bytes, metadata: Metadata = ()) -> Call:
        """A ModelInfer call; a reply with an error raises AioRpcError."""

        async def call() -> Responses:
            await self._infer(body, timeout=self.timeout_s, metadata=metadata or None)
            return None

        return call

    def call(self, body: bytes, tokens: int | None = None, metadata: Metadata = ()) -> Call:
        """`unary` when `tokens` is None, else `stream` reading `tokens` responses (what a
        bench.testbed.Sender makes)."""
        if tokens is None:
            return self.unary(body, metadata)
        return self.stream(body, tokens, metadata)

    def stream(self, body: bytes, responses: int, metadata: Metadata = ()) -> Call:
        """A ModelStreamInfer call: send one request, read `responses` answers (a decoupled
        model's token count), close the stream; returns each answer's clock time."""

        async def call() -> Responses:
            stream = self._open_stream(timeout=self.timeout_s, metadata=metadata or None)
            times: list[float] = []
            try:
                await stream.write(body)
                for _ in range(responses):
                    reply = await stream.read()
                    if reply is grpc.aio.EOF:
                        raise StreamError("stream ended before every response came")
                    times.append(time.perf_counter())
                    answer = triton_pb.ModelStreamInferResponse.FromString(reply)
                    if answer.error_message:
                        raise StreamError(answer.error_message)
                await stream.done_writing()
            finally:
                stream.cancel()
            return times

        return call
