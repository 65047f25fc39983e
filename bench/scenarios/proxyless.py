"""Scenario `proxyless`: direct, proxyless (xDS), sidecar, bare proxy and nghttpx side by side.

A one-Triton fleet serves `add_one` (`app.fleet.Fleet`: the Triton, the router, which serves
xDS, and a sidecar that follows the router, as in a pod); nghttpx proxies to the Triton (a
compiled data plane, for reference). The proxyless path is the channel `xds:///add_one` with
GRPC_XDS_BOOTSTRAP naming the router: gRPC's own xDS client picks the instance and connects
straight to Triton. The bare proxy is overhead's `MINIMAL_PROXY` (grpc.aio with uvloop, one
fixed upstream, raw bytes, nothing else), its own process: the floor that grpc.aio's own
machinery and thread hops set for any Python proxy, so that the sidecar's cost splits into
grpc's and ours. One driver for all five paths and overhead's method (bench.scenarios.paths:
the Python load generator, grpc.aio, raw bytes, in this process; rotated rounds, medians over
rounds with 95 % bootstrap intervals, the added latency taken per round against that round's
direct run), at concurrency 1 and 64.

CPU per request over each run (warm-up included, divided by every call made): this process
(the client: the load generator and gRPC, the xDS client's balancer included), the proxy (the
sidecar, the bare proxy, or nghttpx with its worker), and the Triton (with its model stub);
beside them the router's CPU in cores over the run (its background work, since no request
passes through it) and the proxy's peak RSS.

The goal (issue 15): proxyless p50 within noise of direct, i.e. the 95 % interval of the added
p50 over rounds includes 0; judged from 3 rounds or more. The sidecar's targets (issue 15:
<= 200 us of its CPU per request at concurrency 64, +p50 <= 0.45 ms at concurrency 1) are
reported with the bare proxy's figures beside them, the floor of the same run.
GRPC_XDS_BOOTSTRAP is set in this process, and gRPC reads it when the process makes its first
xDS channel.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from app.fleet import Fleet, FleetConfig
from app.processes import ManagedProcess, stop_all
from bench.procstats import ProcessSampler
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck
from bench.scenarios import Options, Say
from bench.scenarios.h2load import nghttpx_process
from bench.scenarios.paths import (
    MODEL,
    PATH_COLUMNS,
    PathFigures,
    PathSettings,
    measure_rounds,
    minimal_proxy_process,
    path_figures,
    python_run,
    settings_for,
    wait_for_answer,
)
from bench.scenarios.quick_fleet import SharedFleet, fleet_for
from bench.stats import Interval, LoadSummary, bootstrap_median
from bench.testbed import server_version

__all__ = ["CostWindow", "PathRun", "run_proxyless", "scenario"]

MiB = 1024**2
# Whose CPU time each request costs, and where.
CPU_PARTS = ("client", "proxy", "triton")
MIN_ROUNDS_FOR_NOISE = 3
# Issue 15's targets for the sidecar, with every feature on.
TARGET_SIDECAR_CPU_US = 200.0
TARGET_SIDECAR_ADDED_P50_MS = 0.45


class CostWindow:
    """CPU time and peak RSS of named processes over a `with` block, and its wall time."""

    def __init__(self, samplers: Mapping[str, ProcessSampler]) -> None:
        self.samplers = samplers
        self.elapsed_s = math.nan
        self._began = 0.0

    def __enter__(self) -> CostWindow:
        self._stack = ExitStack()
        for sampler in self.samplers.values():
            self._stack.enter_context(sampler)
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed_s = time.perf_counter() - self._began
        self._stack.close()

    def cpu_s(self, name: str) -> float:
        return self.samplers[name].cost.cpu_s if name in self.samplers else math.nan

    def peak_rss_mib(self, name: str) -> float:
        return self.samplers[name].cost.peak_rss_bytes / MiB if name in self.samplers else math.nan


@dataclass(frozen=True, slots=True)
class PathRun:
    """One run of one path: its load summary and what it cost."""

    summary: LoadSummary
    cpu_us_per_request: Mapping[str, float]  # CPU_PARTS; "proxy" NaN where there is none
    router_cpu_cores: float
    proxy_peak_rss_mib: float

    @property
    def client_and_proxy_us(self) -> float:
        """What the path spends outside Triton per request."""
        proxy = self.cpu_us_per_request["proxy"]
        return self.cpu_us_per_request["client"] + (0.0 if math.isnan(proxy) else proxy)

    def to_dict(self) -> dict[str, object]:
        return {
            **self.summary.to_dict(),
            "cpu_us_per_request": dict(self.cpu_us_per_request),
            "router_cpu_cores": self.router_cpu_cores,
            "proxy_peak_rss_mib": self.proxy_peak_rss_mib,
        }


def measure_path(
    address: str, concurrency: int, settings: PathSettings, pids: Mapping[str, int]
) -> PathRun:
    """One run of the Python driver against `address`, with the CPU time of the processes in
    `pids`: "triton", "router", and "proxy" where the path has one, each with its
    descendants (Triton's model stubs, nghttpx's worker), and this process as "client"."""
    samplers = {name: ProcessSampler([pid], descendants=True) for name, pid in pids.items()}
    # Not this process's descendants: they are the processes under test.
    samplers["client"] = ProcessSampler([os.getpid()])
    window = CostWindow(samplers)
    run = python_run(address, concurrency, settings, around=window)
    calls = max(1, run.calls)
    return PathRun(
        summary=run.summary,
        cpu_us_per_request={part: window.cpu_s(part) / calls * 1e6 for part in CPU_PARTS},
        router_cpu_cores=window.cpu_s("router") / window.elapsed_s,
        proxy_peak_rss_mib=window.peak_rss_mib("proxy"),
    )


def _pid(fleet: Fleet, name: str) -> int:
    for process in fleet.processes:
        if process.name == name and process.pid is not None:
            return process.pid
    raise RuntimeError(f"the fleet has no running {name}")


def _process(fleet: Fleet, name: str) -> ManagedProcess:
    return next(p for p in fleet.processes if p.name == name)


def run_proxyless(
    settings: PathSettings, say: Say = lambda _line: None, shared: SharedFleet | None = None
) -> ScenarioResult:
    """Measures every path; on `shared`'s fleet when given, else on a fleet of its own."""
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-proxyless-"))
    notes: list[str] = []
    config = FleetConfig(
        instances=1,
        placement={"triton-0": (MODEL,)},
        models=(MODEL,),
        sidecar_port=0,
        router_port=0,
        run_dir=workdir,
    )
    with fleet_for(shared, config) as fleet:
        if fleet.xds_bootstrap is None:
            raise RuntimeError("the fleet wrote no xDS bootstrap")
        os.environ["GRPC_XDS_BOOTSTRAP"] = str(fleet.xds_bootstrap)
        triton = fleet.tritons[0]
        triton_version = server_version(triton.grpc_address)
        addresses = {
            "direct": triton.grpc_address,
            "proxyless": f"xds:///{MODEL}",
            "sidecar": fleet.sidecar_address,
        }
        # What serves each path (its exit ends the wait for an answer).
        serving = {"proxyless": _process(fleet, "router"), "sidecar": _process(fleet, "sidecar")}
        bare, addresses["bare proxy"] = minimal_proxy_process(
            triton.grpc_address, workdir, "bare-proxy"
        )
        serving["bare proxy"] = bare
        own = [bare]  # the proxies this scenario starts and stops
        if found := nghttpx_process(triton.grpc_address, workdir, notes):
            own.append(found[0])
            addresses["nghttpx"] = found[1]
            serving["nghttpx"] = found[0]
        try:
            for process in own:
                process.start()
            for path, process in serving.items():
                wait_for_answer(addresses[path], process, timeout_s=60)
            base = {
                "triton": _pid(fleet, triton.instance_id),
                "router": _pid(fleet, "router"),
            }
            proxies = {path: process.pid for path, process in serving.items() if process.pid}
            del proxies["proxyless"]  # the router serves xDS, no request passes through it

            def measure(path: str, concurrency: int) -> PathRun:
                pids = base | ({"proxy": proxies[path]} if path in proxies else {})
                return measure_path(addresses[path], concurrency, settings, pids)

            runs = measure_rounds(list(addresses), settings, measure, say, "proxyless")
        finally:
            stop_all(own)
    if shared is not None:
        notes.append(f"quick mode: on the quick run's shared fleet (logs: {fleet.run_dir})")
    notes.append(f"logs: {workdir}")
    result = _result(runs, settings, list(addresses), notes)
    result.data["triton_version"] = triton_version
    return result


@dataclass(frozen=True, slots=True)
class _Cell:
    concurrency: int
    path: str
    figures: PathFigures
    cpu_us_per_request: dict[str, Interval]  # CPU_PARTS and "client + proxy"
    router_cpu_cores: Interval
    proxy_peak_rss_mib: Interval
    runs: Sequence[PathRun]

    def to_dict(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "path": self.path,
            **self.figures.to_dict(),
            "cpu_us_per_request": {k: v.to_dict() for k, v in self.cpu_us_per_request.items()},
            "router_cpu_cores": self.router_cpu_cores.to_dict(),
            "proxy_peak_rss_mib": self.proxy_peak_rss_mib.to_dict(),
            "rounds": [r.to_dict() for r in self.runs],
        }


def _cells(runs: Mapping[tuple[int, str], list[PathRun]], seed: int) -> list[_Cell]:
    def interval(values: Sequence[float]) -> Interval:
        return bootstrap_median(values, random.Random(seed))

    cells = []
    for (concurrency, path), path_runs in runs.items():
        direct = [r.summary for r in runs[(concurrency, "direct")]]
        cpu = {
            part: interval([r.cpu_us_per_request[part] for r in path_runs]) for part in CPU_PARTS
        }
        cpu["client + proxy"] = interval([r.client_and_proxy_us for r in path_runs])
        cells.append(
            _Cell(
                concurrency,
                path,
                path_figures([r.summary for r in path_runs], direct, seed),
                cpu,
                interval([r.router_cpu_cores for r in path_runs]),
                interval([r.proxy_peak_rss_mib for r in path_runs]),
                tuple(path_runs),
            )
        )
    return cells


def _result(
    runs: Mapping[tuple[int, str], list[PathRun]],
    settings: PathSettings,
    paths: list[str],
    notes: list[str],
) -> ScenarioResult:
    cells = _cells(runs, settings.seed)
    low, high = min(settings.concurrencies), max(settings.concurrencies)
    at = {(c.concurrency, c.path): c for c in cells}
    cpu_columns = (*CPU_PARTS, "client + proxy")
    return ScenarioResult(
        name="proxyless",
        title="Proxyless: direct vs proxyless (xDS) vs sidecar vs bare proxy vs nghttpx on add_one",
        tables=(
            Table(
                f"add_one FP32[16], one Triton, Python driver, {settings.duration_s:g} s per run, "
                f"{settings.rounds} rounds; median [95 % bootstrap interval] over rounds",
                ("concurrency", "path", *PATH_COLUMNS),
                tuple((c.concurrency, c.path, *c.figures.cells(c.path == "direct")) for c in cells),
            ),
            Table(
                "CPU microseconds per request (warm-up included), the router's CPU in cores, "
                "the proxy's peak RSS; median [95 % bootstrap interval] over rounds",
                (
                    "concurrency",
                    "path",
                    *(f"{part} CPU us/req" for part in cpu_columns),
                    "router CPU cores",
                    "proxy peak RSS MiB",
                ),
                tuple(
                    (
                        c.concurrency,
                        c.path,
                        *(c.cpu_us_per_request[part].text() for part in cpu_columns),
                        c.router_cpu_cores.text(),
                        c.proxy_peak_rss_mib.text(),
                    )
                    for c in cells
                ),
            ),
        ),
        bars=(
            BarGroup(
                f"p50 latency, concurrency {low}",
                "ms",
                tuple(paths),
                tuple(at[(low, p)].figures.p50_ms.median for p in paths),
            ),
            BarGroup(
                f"throughput, concurrency {high}",
                "requests/s",
                tuple(paths),
                tuple(at[(high, p)].figures.throughput_rps.median for p in paths),
            ),
            BarGroup(
                f"client + proxy CPU per request, concurrency {high}",
                "us",
                tuple(paths),
                tuple(at[(high, p)].cpu_us_per_request["client + proxy"].median for p in paths),
            ),
        ),
        targets=(
            _noise_target(at[(low, "proxyless")].figures.added_p50_ms, low),
            *_sidecar_targets(at, low, high),
        ),
        notes=(
            *notes,
            "The client is this Python process; CPU per request counts the warm-up's calls too.",
            "On a shared, busy machine compare cells within one run only.",
        ),
        data={
            "settings": settings.describe(),
            "cells": [c.to_dict() for c in cells],
        },
    )


def _noise_target(added: Interval, concurrency: int) -> TargetCheck:
    """Within noise: the interval of the added p50 over rounds includes 0."""
    judged = added.samples >= MIN_ROUNDS_FOR_NOISE
    return TargetCheck(
        f"proxyless adds, p50 (concurrency {concurrency})",
        "within noise of direct: the 95 % interval includes 0",
        f"{added.text()} ms"
        + ("" if judged else f" (under {MIN_ROUNDS_FOR_NOISE} rounds: not judged)"),
        (added.low <= 0.0 <= added.high) if judged else None,
    )


def _sidecar_targets(
    at: Mapping[tuple[int, str], _Cell], low: int, high: int
) -> tuple[TargetCheck, ...]:
    """Issue 15's sidecar targets, each with the bare proxy's figure of the same run beside
    it (where it ran): what grpc.aio alone costs, which no Python proxy goes under."""
    if (high, "sidecar") not in at:
        return ()

    def floor(concurrency: int, figure: Callable[[_Cell], Interval], unit: str) -> str:
        bare = at.get((concurrency, "bare proxy"))
        return "" if bare is None else f" (bare proxy: {figure(bare).median:.3g} {unit})"

    def cpu(cell: _Cell) -> Interval:
        return cell.cpu_us_per_request["proxy"]

    def added(cell: _Cell) -> Interval:
        return cell.figures.added_p50_ms

    used, plus = cpu(at[(high, "sidecar")]), added(at[(low, "sidecar")])
    return (
        TargetCheck(
            f"sidecar CPU per request (concurrency {high})",
            f"<= {TARGET_SIDECAR_CPU_US:g} us",
            f"{used.text()} us" + floor(high, cpu, "us"),
            used.median <= TARGET_SIDECAR_CPU_US,
        ),
        TargetCheck(
            f"sidecar adds, p50 (concurrency {low})",
            f"<= {TARGET_SIDECAR_ADDED_P50_MS} ms",
            f"{plus.text()} ms" + floor(low, added, "ms"),
            plus.median <= TARGET_SIDECAR_ADDED_P50_MS,
        ),
    )


def scenario(options: Options, say: Say) -> ScenarioResult:
    return run_proxyless(settings_for(options), say, options.shared)
