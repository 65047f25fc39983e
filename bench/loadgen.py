"""The load generator: open loop (scheduled arrivals) and closed loop (N clients), any call.

Every benchmark, the demo and the tests drive load through here. A request is a `Request`: an
`async () -> Responses` call plus a tag (its model, or its priority class) that summaries
group by. The generator times each call, files its status (a gRPC status name, or the
exception's type name; `DEADLINE_EXCEEDED` for a timeout) and keeps every record, so
percentiles come from the full record (see bench.stats), never from averages.

Open loop: arrivals follow a schedule fixed in advance (`poisson_arrivals`, `fixed_arrivals`,
or any list of offsets, e.g. bursts from bench.workloads), whether or not earlier requests
have answered; each latency runs from the request's SCHEDULED time, not from when the
generator got round to sending it, so a stalled server shows in the tail instead of hiding
behind fewer sends (no coordinated omission). Closed loop: `concurrency` clients, each sending
its next request when the last one answers.

A streaming call returns the clock times of its responses; the generator turns them into the
time to the first response and the gaps between responses. The gRPC calls themselves are in
bench.calls.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

__all__ = [
    "OK",
    "TIMEOUT",
    "Call",
    "CallRecord",
    "LoadRun",
    "Request",
    "RequestFactory",
    "fixed_arrivals",
    "poisson_arrivals",
    "run_closed_loop",
    "run_open_loop",
    "status_of",
]

OK = "OK"
TIMEOUT = "DEADLINE_EXCEEDED"
# The generator's own limit on calls in flight in an open loop, so it never grows without
# bound; an arrival beyond it is not sent and is filed under this status.
DROPPED = "GENERATOR_SATURATED"

Clock = Callable[[], float]
# What a call returns: the clock times of its responses (a stream), or None (one response).
Responses = Sequence[float] | None
Call = Callable[[], Awaitable[Responses]]


@dataclass(frozen=True, slots=True)
class Request:
    call: Call
    tag: str = ""  # what summaries group by: the model, the priority class


# (worker index in a closed loop, arrival index in an open loop; seconds since the run began)
RequestFactory = Callable[[int, float], Request]


@dataclass(frozen=True, slots=True)
class CallRecord:
    tag: str
    started_s: float  # since the run began; open loop: the scheduled arrival
    latency_s: float  # from `started_s` to the last response (or the failure)
    status: str  # "OK", a gRPC status name, or an exception type name
    first_response_s: float = math.nan  # from `started_s` to the first response (streams)
    inter_response_s: tuple[float, ...] = ()  # gaps between successive responses (streams)
    retry_after_ms: float | None = None  # the `retry-after-ms` trailer of a refusal

    @property
    def streamed(self) -> bool:
        return not math.isnan(self.first_response_s)


@dataclass(frozen=True, slots=True)
class LoadRun:
    records: tuple[CallRecord, ...]
    elapsed_s: float  # the denominator of throughput


def status_of(exc: BaseException) -> str:
    """The gRPC status name of a failed call, else the exception's type name."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return TIMEOUT
    code = getattr(exc, "status", None)  # tritonclient's InferenceServerException
    if callable(code) and isinstance(status := code(), str) and status:
        return status.removeprefix("StatusCode.")
    return type(exc).__name__


def _retry_after_ms(exc: BaseException) -> float | None:
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


async def _timed(
    request: Request, clock: Clock, began: float, scheduled: float, timeout_s: float | None
) -> CallRecord:
    status, retry, responses = OK, None, None
    try:
        responses = await asyncio.wait_for(request.call(), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure is a data point, never a crash of the run
        status, retry = status_of(exc), _retry_after_ms(exc)
    ended = clock()
    first = math.nan
    gaps: tuple[float, ...] = ()
    if responses:
        first = responses[0] - scheduled
        gaps = tuple(b - a for a, b in itertools.pairwise(responses))
    return CallRecord(request.tag, scheduled - began, ended - scheduled, status, first, gaps, retry)


def poisson_arrivals(rate_rps: float, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival offsets in [0, duration_s) of a Poisson process: exponential gaps of mean
    1 / rate. The same seed gives the same schedule."""
    _check_rate(rate_rps)
    arrivals: list[float] = []
    at = rng.expovariate(rate_rps)
    while at < duration_s:
        arrivals.append(at)
        at += rng.expovariate(rate_rps)
    return arrivals


def fixed_arrivals(rate_rps: float, duration_s: float) -> list[float]:
    """Arrival offsets in [0, duration_s) at a fixed rate: one every 1 / rate seconds."""
    _check_rate(rate_rps)
    return [i / rate_rps for i in range(math.ceil(duration_s * rate_rps))]


def _check_rate(rate_rps: float) -> None:
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise ValueError(f"rate_rps must be a positive number, got {rate_rps}")


@contextmanager
def _progress(label: str, total_s: float, enabled: bool) -> Iterator[Callable[[float], None]]:
    """A rich progress bar over time; yields `advance_to(elapsed_s)`."""
    if not enabled:
        yield lambda _elapsed: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task(label, total=total_s)
        yield lambda elapsed: bar.update(task, completed=min(elapsed, total_s))


async def run_closed_loop(
    make_request: RequestFactory,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
    timeout_s: float | None = None,
    label: str = "closed loop",
    progress: bool = False,
    on_record: Callable[[CallRecord], None] | None = None,
    clock: Clock = time.perf_counter,
) -> LoadRun:
    """`concurrency` clients, each sending its next request when the last one ends;
    `make_request(worker, elapsed_s)` gives worker `worker`'s next request. Requests that start
    during the first `warmup_s` are made but not recorded; `duration_s` of recording follows.
    A call still running after `timeout_s` is cancelled and recorded as DEADLINE_EXCEEDED.
    Throughput is over `duration_s`: the requests started in the window, over the window."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    records: list[CallRecord] = []
    began = clock()
    record_from = began + warmup_s
    stop_at = record_from + duration_s

    async def worker(index: int) -> None:
        while (now := clock()) < stop_at:
            request = make_request(index, now - began)
            record = await _timed(request, clock, began, now, timeout_s)
            if now >= record_from:
                records.append(record)
                if on_record is not None:
                    on_record(record)

    with _progress(label, warmup_s + duration_s, progress) as advance:
        workers = asyncio.gather(*(worker(i) for i in range(concurrency)))
        while not workers.done():
            advance(clock() - began)
            await asyncio.wait([workers], timeout=0.2)
        await workers
    return LoadRun(tuple(records), duration_s)


async def run_open_loop(
    make_request: RequestFactory,
    *,
    arrivals: Sequence[float],
    duration_s: float | None = None,
    max_outstanding: int = 4096,
    timeout_s: float | None = None,
    label: str = "open loop",
    progress: bool = False,
    on_record: Callable[[CallRecord], None] | None = None,
    clock: Clock = time.perf_counter,
) -> LoadRun:
    """Sends request i at `arrivals[i]` seconds after the start, whether or not earlier ones
    have answered, then waits for every answer. Latency runs from the scheduled time. Beyond
    `max_outstanding` calls in flight an arrival is not sent and is recorded as
    GENERATOR_SATURATED; a call still running after `timeout_s` is cancelled and recorded as
    DEADLINE_EXCEEDED. Throughput is over `duration_s` (default: the last arrival) or the
    time every answer took, whichever is longer."""
    records: list[CallRecord] = []
    in_flight: set[asyncio.Task[CallRecord]] = set()
    planned_s = duration_s if duration_s is not None else (arrivals[-1] if arrivals else 0.0)
    began = clock()

    def finished(task: asyncio.Task[CallRecord]) -> None:
        in_flight.discard(task)
        if not task.cancelled():
            keep(task.result())

    def keep(record: CallRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    with _progress(label, planned_s, progress) as advance:
        for index, offset in enumerate(arrivals):
            scheduled = began + offset
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            advance(offset)
            request = make_request(index, offset)
            if len(in_flight) >= max_outstanding:
                keep(CallRecord(request.tag, offset, 0.0, DROPPED))
                continue
            task = asyncio.create_task(_timed(request, clock, began, scheduled, timeout_s))
            in_flight.add(task)
            task.add_done_callback(finished)
        if in_flight:
            await asyncio.wait(set(in_flight))
    return LoadRun(tuple(records), max(planned_s, clock() - began))
