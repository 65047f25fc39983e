"""Scenario `overhead`: what the data plane adds, on a model that does almost nothing.

One real Triton serves `add_one` (FP32[16] + 1). The same requests go three ways: straight to
Triton, through the Pointsman sidecar (its own process, a static route, as in a pod) and
through nghttpx (Debian `nghttp2-proxy`: a C HTTP/2 proxy, the reference for a compiled data
plane). Two drivers: the project's Python load generator (grpc.aio, raw bytes) and h2load
(Debian `nghttp2-client`, C) posting a length-prefixed gRPC body over HTTP/2; each at
concurrency 1 (one call at a time) and 64 (64 streams on one connection). Reported: p50/p99,
throughput, and what each proxy adds over direct.

h2load cannot read gRPC trailers (a gRPC error still answers HTTP 200), so Triton's success
counter must grow by at least the number of answers h2load counted; otherwise the run fails.
A missing nghttpx or h2load skips its column with the command to install it.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as triton_pb

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from bench.loadgen import (
    INFER_METHOD,
    CallRecord,
    LoadSummary,
    infer_request_bytes,
    run_closed_loop,
    summarize,
    unary_call,
)
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck, ratio

__all__ = ["OverheadSettings", "h2load_command", "nghttpx_command", "run_overhead"]

MODEL = "add_one"
VALUES = np.arange(16, dtype=np.float32)
# The foundation issue's targets for the sidecar.
TARGET_ADDED_P50_MS = 0.35
TARGET_ADDED_P99_MS = 0.7
TARGET_THROUGHPUT_RATIO = 0.25
INSTALL_HINT = "apt-get install -y nghttp2-proxy nghttp2-client"


@dataclass(frozen=True, slots=True)
class OverheadSettings:
    duration_s: float = 8.0
    warmup_s: float = 1.0
    concurrencies: tuple[int, ...] = (1, 64)
    progress: bool = False


def request_body() -> bytes:
    tensor = grpcclient.InferInput("INPUT0", [len(VALUES)], "FP32")
    tensor.set_data_from_numpy(VALUES)
    return infer_request_bytes(MODEL, [tensor], ["OUTPUT0"])


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: no compression flag, 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def check_answer(response: bytes) -> None:
    answer = triton_pb.ModelInferResponse.FromString(response)
    out = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)
    if not np.array_equal(out, VALUES + 1):
        raise RuntimeError(f"add_one answered {out}, expected {VALUES + 1}")


def nghttpx_command(port: int, upstream: str, log_dir: Path) -> list[str]:
    """nghttpx as a plaintext HTTP/2 (h2c) proxy to one gRPC upstream; one worker."""
    host, _, upstream_port = upstream.rpartition(":")
    return [
        "nghttpx",
        "--conf=/dev/null",
        f"--frontend=127.0.0.1,{port};no-tls",
        f"--backend={host},{upstream_port};;proto=h2",
        "--workers=1",
        "--no-ocsp",
        "--no-via",
        "--no-server-push",
        f"--errorlog-file={log_dir / 'nghttpx-error.log'}",
        "--accesslog-file=/dev/null",
        f"--pid-file={log_dir / 'nghttpx.pid'}",
    ]


def h2load_command(
    address: str, body_file: Path, duration_s: float, concurrency: int, log_file: Path
) -> list[str]:
    """h2load with one connection and `concurrency` streams, posting gRPC frames; every
    request's latency goes to `log_file` (start us, HTTP status, duration us; tab-separated).
    h2load takes whole seconds: see `h2load_seconds`."""
    return [
        "h2load",
        f"--duration={h2load_seconds(duration_s)}",
        "--warm-up-time=1",
        "--clients=1",
        f"--max-concurrent-streams={concurrency}",
        "--threads=1",
        f"--data={body_file}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--log-file={log_file}",
        f"http://{address}{INFER_METHOD}",
    ]


def h2load_seconds(duration_s: float) -> int:
    return max(1, round(duration_s))


def parse_h2load_log(text: str, duration_s: float) -> LoadSummary:
    """h2load's per-request log as a LoadSummary: HTTP 200 is OK, anything else HTTP_<code>."""
    records = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        status = "OK" if fields[1] == "200" else f"HTTP_{fields[1]}"
        records.append(CallRecord(0.0, int(fields[2]) / 1e6, status))
    return summarize(records, duration_s)


def triton_successes(metrics_url: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    pattern = rf'^nv_inference_request_success\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)'
    return int(sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M)))


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


def _python_run(
    address: str, concurrency: int, settings: OverheadSettings, label: str
) -> LoadSummary:
    async def run() -> LoadSummary:
        async with grpc.aio.insecure_channel(address) as channel:
            make = unary_call(channel, request_body(), timeout_s=30)
            return await run_closed_loop(
                lambda _worker: make(),
                concurrency=concurrency,
                duration_s=settings.duration_s,
                warmup_s=settings.warmup_s,
                label=label,
                progress=settings.progress,
            )

    return asyncio.run(run())


def _h2load_run(
    address: str, concurrency: int, settings: OverheadSettings, metrics_url: str, tmp: Path
) -> LoadSummary:
    body_file = tmp / "body.bin"
    body_file.write_bytes(grpc_frame(request_body()))
    log_file = tmp / "h2load.log"
    log_file.unlink(missing_ok=True)
    before = triton_successes(metrics_url)
    done = subprocess.run(
        h2load_command(address, body_file, settings.duration_s, concurrency, log_file),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
    summary = parse_h2load_log(log_file.read_text(), h2load_seconds(settings.duration_s))
    time.sleep(0.6)  # Triton refreshes its metrics every 250 ms here
    served = triton_successes(metrics_url) - before
    if served < summary.ok:  # h2load's warm-up requests are served too, hence "<"
        raise RuntimeError(
            f"{address}: h2load counted {summary.ok} answers but Triton served {served}: "
            "some answers were gRPC errors"
        )
    return summary


def run_overhead(
    settings: OverheadSettings, progress: Callable[[str], None] = lambda _line: None
) -> ScenarioResult:
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-overhead-"))
    triton = TritonSpec.on_free_ports(
        "bench-triton", load_models=(MODEL,), log_path=workdir / "triton.log"
    )
    processes = [triton_process(triton, prepare_installation())]
    paths: dict[str, str] = {"direct": triton.grpc_address}
    sidecar_port = free_port()
    sidecar_config = workdir / "sidecar.yaml"
    sidecar_config.write_text(
        f"listen: 127.0.0.1:{sidecar_port}\nstatic_routes:\n  {MODEL}: [{triton.grpc_address}]\n"
    )
    processes.append(
        ManagedProcess(
            ProcessSpec(
                name="sidecar",
                argv=[
                    sys.executable,
                    "-m",
                    "app",
                    "sidecar",
                    "--config",
                    str(sidecar_config),
                    "--log-level",
                    "WARNING",
                ],
                log_path=workdir / "sidecar.log",
            )
        )
    )
    paths["sidecar"] = f"127.0.0.1:{sidecar_port}"
    notes: list[str] = []
    if shutil.which("nghttpx"):
        nghttpx_port = free_port()
        processes.append(
            ManagedProcess(
                ProcessSpec(
                    name="nghttpx",
                    argv=nghttpx_command(nghttpx_port, triton.grpc_address, workdir),
                    log_path=workdir / "nghttpx.log",
                )
            )
        )
        paths["nghttpx"] = f"127.0.0.1:{nghttpx_port}"
    else:
        notes.append(f"nghttpx not found: its column is skipped ({INSTALL_HINT})")
    drivers = ["python"]
    if shutil.which("h2load"):
        drivers.append("h2load")
    else:
        notes.append(f"h2load not found: only the Python driver ran ({INSTALL_HINT})")

    results: dict[tuple[str, int, str], LoadSummary] = {}
    try:
        for proc in processes:
            proc.start()
        wait_until_ready(triton.grpc_address, [MODEL], 60, processes[0])
        with grpcclient.InferenceServerClient(triton.grpc_address) as client:
            triton_version = str(client.get_server_metadata().version)
        for proc, address in zip(processes[1:], list(paths.values())[1:], strict=True):
            _wait_for_answer(address, proc)
        for driver in drivers:
            for concurrency in settings.concurrencies:
                for path, address in paths.items():
                    label = f"overhead: {driver} c={concurrency} {path}"
                    progress(label)
                    if driver == "python":
                        summary = _python_run(address, concurrency, settings, label)
                    else:
                        summary = _h2load_run(
                            address, concurrency, settings, triton.metrics_url, workdir
                        )
                    results[(driver, concurrency, path)] = summary
    finally:
        stop_all(processes[::-1])
    notes.append(f"logs: {workdir}")
    result = _result(results, settings, drivers, list(paths), notes)
    result.data["triton_version"] = triton_version
    return result


def _result(
    results: dict[tuple[str, int, str], LoadSummary],
    settings: OverheadSettings,
    drivers: list[str],
    paths: list[str],
    notes: list[str],
) -> ScenarioResult:
    rows = []
    for (driver, concurrency, path), summary in results.items():
        direct = results[(driver, concurrency, "direct")]
        rows.append(
            (
                driver,
                concurrency,
                path,
                summary.p50_ms,
                summary.p99_ms,
                summary.throughput_rps,
                math.nan if path == "direct" else summary.p50_ms - direct.p50_ms,
                math.nan if path == "direct" else summary.p99_ms - direct.p99_ms,
                ratio(summary.throughput_rps, direct.throughput_rps),
                summary.errors,
            )
        )
    bars = []
    for driver in drivers:
        for concurrency in settings.concurrencies:
            key = [(driver, concurrency, p) for p in paths]
            if concurrency == 1:
                bars.append(
                    BarGroup(
                        f"p99 latency, {driver}, concurrency 1",
                        "ms",
                        tuple(paths),
                        tuple(results[k].p99_ms for k in key),
                    )
                )
            else:
                bars.append(
                    BarGroup(
                        f"throughput, {driver}, concurrency {concurrency}",
                        "requests/s",
                        tuple(paths),
                        tuple(results[k].throughput_rps for k in key),
                    )
                )
    return ScenarioResult(
        name="overhead",
        title="Overhead: direct vs sidecar vs nghttpx on add_one",
        tables=(
            Table(
                f"add_one FP32[16], one Triton, {settings.duration_s:g} s per cell",
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
        targets=_targets(results, settings, drivers),
        notes=tuple(notes),
        data={
            "duration_s": settings.duration_s,
            "cells": [
                {"driver": d, "concurrency": c, "path": p, **s.to_dict()}
                for (d, c, p), s in results.items()
            ],
        },
    )


def _targets(
    results: dict[tuple[str, int, str], LoadSummary],
    settings: OverheadSettings,
    drivers: list[str],
) -> tuple[TargetCheck, ...]:
    checks = []
    low = min(settings.concurrencies)
    high = max(settings.concurrencies)
    latency_driver = "python"  # a gRPC client, as applications call Triton
    direct = results[(latency_driver, low, "direct")]
    sidecar = results[(latency_driver, low, "sidecar")]
    for name, added, target in (
        ("sidecar adds, p50", sidecar.p50_ms - direct.p50_ms, TARGET_ADDED_P50_MS),
        ("sidecar adds, p99", sidecar.p99_ms - direct.p99_ms, TARGET_ADDED_P99_MS),
    ):
        checks.append(
            TargetCheck(
                f"{name} ({latency_driver}, concurrency {low})",
                f"<= {target} ms",
                f"{added:.3f} ms",
                added <= target,
            )
        )
    throughput_driver = "h2load" if "h2load" in drivers else "python"
    share = ratio(
        results[(throughput_driver, high, "sidecar")].throughput_rps,
        results[(throughput_driver, high, "direct")].throughput_rps,
    )
    checks.append(
        TargetCheck(
            f"sidecar throughput vs direct ({throughput_driver}, concurrency {high})",
            f">= {TARGET_THROUGHPUT_RATIO:.0%}",
            f"{share:.1%}",
            share >= TARGET_THROUGHPUT_RATIO,
        )
    )
    return tuple(checks)
