"""The load generator: open loop (Poisson arrivals) and closed loop (N clients), any call.

A call is an `async () -> None` that raises on failure; the generator times it, files its
status (a gRPC status name, or the exception's type name) and keeps every latency, so
percentiles come from the full record, never from averages. Open-loop latency runs from each
request's scheduled arrival, not from when it was sent, so a stalled server shows up in the
tail instead of hiding behind fewer sends (coordinated omission).

The calls themselves (raw-bytes unary `ModelInfer` and streaming `ModelStreamInfer` through
grpc.aio) are built by `unary_call` and `stream_call`; `infer_request_bytes` serialises a real
`ModelInferRequest` once, so the generator spends no time on protobuf per request.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.utils import InferenceServerException

__all__ = [
    "Call",
    "CallRecord",
    "LoadSummary",
    "infer_request_bytes",
    "poisson_arrivals",
    "run_closed_loop",
    "run_open_loop",
    "status_of",
    "stream_call",
    "summarize",
    "unary_call",
]

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
OK = "OK"

Call = Callable[[], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CallRecord:
    started_s: float  # since the run began (open loop: the scheduled arrival)
    latency_s: float
    status: str  # "OK", a gRPC status name, or an exception type name


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """What a run measured. Latencies in milliseconds, over successful calls only."""

    requests: int
    ok: int
    errors_by_status: dict[str, int]
    elapsed_s: float
    throughput_rps: float  # successful calls per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "errors_by_status": dict(self.errors_by_status),
            "elapsed_s": self.elapsed_s,
            "throughput_rps": self.throughput_rps,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
        }


def summarize(records: Sequence[CallRecord], elapsed_s: float) -> LoadSummary:
    """Percentiles (linear interpolation, numpy's default) of the successful calls' latencies;
    throughput is successful calls over `elapsed_s`; errors are counted by status."""
    latencies_ms = np.array([r.latency_s * 1e3 for r in records if r.status == OK], dtype=float)
    ok = int(latencies_ms.size)
    errors = Counter(r.status for r in records if r.status != OK)

    def pct(q: float) -> float:
        return float(np.percentile(latencies_ms, q)) if ok else math.nan

    return LoadSummary(
        requests=len(records),
        ok=ok,
        errors_by_status=dict(sorted(errors.items())),
        elapsed_s=elapsed_s,
        throughput_rps=ok / elapsed_s if elapsed_s > 0 else math.nan,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        max_ms=float(latencies_ms.max()) if ok else math.nan,
        mean_ms=float(latencies_ms.mean()) if ok else math.nan,
    )


def poisson_arrivals(rate_rps: float, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival offsets in [0, duration_s) of a Poisson process: exponential gaps of mean
    1 / rate. The same seed gives the same schedule."""
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise ValueError(f"rate_rps must be a positive number, got {rate_rps}")
    arrivals: list[float] = []
    at = rng.expovariate(rate_rps)
    while at < duration_s:
        arrivals.append(at)
        at += rng.expovariate(rate_rps)
    return arrivals


def status_of(exc: BaseException) -> str:
    """The gRPC status name of a failed call, else the exception's type name."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, InferenceServerException):
        return (exc.status() or "UNKNOWN").removeprefix("StatusCode.")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "DEADLINE_EXCEEDED"
    return type(exc).__name__


async def _timed(call: Call, clock: Clock, began: float, scheduled: float) -> CallRecord:
    status = OK
    try:
        await call()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure is a data point, never a crash of the run
        status = status_of(exc)
    return CallRecord(scheduled - began, clock() - scheduled, status)


@contextmanager
def _progress(label: str, total_s: float, enabled: bool) -> Iterator[Callable[[float], None]]:
    """A rich progress bar over time; yields `advance_to(elapsed_s)`."""
    if not enabled:
        yield lambda _elapsed: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total_s)
        yield lambda elapsed: bar.update(task, completed=min(elapsed, total_s))


async def run_closed_loop(
    make_call: Callable[[int], Call],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
    label: str = "closed loop",
    progress: bool = False,
    clock: Clock = time.perf_counter,
) -> LoadSummary:
    """`concurrency` clients, each sending its next call when the last one ends.
    `make_call(worker)` gives worker `worker`'s next call. Calls that start during the first
    `warmup_s` are made but not recorded; `duration_s` of recording follows."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    records: list[CallRecord] = []
    began = clock()
    record_from = began + warmup_s
    stop_at = record_from + duration_s

    async def worker(index: int) -> None:
        while (now := clock()) < stop_at:
            record = await _timed(make_call(index), clock, began, now)
            if now >= record_from:
                records.append(record)

    with _progress(label, warmup_s + duration_s, progress) as advance:
        workers = asyncio.gather(*(worker(i) for i in range(concurrency)))
        while not workers.done():
            advance(clock() - began)
            await asyncio.wait([workers], timeout=0.2)
        await workers
    # Calls started in the window, over the window: a closed loop completes about as many as it
    # starts, and slow last calls do not stretch the denominator against the slowest system.
    return summarize(records, duration_s)


async def run_open_loop(
    make_call: Callable[[int], Call],
    *,
    rate_rps: float,
    duration_s: float,
    seed: int,
    max_outstanding: int = 1024,
    label: str = "open loop",
    progress: bool = False,
    clock: Clock = time.perf_counter,
) -> LoadSummary:
    """Calls arrive as a Poisson process of `rate_rps` (schedule fixed by `seed`), whether or
    not earlier ones have answered. Beyond `max_outstanding` calls in flight an arrival is
    dropped and counted as RESOURCE_EXHAUSTED (the generator's own limit, so it never grows
    without bound). `make_call(i)` gives the i-th arrival's call."""
    arrivals = poisson_arrivals(rate_rps, duration_s, random.Random(seed))
    records: list[CallRecord] = []
    in_flight: set[asyncio.Task[CallRecord]] = set()
    began = clock()

    def finished(task: asyncio.Task[CallRecord]) -> None:
        in_flight.discard(task)
        records.append(task.result())

    with _progress(label, duration_s, progress) as advance:
        for index, offset in enumerate(arrivals):
            scheduled = began + offset
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            advance(offset)
            if len(in_flight) >= max_outstanding:
                records.append(CallRecord(offset, 0.0, "RESOURCE_EXHAUSTED"))
                continue
            task = asyncio.create_task(_timed(make_call(index), clock, began, scheduled))
            in_flight.add(task)
            task.add_done_callback(finished)
        if in_flight:
            await asyncio.wait(set(in_flight))
    return summarize(records, max(duration_s, clock() - began))


def infer_request_bytes(
    model: str, inputs: Sequence[InferInput], outputs: Sequence[str] = (), version: str = ""
) -> bytes:
    """A serialised ModelInferRequest with the tensors as raw contents, as tritonclient sends."""
    request = triton_pb.ModelInferRequest(model_name=model, model_version=version)
    for tensor in inputs:
        request.inputs.add().CopyFrom(tensor._get_tensor())
        content = tensor._get_content()
        if content is not None:
            request.raw_input_contents.append(content)
    for name in outputs:
        request.outputs.add(name=name)
    data: bytes = request.SerializeToString()
    return data


def unary_call(
    channel: grpc.aio.Channel, body: bytes, timeout_s: float = 60.0
) -> Callable[[], Call]:
    """A factory of raw-bytes ModelInfer calls; a reply with an error raises AioRpcError."""
    infer = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)

    def make() -> Call:
        async def call() -> None:
            await infer(body, timeout=timeout_s)

        return call

    return make


class StreamError(Exception):
    """A ModelStreamInfer response carried an error message, or the stream ended early."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def stream_call(
    channel: grpc.aio.Channel, body: bytes, responses: int, timeout_s: float = 60.0
) -> Callable[[], Call]:
    """A factory of ModelStreamInfer calls: send one request, read `responses` answers (a
    decoupled model's token count), then close the stream."""
    open_stream = channel.stream_stream(
        STREAM_METHOD, request_serializer=None, response_deserializer=None
    )

    def make() -> Call:
        async def call() -> None:
            stream = open_stream(timeout=timeout_s)
            try:
                await stream.write(body)
                for _ in range(responses):
                    reply = await stream.read()
                    if reply is grpc.aio.EOF:
                        raise StreamError("stream ended before every response came")
                    answer = triton_pb.ModelStreamInferResponse.FromString(reply)
                    if answer.error_message:
                        raise StreamError(answer.error_message)
                await stream.done_writing()
            finally:
                stream.cancel()

        return call

    return make
