"""Scenario `overhead`: what the data plane adds, on a model that does almost nothing.

One real Triton serves `add_one` (FP32[16] + 1). The same requests go four ways: straight to
Triton; through the Pointsman sidecar (its own process, a static route, as in a pod); through
the least a Python proxy can be (`MINIMAL_PROXY`: 20 lines of grpc.aio with uvloop, one fixed
upstream, no parsing, no routing), which separates the sidecar's own cost from grpc.aio's;
and through nghttpx (a C HTTP/2 proxy, the reference for a compiled data plane). Two drivers:
the project's load generator (grpc.aio, raw bytes) and h2load (C); each at concurrency 1 and
64. Each round runs every path once, in a rotated order, so drift hits every path alike;
the figures are medians over rounds with 95 % bootstrap intervals, and the added latency is
taken per round against that round's direct run.

The method is public, for every scenario that compares paths to one Triton (the proxyless
scenario uses it): `python_run` (the Python driver, one closed-loop run), `measure_rounds`
(rotated rounds) and `path_figures` (medians, intervals, and what a path adds over direct).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
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

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import TritonSpec
from bench.calls import INFER_METHOD, TritonCalls, infer_request_bytes
from bench.loadgen import Request, run_closed_loop
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck, ratio
from bench.scenarios import Options, Say
from bench.scenarios.comparison import interleaved
from bench.scenarios.h2load import INSTALL_HINT, h2load_run, nghttpx_process
from bench.scenarios.quick_fleet import SharedFleet, one_triton
from bench.stats import Interval, LoadSummary, bootstrap_median, summarize
from bench.testbed import server_version

__all__ = [
    "MINIMAL_PROXY",
    "MODEL",
    "PATH_COLUMNS",
    "DriverRun",
    "OverheadSettings",
    "PathFigures",
    "check_answer",
    "measure_rounds",
    "path_figures",
    "python_run",
    "request_body",
    "run_overhead",
    "scenario",
    "settings_for",
    "wait_for_answer",
]

MODEL = "add_one"
VALUES = np.arange(16, dtype=np.float32)
# The foundation issue's targets for the sidecar.
TARGET_ADDED_P50_MS = 0.35
TARGET_ADDED_P99_MS = 0.7
TARGET_THROUGHPUT_RATIO = 0.25

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


@dataclass(frozen=True, slots=True)
class OverheadSettings:
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


QUICK = OverheadSettings(duration_s=0.3, warmup_s=0.1, rounds=1, h2load=False)


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
    settings: OverheadSettings,
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
    settings: OverheadSettings,
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


def _python_process(name: str, argv: Sequence[str], workdir: Path) -> ManagedProcess:
    return ManagedProcess(
        ProcessSpec(name=name, argv=[sys.executable, *argv], log_path=workdir / f"{name}.log")
    )


def _proxies(
    triton: TritonSpec, workdir: Path, notes: list[str]
) -> tuple[list[ManagedProcess], dict[str, str]]:
    """The processes in front of Triton, and every path's address (direct first)."""
    paths = {"direct": triton.grpc_address}
    sidecar_port, proxy_port = free_port(), free_port()
    config = workdir / "sidecar.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{sidecar_port}\nstatic_routes:\n  {MODEL}: [{triton.grpc_address}]\n"
    )
    processes = [
        _python_process(
            "sidecar",
            ["-m", "app", "sidecar", "--config", str(config), "--log-level", "WARNING"],
            workdir,
        ),
        _python_process(
            "minimal-proxy",
            ["-c", MINIMAL_PROXY, str(proxy_port), triton.grpc_address, INFER_METHOD],
            workdir,
        ),
    ]
    paths["sidecar"] = f"127.0.0.1:{sidecar_port}"
    paths["minimal proxy"] = f"127.0.0.1:{proxy_port}"
    if nghttpx := nghttpx_process(triton.grpc_address, workdir, notes):
        processes.append(nghttpx[0])
        paths["nghttpx"] = nghttpx[1]
    return processes, paths


Cells = dict[tuple[str, int, str], list[LoadSummary]]


def _drivers(settings: OverheadSettings, notes: list[str]) -> list[str]:
    if not settings.h2load:
        notes.append("h2load: not run (quick mode); the Python driver only")
        return ["python"]
    if not shutil.which("h2load"):
        notes.append(f"h2load not found: only the Python driver ran ({INSTALL_HINT})")
        return ["python"]
    return ["python", "h2load"]


def run_overhead(
    settings: OverheadSettings, say: Say = lambda _line: None, shared: SharedFleet | None = None
) -> ScenarioResult:
    """Measures every path; on `shared`'s Triton when given, else on a Triton of its own."""
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-overhead-"))
    notes: list[str] = []
    drivers = _drivers(settings, notes)
    body = request_body()
    cells: Cells = {}
    with one_triton(shared, (MODEL,), workdir) as (triton, _process):
        triton_version = server_version(triton.grpc_address)
        processes, paths = _proxies(triton, workdir, notes)
        try:
            for proc in processes:
                proc.start()
            for proc, address in zip(processes, list(paths.values())[1:], strict=True):
                wait_for_answer(address, proc)

            def python(path: str, concurrency: int) -> LoadSummary:
                return python_run(paths[path], concurrency, settings).summary

            def h2load(path: str, concurrency: int) -> LoadSummary:
                return h2load_run(
                    paths[path],
                    body,
                    settings.duration_s,
                    concurrency,
                    warmup_s=settings.warmup_s,
                    metrics_url=triton.metrics_url,
                    model=MODEL,
                    tmp=workdir,
                )

            for driver in drivers:
                measure = python if driver == "python" else h2load
                runs = measure_rounds(list(paths), settings, measure, say, f"overhead {driver}")
                for (concurrency, path), summaries in runs.items():
                    cells[(driver, concurrency, path)] = summaries
        finally:
            stop_all(processes[::-1])
    if shared is not None:
        notes.append("quick mode: on the quick run's shared Triton")
    notes.append(f"logs: {workdir}")
    result = _result(cells, settings, drivers, list(paths), notes)
    result.data["triton_version"] = triton_version
    return result


def _result(
    cells: Cells,
    settings: OverheadSettings,
    drivers: list[str],
    paths: list[str],
    notes: list[str],
) -> ScenarioResult:
    rows = []
    figures: list[dict[str, object]] = []
    added: dict[tuple[str, int, str], PathFigures] = {}
    for (driver, concurrency, path), runs in cells.items():
        found = path_figures(runs, cells[(driver, concurrency, "direct")], settings.seed)
        added[(driver, concurrency, path)] = found
        rows.append((driver, concurrency, path, *found.cells(path == "direct")))
        figures.append(
            {
                "driver": driver,
                "concurrency": concurrency,
                "path": path,
                **found.to_dict(),
                "rounds": [r.to_dict() for r in runs],
            }
        )
    low, high = min(settings.concurrencies), max(settings.concurrencies)
    bars = []
    for driver in drivers:
        bars.append(
            BarGroup(
                f"added p50, {driver}, concurrency {low}",
                "ms",
                tuple(paths[1:]),
                tuple(added[(driver, low, p)].added_p50_ms.median for p in paths[1:]),
            )
        )
        bars.append(
            BarGroup(
                f"throughput vs direct, {driver}, concurrency {high}",
                "share",
                tuple(paths[1:]),
                tuple(added[(driver, high, p)].throughput_vs_direct.median for p in paths[1:]),
            )
        )
    return ScenarioResult(
        name="overhead",
        title="Overhead: direct vs sidecar vs minimal proxy vs nghttpx on add_one",
        tables=(
            Table(
                f"add_one FP32[16], one Triton, {settings.duration_s:g} s per run, "
                f"{settings.rounds} rounds; median [95 % bootstrap interval] over rounds",
                ("driver", "concurrency", "path", *PATH_COLUMNS),
                tuple(rows),
            ),
        ),
        bars=tuple(bars),
        targets=_targets(added, settings, drivers),
        notes=tuple(notes),
        data={
            "settings": {**settings.describe(), "drivers": drivers},
            "cells": figures,
        },
    )


def _targets(
    added: dict[tuple[str, int, str], PathFigures],
    settings: OverheadSettings,
    drivers: list[str],
) -> tuple[TargetCheck, ...]:
    low, high = min(settings.concurrencies), max(settings.concurrencies)
    sidecar = added[("python", low, "sidecar")]
    plus50, plus99 = sidecar.added_p50_ms.median, sidecar.added_p99_ms.median
    throughput_driver = "h2load" if "h2load" in drivers else "python"
    share = added[(throughput_driver, high, "sidecar")].throughput_vs_direct.median
    return (
        TargetCheck(
            f"sidecar adds, p50 (python, concurrency {low})",
            f"<= {TARGET_ADDED_P50_MS} ms",
            f"{plus50:.3f} ms",
            plus50 <= TARGET_ADDED_P50_MS,
        ),
        TargetCheck(
            f"sidecar adds, p99 (python, concurrency {low})",
            f"<= {TARGET_ADDED_P99_MS} ms",
            f"{plus99:.3f} ms",
            plus99 <= TARGET_ADDED_P99_MS,
        ),
        TargetCheck(
            f"sidecar throughput vs direct ({throughput_driver}, concurrency {high})",
            f">= {TARGET_THROUGHPUT_RATIO:.0%}",
            f"{share:.1%}",
            share >= TARGET_THROUGHPUT_RATIO,
        ),
    )


def settings_for(options: Options) -> OverheadSettings:
    """The settings the command line asks for (the proxyless scenario's too)."""
    settings = QUICK if options.quick else OverheadSettings()
    settings = replace(settings, seed=options.seed, progress=options.progress)
    if options.duration_s:
        settings = replace(settings, duration_s=options.duration_s)
    if options.repetitions:
        settings = replace(settings, rounds=options.repetitions)
    return settings


def scenario(options: Options, say: Say) -> ScenarioResult:
    return run_overhead(settings_for(options), say, options.shared)
