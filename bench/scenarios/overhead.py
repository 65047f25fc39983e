"""Scenario `overhead`: what the data plane adds, on a model that does almost nothing.

One real Triton serves `add_one` (FP32[16] + 1). The same requests go four ways: straight to
Triton; through the Pointsman sidecar (its own process, a static route, as in a pod); through
the least a Python proxy can be (`paths.MINIMAL_PROXY`: 20 lines of grpc.aio with uvloop, one fixed
upstream, no parsing, no routing), which separates the sidecar's own cost from grpc.aio's;
and through nghttpx (a C HTTP/2 proxy, the reference for a compiled data plane). Two drivers:
the project's load generator (grpc.aio, raw bytes) and h2load (C); each at concurrency 1 and
64. Each round runs every path once, in a rotated order, so drift hits every path alike;
the figures are medians over rounds with 95 % bootstrap intervals, and the added latency is
taken per round against that round's direct run.

The method (the driver, rotated rounds, figures against direct) is bench.scenarios.paths,
which the proxyless scenario uses too.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import TritonSpec
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck
from bench.scenarios import Options, Say
from bench.scenarios.h2load import INSTALL_HINT, h2load_run, nghttpx_process
from bench.scenarios.paths import (
    MODEL,
    PATH_COLUMNS,
    PathFigures,
    PathSettings,
    measure_rounds,
    minimal_proxy_process,
    path_figures,
    python_run,
    request_body,
    settings_for,
    wait_for_answer,
)
from bench.scenarios.quick_fleet import SharedFleet, one_triton
from bench.stats import LoadSummary
from bench.testbed import server_version

__all__ = ["run_overhead", "scenario"]

# The foundation issue's targets for the sidecar.
TARGET_ADDED_P50_MS = 0.35
TARGET_ADDED_P99_MS = 0.7
TARGET_THROUGHPUT_RATIO = 0.25


def _python_process(name: str, argv: Sequence[str], workdir: Path) -> ManagedProcess:
    return ManagedProcess(
        ProcessSpec(name=name, argv=[sys.executable, *argv], log_path=workdir / f"{name}.log")
    )


def _proxies(
    triton: TritonSpec, workdir: Path, notes: list[str]
) -> tuple[list[ManagedProcess], dict[str, str]]:
    """The processes in front of Triton, and every path's address (direct first)."""
    paths = {"direct": triton.grpc_address}
    sidecar_port = free_port()
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
    ]
    paths["sidecar"] = f"127.0.0.1:{sidecar_port}"
    minimal_proxy, paths["minimal proxy"] = minimal_proxy_process(triton.grpc_address, workdir)
    processes.append(minimal_proxy)
    if nghttpx := nghttpx_process(triton.grpc_address, workdir, notes):
        processes.append(nghttpx[0])
        paths["nghttpx"] = nghttpx[1]
    return processes, paths


Cells = dict[tuple[str, int, str], list[LoadSummary]]


def _drivers(settings: PathSettings, notes: list[str]) -> list[str]:
    if not settings.h2load:
        notes.append("h2load: not run (quick mode); the Python driver only")
        return ["python"]
    if not shutil.which("h2load"):
        notes.append(f"h2load not found: only the Python driver ran ({INSTALL_HINT})")
        return ["python"]
    return ["python", "h2load"]


def run_overhead(
    settings: PathSettings, say: Say = lambda _line: None, shared: SharedFleet | None = None
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
    settings: PathSettings,
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
    settings: PathSettings,
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


def scenario(options: Options, say: Say) -> ScenarioResult:
    return run_overhead(settings_for(options), say, options.shared)
