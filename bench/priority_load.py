"""An open-loop, two-class load against a Triton gRPC address: what overload looks like.

Requests arrive at a fixed mean rate (Poisson arrivals, from an injected `random.Random`),
whatever the server does, so an overloaded server cannot slow the offered load down the way a
closed loop lets it. Each request is a raw `codegen` ModelInferRequest tagged with an
`x-priority` class; every answer is recorded with its status and, for a shed one, the
`retry-after-ms` hint. Used by `bench/overload.py` and `tests/test_overload.py`.
"""

from __future__ import annotations

import asyncio
import random
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

__all__ = [
    "PRIORITY_POLICY",
    "Answer",
    "ClassFigures",
    "RssSampler",
    "codegen_request",
    "figures",
    "measure_capacity",
    "rss_bytes",
    "run_closed",
    "run_open_loop",
]

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
# The router policy both the overload test and bench/overload.py run: codegen always placed,
# two classes, low the default and sheddable.
PRIORITY_POLICY = """\
models:
  codegen: {min_copies: 1}
priority_classes:
  high: {triton_priority: 1}
  low: {triton_priority: 2, sheddable: true}
default_priority_class: low
"""


@dataclass(frozen=True, slots=True)
class Answer:
    priority: str  # the x-priority sent
    latency_s: float
    code: str  # gRPC status name, "OK" for success
    retry_after_ms: str = ""  # the shed hint, if the answer carried one


@dataclass(frozen=True, slots=True)
class ClassFigures:
    sent: int
    ok: int
    shed: int  # RESOURCE_EXHAUSTED
    other_errors: int
    p50_ms: float  # of successful answers
    p99_ms: float


def codegen_request(prompt: str, max_tokens: int, *, request_id: str = "") -> bytes:
    """A serialized ModelInferRequest for `codegen` (PROMPT BYTES[1,1], MAX_TOKENS INT32[1,1])."""
    request = service_pb2.ModelInferRequest(model_name="codegen", id=request_id)
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1, 1])
    request.inputs.add(name="MAX_TOKENS", datatype="INT32", shape=[1, 1])
    text = prompt.encode()
    request.raw_input_contents.append(struct.pack("<I", len(text)) + text)
    request.raw_input_contents.append(struct.pack("<i", max_tokens))
    data: bytes = request.SerializeToString()
    return data


async def _call(
    infer: grpc.aio.UnaryUnaryMultiCallable, request: bytes, priority: str, timeout_s: float
) -> Answer:
    started = time.perf_counter()
    metadata = (("x-priority", priority),) if priority else ()
    try:
        await infer(request, timeout=timeout_s, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        trailers = dict(error.trailing_metadata() or ())
        hint = trailers.get("retry-after-ms", "")
        return Answer(
            priority,
            time.perf_counter() - started,
            error.code().name,
            hint if isinstance(hint, str) else "",
        )
    return Answer(priority, time.perf_counter() - started, "OK")


def _infer(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)


async def run_closed(
    address: str,
    request: bytes,
    *,
    priority: str,
    concurrency: int,
    duration_s: float,
    timeout_s: float = 30.0,
) -> list[Answer]:
    """`concurrency` clients, each sending its next request when the last is answered."""
    answers: list[Answer] = []
    async with grpc.aio.insecure_channel(address) as channel:
        infer = _infer(channel)
        end = time.perf_counter() + duration_s

        async def client() -> None:
            while time.perf_counter() < end:
                answers.append(await _call(infer, request, priority, timeout_s))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return answers


async def measure_capacity(
    address: str, request: bytes, *, concurrency: int, duration_s: float
) -> float:
    """Successful answers per second of a closed loop that keeps the server busy."""
    started = time.perf_counter()
    answers = await run_closed(
        address, request, priority="", concurrency=concurrency, duration_s=duration_s
    )
    return sum(a.code == "OK" for a in answers) / (time.perf_counter() - started)


async def run_open_loop(
    address: str,
    request: bytes,
    *,
    rate_per_s: float,
    duration_s: float,
    classes: Sequence[tuple[str, float]],
    rng: random.Random,
    timeout_s: float = 30.0,
) -> list[Answer]:
    """Poisson arrivals at `rate_per_s` for `duration_s`; each request's class drawn from
    `classes` (name, share). Waits for every answer."""
    names = [name for name, _ in classes]
    shares = [share for _, share in classes]
    tasks: list[asyncio.Task[Answer]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        infer = _infer(channel)
        start = time.perf_counter()
        due = 0.0
        while due < duration_s:
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            priority = rng.choices(names, shares)[0]
            tasks.append(asyncio.create_task(_call(infer, request, priority, timeout_s)))
            due += rng.expovariate(rate_per_s)
        return list(await asyncio.gather(*tasks))


def figures(answers: Sequence[Answer], priority: str) -> ClassFigures:
    """Counts and latency percentiles of one class's answers."""
    mine = [a for a in answers if a.priority == priority]
    ok = [a.latency_s * 1000 for a in mine if a.code == "OK"]
    shed = sum(a.code == "RESOURCE_EXHAUSTED" for a in mine)
    return ClassFigures(
        sent=len(mine),
        ok=len(ok),
        shed=shed,
        other_errors=len(mine) - len(ok) - shed,
        p50_ms=float(np.percentile(ok, 50)) if ok else float("nan"),
        p99_ms=float(np.percentile(ok, 99)) if ok else float("nan"),
    )


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


class RssSampler:
    """The start and the highest RSS of a process, sampled on a thread while a load runs."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.start = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_bytes(self.pid))
