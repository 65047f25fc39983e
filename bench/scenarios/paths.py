"""The method of the scenarios that compare paths to one Triton serving `add_one` (overhead,
proxyless): the request and its check, the bare proxy both measure as the floor
(`MINIMAL_PROXY`), the Python driver (`python_run`: one closed-loop run of
the project's load generator, with an optional window around the load for CPU sampling),
rotated rounds (`measure_rounds`), and the figures of a path against direct (`path_figures`:
medians over rounds with 95 % bootstrap intervals, the added latency taken per round against
that round's direct run, so drift between rounds cancels out).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as triton_pb

from app.processes import ManagedProcess, ProcessSpec, free_port
from bench.calls import INFER_METHOD, TritonCalls, infer_request_bytes
from bench.loadgen import Request, run_closed_loop
from bench.report import ratio
from bench.scenarios import Options, Say
from bench.scenarios.comparison import interleaved
from bench.stats import Interval, LoadSummary, bootstrap_median, summarize

__all__ = [
    "MINIMAL_PROXY",
    "MODEL",
    "PATH_COLUMNS",
    "QUICK",
    "DriverRun",
    "PathFigures",
    "PathSettings",
    "check_answer",
    "measure_rounds",
    "minimal_proxy_process",
    "path_figures",
    "python_run",
    "request_body",
    "settings_for",
    "wait_for_answer",
]

MODEL = "add_one"
VALUES = np.arange(16, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class PathSettings:
    duration_s: float = 8.0
    warmup_s: float = 1.0
    concurrencies: tuple[int, ...] = (1, 64)
    rounds: int = 3
    seed: int = 7
    progress: bool = False
    h2load: bool = True  # drive with h2load too, where it is installed

    def describe(self) -> dict[str, object]:
        return {
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "rounds": self.rounds,
            "concurrencies": list(self.concurrencies),
        }


QUICK = PathSettings(duration_s=0.3, warmup_s=0.1, rounds=1, h2load=False)


# The floor for comparison: the least a grpc.aio proxy can do (one fixed upstream, no peek,
# no routing, no metadata, no deadline), with uvloop and a registered raw-bytes handler.
MINIMAL_PROXY = """
import sys, grpc, uvloop
async def main(port, upstream):
    channel = grpc.aio.insecure_channel(upstream)
    call = channel.unary_unary(sys.argv[3], request_serializer=None,
                               response_deserializer=None, _registered_method=True)
    async def infer(request, context):
        return await call(request)
    server = grpc.aio.server()
    server.add_registered_method_handlers(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
uvloop.run(main(sys.argv[1], sys.argv[2]))
"""


def minimal_proxy_process(
    upstream: str, log_dir: Path, name: str = "minimal-proxy"
) -> tuple[ManagedProcess, str]:
    """`MINIMAL_PROXY` in front of `upstream` on a free port, its own process (not started
    yet), and its address."""
    port = free_port()
    argv = [sys.executable, "-c", MINIMAL_PROXY, str(port), upstream, INFER_METHOD]
    process = ManagedProcess(ProcessSpec(name, argv, log_path=log_dir / f"{name}.log"))
    return process, f"127.0.0.1:{port}"


def request_body() -> bytes:
    tensor = grpcclient.InferInput("INPUT0", [len(VALUES)], "FP32")
    tensor.set_data_from_numpy(VALUES)
    return infer_request_bytes(MODEL, [tensor], ["OUTPUT0"])


def check_answer(response: bytes) -> None:
    answer = triton_pb.ModelInferResponse.FromString(response)
    out = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)
    if not np.array_equal(out, VALUES + 1):
        raise RuntimeError(f"add_one answered {out}, expected {VALUES + 1}")


def wait_for_answer(address: str, process: ManagedProcess, timeout_s: float = 30.0) -> None:
    """Until a ModelInfer of add_one through `address` answers correctly; `process` is what
    serves that address (its exit ends the wait)."""
    deadline = time.monotonic() + timeout_s
    body = request_body()
    while True:
        process.raise_if_exited()
        try:
            with grpc.insecure_channel(address) as channel:
                call = channel.unary_unary(
                    INFER_METHOD, request_serializer=None, response_deserializer=None
                )
                check_answer(call(body, timeout=2))
                return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass(frozen=True, slots=True)
class DriverRun:
    """One run of the Python driver: what it measured, and every call it made (warm-up
    included), which is what CPU time spent around the run divides by."""

    summary: LoadSummary
    calls: int


def python_run(
    address: str,
    concurrency: int,
    settings: PathSettings,
    around: AbstractContextManager[object] | None = None,
) -> DriverRun:
    """`concurrency` closed-loop clients sending add_one to `address` (host:port, or any
    target gRPC resolves, such as xds:///add_one) for `settings.warmup_s` unrecorded, then
    `settings.duration_s` recorded. `around` (a CPU sampler, say) is entered just around the
    load, after the channel is made."""

    async def run() -> DriverRun:
        async with grpc.aio.insecure_channel(address) as channel:
            calls = TritonCalls(channel, timeout_s=30)
            body = request_body()
            made = 0

            def make(_worker: int, _at: float) -> Request:
                nonlocal made
                made += 1
                return Request(calls.unary(body))

            with around or contextlib.nullcontext():
                done = await run_closed_loop(
                    make,
                    concurrency=concurrency,
                    duration_s=settings.duration_s,
                    warmup_s=settings.warmup_s,
                    progress=settings.progress,
                )
            return DriverRun(summarize(done.records, done.elapsed_s), made)

    return asyncio.run(run())


Run = TypeVar("Run")


def measure_rounds(
    paths: Sequence[str],
    settings: PathSettings,
    measure: Callable[[str, int], Run],
    say: Say,
    label: str,
) -> dict[tuple[int, str], list[Run]]:
    """(concurrency, path) -> one `measure(path, concurrency)` per round. Each round runs
    every path at every concurrency once, paths in an order rotated by one per round
    (a b c d, b c d a, ...), so drift hits every path alike."""
    runs: dict[tuple[int, str], list[Run]] = {}
    for round_index in range(settings.rounds):
        for concurrency in settings.concurrencies:
            for path in interleaved(paths, round_index):
                say(f"{label}: round {round_index + 1}/{settings.rounds} c={concurrency} {path}")
                runs.setdefault((concurrency, path), []).append(measure(path, concurrency))
    return runs


@dataclass(frozen=True, slots=True)
class PathFigures:
    """One path at one concurrency: medians over rounds with 95 % bootstrap intervals, and
    what it adds over direct, taken per round against the same round's direct run."""

    p50_ms: Interval
    p99_ms: Interval
    throughput_rps: Interval
    added_p50_ms: Interval
    added_p99_ms: Interval
    throughput_vs_direct: Interval
    errors: int

    def cells(self, is_direct: bool) -> tuple[object, ...]:
        """The table cells, in the order of `PATH_COLUMNS`."""
        added = (self.added_p50_ms, self.added_p99_ms, self.throughput_vs_direct)
        return (
            self.p50_ms.text(),
            self.p99_ms.text(),
            self.throughput_rps.text(),
            *("-" if is_direct else a.text() for a in added),
            self.errors,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "p50_ms": self.p50_ms.to_dict(),
            "p99_ms": self.p99_ms.to_dict(),
            "throughput_rps": self.throughput_rps.to_dict(),
            "added_p50_ms": self.added_p50_ms.to_dict(),
            "added_p99_ms": self.added_p99_ms.to_dict(),
            "throughput_vs_direct": self.throughput_vs_direct.to_dict(),
            "errors": self.errors,
        }


PATH_COLUMNS = (
    "p50 ms",
    "p99 ms",
    "req/s",
    "added p50 ms",
    "added p99 ms",
    "throughput vs direct",
    "errors",
)


def path_figures(
    runs: Sequence[LoadSummary], direct: Sequence[LoadSummary], seed: int
) -> PathFigures:
    """`runs` of a path and `direct`'s runs of the same rounds, in round order."""
    pairs = list(zip(runs, direct, strict=True))

    def interval(values: Sequence[float]) -> Interval:
        return bootstrap_median(values, random.Random(seed))

    return PathFigures(
        p50_ms=interval([r.p50_ms for r in runs]),
        p99_ms=interval([r.p99_ms for r in runs]),
        throughput_rps=interval([r.throughput_rps for r in runs]),
        added_p50_ms=interval([r.p50_ms - d.p50_ms for r, d in pairs]),
        added_p99_ms=interval([r.p99_ms - d.p99_ms for r, d in pairs]),
        throughput_vs_direct=interval(
            [ratio(r.throughput_rps, d.throughput_rps) for r, d in pairs]
        ),
        errors=sum(r.errors for r in runs),
    )


def settings_for(options: Options) -> PathSettings:
    """The settings the command line asks for (overhead's and proxyless's)."""
    settings = QUICK if options.quick else PathSettings()
    settings = replace(settings, seed=options.seed, progress=options.progress)
    if options.duration_s:
        settings = replace(settings, duration_s=options.duration_s)
    if options.repetitions:
        settings = replace(settings, rounds=options.repetitions)
    return settings
