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
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as triton_pb

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from bench.calls import INFER_METHOD, TritonCalls, infer_request_bytes
from bench.loadgen import Request, run_closed_loop
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck
from bench.scenarios import Options, Say
from bench.scenarios.h2load import INSTALL_HINT, h2load_run, nghttpx_command
from bench.stats import Interval, LoadSummary, bootstrap_median, summarize
from bench.testbed import server_version

__all__ = ["MINIMAL_PROXY", "OverheadSettings", "check_answer", "request_body", "run_overhead"]

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


def request_body() -> bytes:
    tensor = grpcclient.InferInput("INPUT0", [len(VALUES)], "FP32")
    tensor.set_data_from_numpy(VALUES)
    return infer_request_bytes(MODEL, [tensor], ["OUTPUT0"])


def check_answer(response: bytes) -> None:
    answer = triton_pb.ModelInferResponse.FromString(response)
    out = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)
    if not np.array_equal(out, VALUES + 1):
        raise RuntimeError(f"add_one answered {out}, expected {VALUES + 1}")


def _wait_for_answer(address: str, process: ManagedProcess, timeout_s: float = 30.0) -> None:
    """Until a ModelInfer through `address` answers correctly."""
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


def _python_run(address: str, concurrency: int, settings: OverheadSettings) -> LoadSummary:
    async def run() -> LoadSummary:
        async with grpc.aio.insecure_channel(address) as channel:
            calls = TritonCalls(channel, timeout_s=30)
            body = request_body()
            done = await run_closed_loop(
                lambda _worker, _at: Request(calls.unary(body)),
                concurrency=concurrency,
                duration_s=settings.duration_s,
                warmup_s=settings.warmup_s,
                progress=settings.progress,
            )
            return summarize(done.records, done.elapsed_s)

    return asyncio.run(run())


def _python_process(name: str, argv: Sequence[str], workdir: Path) -> ManagedProcess:
    return ManagedProcess(
        ProcessSpec(name=name, argv=[sys.executable, *argv], log_path=workdir / f"{name}.log")
    )


def _start_paths(
    triton: TritonSpec, workdir: Path, notes: list[str]
) -> tuple[list[ManagedProcess], dict[str, str]]:
    """The processes of every path (Triton first) and each path's address."""
    processes = [triton_process(triton, prepare_installation())]
    paths = {"direct": triton.grpc_address}
    sidecar_port, proxy_port = free_port(), free_port()
    config = workdir / "sidecar.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{sidecar_port}\nstatic_routes:\n  {MODEL}: [{triton.grpc_address}]\n"
    )
    processes.append(
        _python_process(
            "sidecar",
            ["-m", "app", "sidecar", "--config", str(config), "--log-level", "WARNING"],
            workdir,
        )
    )
    paths["sidecar"] = f"127.0.0.1:{sidecar_port}"
    processes.append(
        _python_process(
            "minimal-proxy",
            ["-c", MINIMAL_PROXY, str(proxy_port), triton.grpc_address, INFER_METHOD],
            workdir,
        )
    )
    paths["minimal proxy"] = f"127.0.0.1:{proxy_port}"
    if shutil.which("nghttpx"):
        port = free_port()
        argv = nghttpx_command(port, triton.grpc_address, workdir)
        processes.append(
            ManagedProcess(ProcessSpec("nghttpx", argv, log_path=workdir / "nghttpx.log"))
        )
        paths["nghttpx"] = f"127.0.0.1:{port}"
    else:
        notes.append(f"nghttpx not found: its column is skipped ({INSTALL_HINT})")
    return processes, paths


Cells = dict[tuple[str, int, str], list[LoadSummary]]


def run_overhead(settings: OverheadSettings, say: Say = lambda _line: None) -> ScenarioResult:
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-overhead-"))
    triton = TritonSpec.on_free_ports(
        "bench-triton", load_models=(MODEL,), log_path=workdir / "triton.log"
    )
    notes: list[str] = []
    processes, paths = _start_paths(triton, workdir, notes)
    drivers = ["python"]
    if shutil.which("h2load"):
        drivers.append("h2load")
    else:
        notes.append(f"h2load not found: only the Python driver ran ({INSTALL_HINT})")
    cells: Cells = {}
    try:
        for proc in processes:
            proc.start()
        wait_until_ready(triton.grpc_address, [MODEL], 60, processes[0])
        triton_version = server_version(triton.grpc_address)
        for proc, address in zip(processes[1:], list(paths.values())[1:], strict=True):
            _wait_for_answer(address, proc)
        names = list(paths)
        for round_index in range(settings.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for driver in drivers:
                for concurrency in settings.concurrencies:
                    for path in order:
                        say(f"overhead: round {round_index + 1} {driver} c={concurrency} {path}")
                        summary = (
                            _python_run(paths[path], concurrency, settings)
                            if driver == "python"
                            else h2load_run(
                                paths[path],
                                request_body(),
                                settings.duration_s,
                                concurrency,
                                metrics_url=triton.metrics_url,
                                model=MODEL,
                                tmp=workdir,
                            )
                        )
                        cells.setdefault((driver, concurrency, path), []).append(summary)
    finally:
        stop_all(processes[::-1])
    notes.append(f"logs: {workdir}")
    result = _result(cells, settings, drivers, list(paths), notes)
    result.data["triton_version"] = triton_version
    return result


def _interval(values: Sequence[float], seed: int) -> Interval:
    return bootstrap_median(values, random.Random(seed))


def _ci(interval: Interval) -> str:
    return interval.text()


def _result(
    cells: Cells,
    settings: OverheadSettings,
    drivers: list[str],
    paths: list[str],
    notes: list[str],
) -> ScenarioResult:
    rows = []
    figures: list[dict[str, object]] = []
    added: dict[tuple[str, int, str], tuple[Interval, Interval, Interval]] = {}
    for (driver, concurrency, path), runs in cells.items():
        direct = cells[(driver, concurrency, "direct")]
        p50 = _interval([r.p50_ms for r in runs], settings.seed)
        p99 = _interval([r.p99_ms for r in runs], settings.seed)
        rps = _interval([r.throughput_rps for r in runs], settings.seed)
        plus50 = _interval([r.p50_ms - d.p50_ms for r, d in zip(runs, direct, strict=True)], 1)
        plus99 = _interval([r.p99_ms - d.p99_ms for r, d in zip(runs, direct, strict=True)], 1)
        share = _interval(
            [r.throughput_rps / d.throughput_rps for r, d in zip(runs, direct, strict=True)], 1
        )
        added[(driver, concurrency, path)] = (plus50, plus99, share)
        is_direct = path == "direct"
        rows.append(
            (
                driver,
                concurrency,
                path,
                _ci(p50),
                _ci(p99),
                _ci(rps),
                "-" if is_direct else _ci(plus50),
                "-" if is_direct else _ci(plus99),
                "-" if is_direct else _ci(share),
                sum(r.errors for r in runs),
            )
        )
        figures.append(
            {
                "driver": driver,
                "concurrency": concurrency,
                "path": path,
                "p50_ms": p50.to_dict(),
                "p99_ms": p99.to_dict(),
                "throughput_rps": rps.to_dict(),
                "added_p50_ms": plus50.to_dict(),
                "added_p99_ms": plus99.to_dict(),
                "throughput_vs_direct": share.to_dict(),
                "rounds": [r.to_dict() for r in runs],
            }
        )
    bars = []
    for driver in drivers:
        high = max(settings.concurrencies)
        bars.append(
            BarGroup(
                f"added p50, {driver}, concurrency 1",
                "ms",
                tuple(paths[1:]),
                tuple(added[(driver, 1, p)][0].median for p in paths[1:]),
            )
        )
        bars.append(
            BarGroup(
                f"throughput vs direct, {driver}, concurrency {high}",
                "share",
                tuple(paths[1:]),
                tuple(added[(driver, high, p)][2].median for p in paths[1:]),
            )
        )
    return ScenarioResult(
        name="overhead",
        title="Overhead: direct vs sidecar vs minimal proxy vs nghttpx on add_one",
        tables=(
            Table(
                f"add_one FP32[16], one Triton, {settings.duration_s:g} s per run, "
                f"{settings.rounds} rounds; median [95 % bootstrap interval] over rounds",
                (
                    "driver",
                    "concurrency",
                    "path",
                    "p50 ms",
                    "p99 ms",
                    "req/s",
                    "added p50 ms",
                    "added p99 ms",
                    "throughput vs direct",
                    "errors",
                ),
                tuple(rows),
            ),
        ),
        bars=tuple(bars),
        targets=_targets(added, settings, drivers),
        notes=tuple(notes),
        data={
            "settings": {
                "duration_s": settings.duration_s,
                "rounds": settings.rounds,
                "concurrencies": list(settings.concurrencies),
            },
            "cells": figures,
        },
    )


def _targets(
    added: dict[tuple[str, int, str], tuple[Interval, Interval, Interval]],
    settings: OverheadSettings,
    drivers: list[str],
) -> tuple[TargetCheck, ...]:
    low, high = min(settings.concurrencies), max(settings.concurrencies)
    plus50, plus99, _ = added[("python", low, "sidecar")]
    throughput_driver = "h2load" if "h2load" in drivers else "python"
    share = added[(throughput_driver, high, "sidecar")][2].median
    return (
        TargetCheck(
            f"sidecar adds, p50 (python, concurrency {low})",
            f"<= {TARGET_ADDED_P50_MS} ms",
            f"{plus50.median:.3f} ms",
            plus50.median <= TARGET_ADDED_P50_MS,
        ),
        TargetCheck(
            f"sidecar adds, p99 (python, concurrency {low})",
            f"<= {TARGET_ADDED_P99_MS} ms",
            f"{plus99.median:.3f} ms",
            plus99.median <= TARGET_ADDED_P99_MS,
        ),
        TargetCheck(
            f"sidecar throughput vs direct ({throughput_driver}, concurrency {high})",
            f">= {TARGET_THROUGHPUT_RATIO:.0%}",
            f"{share:.1%}",
            share >= TARGET_THROUGHPUT_RATIO,
        ),
    )


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = OverheadSettings(seed=options.seed, progress=options.progress)
    if options.quick:
        settings = replace(settings, duration_s=1.0, warmup_s=0.3, rounds=1)
    if options.duration_s:
        settings = replace(settings, duration_s=options.duration_s)
    if options.repetitions:
        settings = replace(settings, rounds=options.repetitions)
    return run_overhead(settings, say)
