"""A closed-loop code-generation workload against any Triton gRPC address.

N concurrent clients each send one request at a time, unary `codegen` or streaming
`codegen_stream` in a given mix, through stock `tritonclient.grpc.aio`, and record every
request's latency and status. Percentiles come from the full record, never from averages.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

__all__ = [
    "PROMPTS",
    "RequestRecord",
    "WorkloadMix",
    "codegen_inputs",
    "percentile",
    "run_closed_loop",
]

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


@dataclass(frozen=True, slots=True)
class RequestRecord:
    model: str
    streaming: bool
    started_s: float  # since the workload began
    latency_s: float
    status: str  # "OK" or the gRPC status name
    responses: int = 1


@dataclass(frozen=True, slots=True)
class WorkloadMix:
    unary_model: str = "codegen"
    stream_model: str = "codegen_stream"
    stream_fraction: float = 0.25
    max_tokens: int = 16


def codegen_inputs(prompt: str, max_tokens: int) -> list[InferInput]:
    prompt_input = InferInput("PROMPT", [1, 1], "BYTES")
    prompt_input.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    tokens_input = InferInput("MAX_TOKENS", [1, 1], "INT32")
    tokens_input.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [prompt_input, tokens_input]


def _status_of(exc: InferenceServerException) -> str:
    status = exc.status() or "UNKNOWN"
    return status.removeprefix("StatusCode.")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _unary(
    client: grpcclient_aio.InferenceServerClient, model: str, prompt: str, mix: WorkloadMix
) -> int:
    await client.infer(model, codegen_inputs(prompt, mix.max_tokens), client_timeout=60.0)
    return 1


async def _stream(
    client: grpcclient_aio.InferenceServerClient, model: str, prompt: str, mix: WorkloadMix
) -> int:
    done = asyncio.Event()

    async def requests() -> AsyncIterator[dict[str, object]]:
        yield {"model_name": model, "inputs": codegen_inputs(prompt, mix.max_tokens)}
        await done.wait()  # keep the stream open until every token came back

    received = 0
    try:
        async for _result, error in client.stream_infer(requests(), stream_timeout=60.0):
            if error is not None:
                raise error
            received += 1
            if received >= mix.max_tokens:
                break
    finally:
        done.set()
    return received


async def run_closed_loop(
    address: str,
    *,
    duration_s: float,
    concurrency: int,
    mix: WorkloadMix = WorkloadMix(),
    seed: int = 7,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Runs `concurrency` clients for `duration_s`; returns one record per request."""
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    began = time.perf_counter()
    stop_at = began + duration_s

    async def client_loop(worker: int) -> None:
        client = grpcclient_aio.InferenceServerClient(address)
        worker_rng = random.Random(rng.random() + worker)
        try:
            while time.perf_counter() < stop_at:
                streaming = worker_rng.random() < mix.stream_fraction
                model = mix.stream_model if streaming else mix.unary_model
                prompt = worker_rng.choice(PROMPTS)
                started = time.perf_counter()
                status, responses = "OK", 0
                try:
                    call = _stream if streaming else _unary
                    responses = await call(client, model, prompt, mix)
                except InferenceServerException as exc:
                    status = _status_of(exc)
                record = RequestRecord(
                    model=model,
                    streaming=streaming,
                    started_s=started - began,
                    latency_s=time.perf_counter() - started,
                    status=status,
                    responses=responses,
                )
                records.append(record)
                if on_record is not None:
                    on_record(record)
        finally:
            await client.close()

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    return records
