"""Scenario `proxyless`: direct, proxyless (xDS), sidecar and nghttpx side by side.

One real Triton serves `add_one`; the router watches it and serves xDS; the sidecar follows
the router (as in a pod); nghttpx proxies to Triton (a compiled data plane, for reference).
One driver for all four, so they compare: the project's Python load generator (grpc.aio, raw
bytes), in this process, at concurrency 1 and 64. The proxyless channel is `xds:///add_one`
with GRPC_XDS_BOOTSTRAP naming the router: gRPC's own xDS client picks the instance and
connects straight to Triton.

Per cell: p50/p99, throughput, what each path adds over direct, and CPU per request: the
client's (this process: load generator plus gRPC, including the xDS client's balancer), the
proxy's (sidecar or nghttpx, every process of it); and the router's CPU over the cell, in
cores: its background work (index polls, scrapes, xDS pushes only when routes change), which
no request adds to.

    python -m bench.scenarios.proxyless --quick --out /tmp/proxyless   # a smoke run
    python -m bench.scenarios.proxyless --duration 10 --out bench/results/proxyless

The goal (issue 15): proxyless p50 within noise of direct. Figures from a shared, busy machine
vary from run to run: compare cells of one run, never across runs.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import tritonclient.grpc as grpcclient

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from bench.loadgen import LoadSummary
from bench.report import (
    BarGroup,
    BenchRun,
    ScenarioResult,
    Table,
    TargetCheck,
    machine_info,
    ratio,
    utc_now,
    write_report,
)

# The overhead scenario's driver and readiness check, so both scenarios measure alike.
from bench.scenarios.overhead import (
    INSTALL_HINT,
    OverheadSettings,
    _python_run,
    _wait_for_answer,
    nghttpx_command,
)
from router.xds.bootstrap import write_bootstrap

__all__ = ["process_tree_cpu_s", "run_proxyless"]

MODEL = "add_one"
PATHS = ("direct", "proxyless", "sidecar", "nghttpx")
# "Within noise" of direct, at concurrency 1.
TARGET_ADDED_P50_MS = 0.1


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every process under it, now (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += cpu.get(current, 0.0)
        stack += [child for child, parent in parents.items() if parent == current]
    return total


def _python_part(name: str, argv: list[str], workdir: Path) -> ManagedProcess:
    return ManagedProcess(
        ProcessSpec(
            name=name,
            argv=[sys.executable, "-m", "app", *argv],
            log_path=workdir / f"{name}.log",
        )
    )


def run_proxyless(
    settings: OverheadSettings, progress: Callable[[str], None] = lambda _line: None
) -> ScenarioResult:
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-proxyless-"))
    triton = TritonSpec.on_free_ports(
        "triton-0", load_models=(MODEL,), log_path=workdir / "triton.log"
    )
    router_address = f"127.0.0.1:{free_port()}"
    sidecar_address = f"127.0.0.1:{free_port()}"
    processes = {
        "triton": triton_process(triton, prepare_installation()),
        "router": _python_part(
            "router",
            [
                "router",
                "--listen",
                router_address,
                "--instance",
                f"triton-0={triton.grpc_address},{triton.metrics_url}",
                "--no-placement",
            ],
            workdir,
        ),
        "sidecar": _python_part(
            "sidecar",
            ["sidecar", "--listen", sidecar_address, "--router", router_address],
            workdir,
        ),
    }
    addresses = {
        "direct": triton.grpc_address,
        "proxyless": f"xds:///{MODEL}",
        "sidecar": sidecar_address,
    }
    notes = [f"logs: {workdir}"]
    if shutil.which("nghttpx"):
        port = free_port()
        processes["nghttpx"] = ManagedProcess(
            ProcessSpec(
                name="nghttpx",
                argv=nghttpx_command(port, triton.grpc_address, workdir),
                log_path=workdir / "nghttpx.log",
            )
        )
        addresses["nghttpx"] = f"127.0.0.1:{port}"
    else:
        notes.append(f"nghttpx not found: its column is skipped ({INSTALL_HINT})")
    # gRPC reads the bootstrap when this process makes its first xDS channel.
    os.environ["GRPC_XDS_BOOTSTRAP"] = str(
        write_bootstrap(workdir / "xds-bootstrap.json", [router_address])
    )
    results: dict[tuple[int, str], dict[str, object]] = {}
    triton_version = ""
    try:
        processes["triton"].start()
        wait_until_ready(triton.grpc_address, [MODEL], 60, processes["triton"])
        for name in ("router", "sidecar", "nghttpx"):
            if name in processes:
                processes[name].start()
        with grpcclient.InferenceServerClient(triton.grpc_address) as client:
            triton_version = str(client.get_server_metadata().version)
        for path in ("proxyless", "sidecar", "nghttpx"):
            if path in addresses:
                proxy = processes["router" if path == "proxyless" else path]
                _wait_for_answer(addresses[path], proxy, timeout_s=60)
        for concurrency in settings.concurrencies:
            for path, address in addresses.items():
                label = f"proxyless: c={concurrency} {path}"
                progress(label)
                results[(concurrency, path)] = _measured_cell(
                    address, concurrency, settings, label, processes, path
                )
    finally:
        stop_all(list(processes.values())[::-1])
    result = _result(results, settings, list(addresses), notes)
    result.data["triton_version"] = triton_version
    return result


def _measured_cell(
    address: str,
    concurrency: int,
    settings: OverheadSettings,
    label: str,
    processes: dict[str, ManagedProcess],
    path: str,
) -> dict[str, object]:
    """One cell's load summary, CPU per request of client and proxy, the router's cores."""
    proxy = processes.get(path)  # the sidecar or nghttpx; none for direct and proxyless
    router = processes["router"]

    def cpu_now() -> tuple[float, float, float]:
        proxy_pid = proxy.pid if proxy is not None else None
        return (
            time.process_time(),
            process_tree_cpu_s(proxy_pid) if proxy_pid else 0.0,
            process_tree_cpu_s(router.pid) if router.pid else 0.0,
        )

    before, began = cpu_now(), time.monotonic()
    summary = _python_run(address, concurrency, settings, label)
    after, elapsed = cpu_now(), time.monotonic() - began
    # CPU covers warm-up and measured calls alike: divide by the calls of both (estimated
    # from the measured window's rate).
    calls = (summary.ok + summary.errors) * (settings.warmup_s + settings.duration_s)
    calls = max(1.0, calls / settings.duration_s)
    client, proxy_cpu, router_cpu = (b - a for a, b in zip(before, after, strict=True))
    return {
        "summary": summary,
        "client_cpu_us_per_request": client / calls * 1e6,
        "proxy_cpu_us_per_request": proxy_cpu / calls * 1e6 if proxy is not None else math.nan,
        "router_cpu_cores": router_cpu / elapsed,
    }


def _result(
    results: dict[tuple[int, str], dict[str, object]],
    settings: OverheadSettings,
    paths: list[str],
    notes: list[str],
) -> ScenarioResult:
    rows, cells = [], []
    for (concurrency, path), cell in results.items():
        summary = cell["summary"]
        direct = results[(concurrency, "direct")]["summary"]
        assert isinstance(summary, LoadSummary) and isinstance(direct, LoadSummary)
        added_p50 = math.nan if path == "direct" else summary.p50_ms - direct.p50_ms
        added_p99 = math.nan if path == "direct" else summary.p99_ms - direct.p99_ms
        cpu = [cell[k] for k in _CPU_KEYS]
        rows.append(
            (
                concurrency,
                path,
                summary.p50_ms,
                summary.p99_ms,
                added_p50,
                added_p99,
                summary.throughput_rps,
                ratio(summary.throughput_rps, direct.throughput_rps),
                *cpu,
                summary.errors,
            )
        )
        cells.append(
            {
                "concurrency": concurrency,
                "path": path,
                **summary.to_dict(),
                "added_p50_ms": added_p50,
                "added_p99_ms": added_p99,
                **{k: cell[k] for k in _CPU_KEYS},
            }
        )
    return ScenarioResult(
        name="proxyless",
        title="Proxyless: direct vs proxyless (xDS) vs sidecar vs nghttpx on add_one",
        tables=(
            Table(
                f"add_one FP32[16], one Triton, Python driver, {settings.duration_s:g} s per cell",
                (
                    "concurrency",
                    "path",
                    "p50 ms",
                    "p99 ms",
                    "added p50 ms",
                    "added p99 ms",
                    "req/s",
                    "throughput vs direct",
                    "client CPU us/req",
                    "proxy CPU us/req",
                    "router CPU cores",
                    "errors",
                ),
                tuple(rows),
            ),
        ),
        bars=_bars(results, settings, paths),
        targets=_targets(results, settings),
        notes=(
            *notes,
            "CPU per request counts warm-up calls too; the client is this Python process.",
            "Shared, busy machine: compare cells within one run only.",
        ),
        data={"duration_s": settings.duration_s, "cells": cells},
    )


_CPU_KEYS = (
    "client_cpu_us_per_request",
    "proxy_cpu_us_per_request",
    "router_cpu_cores",
)


def _bars(
    results: dict[tuple[int, str], dict[str, object]],
    settings: OverheadSettings,
    paths: list[str],
) -> tuple[BarGroup, ...]:
    bars = []
    for concurrency in settings.concurrencies:
        summaries = [results[(concurrency, p)]["summary"] for p in paths]
        if concurrency == min(settings.concurrencies):
            values = tuple(s.p50_ms for s in summaries)  # type: ignore[attr-defined]
            bars.append(
                BarGroup(f"p50 latency, concurrency {concurrency}", "ms", tuple(paths), values)
            )
        else:
            values = tuple(s.throughput_rps for s in summaries)  # type: ignore[attr-defined]
            bars.append(
                BarGroup(
                    f"throughput, concurrency {concurrency}", "requests/s", tuple(paths), values
                )
            )
    return tuple(bars)


def _targets(
    results: dict[tuple[int, str], dict[str, object]], settings: OverheadSettings
) -> tuple[TargetCheck, ...]:
    low = min(settings.concurrencies)
    direct, proxyless = (results[(low, p)]["summary"] for p in ("direct", "proxyless"))
    assert isinstance(direct, LoadSummary) and isinstance(proxyless, LoadSummary)
    added = proxyless.p50_ms - direct.p50_ms
    return (
        TargetCheck(
            f"proxyless adds, p50 (concurrency {low})",
            f"<= {TARGET_ADDED_P50_MS} ms (within noise of direct)",
            f"{added:.3f} ms",
            added <= TARGET_ADDED_P50_MS,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="measured seconds per cell (default 8)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s per cell")
    parser.add_argument("--out", type=Path, help="folder for results.json, .md, .png")
    args = parser.parse_args(argv)
    settings = OverheadSettings()
    if args.quick:
        settings = replace(settings, duration_s=1.0, warmup_s=0.5)
    if args.duration:
        settings = replace(settings, duration_s=args.duration)
    started = utc_now()
    result = run_proxyless(settings, lambda line: print(line, file=sys.stderr, flush=True))
    machine = replace(machine_info(), triton_server=str(result.data.get("triton_version", "")))
    command = " ".join(["python -m bench.scenarios.proxyless", *(argv or sys.argv[1:])])
    run = BenchRun(command, started, machine, (result,))
    for table in result.tables:
        print(table.title)
        for row in table.rows:
            print(
                "  " + "  ".join(str(round(v, 3)) if isinstance(v, float) else str(v) for v in row)
            )
    if args.out:
        for path in write_report(run, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
