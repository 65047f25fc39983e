"""Overload: high-priority latency and low-priority shedding at three times capacity.

Not a test: it prints figures. One real Triton serves `codegen` behind the router and a
sidecar (its own process) under a policy with two classes, `high` (Triton priority 1) and
`low` (priority 2, sheddable, the default). For each `--max-in-flight` setting a fresh
sidecar is started and measured:

1. unloaded: high-priority p50/p99 of one closed-loop client (concurrency 1);
2. loaded: open-loop Poisson arrivals at `--load-factor` (3) times the capacity, a share
   `--high-share` of them high priority, for `--duration` seconds.

Capacity is measured once, straight at Triton (closed loop at concurrency 8, the model's
largest batch): what the instance serves, whatever the sidecar does. The sidecar's peak RSS
is sampled during the loaded phase.

    .venv/bin/python bench/overload.py [--max-in-flight 2,4,8] [--max-queued 32]
                                       [--duration 8] [--high-share 0.1]

The load generator runs on the same machine as Triton and the sidecar: on a small VM it takes
CPU from them, so loaded latencies are pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from app.fleet import Fleet, FleetConfig
from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import wait_until_ready
from bench.priority_load import (
    PRIORITY_POLICY as POLICY,
)
from bench.priority_load import (
    RssSampler,
    codegen_request,
    figures,
    measure_capacity,
    run_closed,
    run_open_loop,
)

REQUEST = codegen_request("def quicksort(items):", 16)


def _pin(pid: int, cpus: set[int]) -> None:
    """Pins every thread of `pid` and of its children (Triton's backend stubs) to `cpus`."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    for target in (pid, *children):
        for tid in os.listdir(f"/proc/{target}/task"):
            os.sched_setaffinity(int(tid), cpus)
        for child in children if target == pid else ():
            _pin(child, cpus)


def _start_sidecar(
    fleet: Fleet, run_dir: Path, max_in_flight: int, max_queued: int
) -> tuple[ManagedProcess, str]:
    address = f"127.0.0.1:{free_port()}"
    proc = ManagedProcess(
        ProcessSpec(
            name=f"sidecar-{max_in_flight}",
            argv=[
                sys.executable,
                "-m",
                "app",
                "sidecar",
                "--listen",
                address,
                "--router",
                fleet.router_address,
                "--cold-start-wait",
                "0",
                "--max-in-flight",
                str(max_in_flight),
                "--max-queued",
                str(max_queued),
            ],
            env={"PYTHONUNBUFFERED": "1"},
            log_path=run_dir / f"sidecar-{max_in_flight}.log",
        )
    )
    proc.start()
    wait_until_ready(address, ["codegen"], 60, proc, server_ready=True)
    return proc, address


def _measure(args: argparse.Namespace, fleet: Fleet, run_dir: Path, capacity: float) -> None:
    offered = args.load_factor * capacity
    shares = (("high", args.high_share), ("low", 1 - args.high_share))
    print(
        f"capacity {capacity:.1f} rps (Triton direct, c=8); offered {offered:.1f} rps for "
        f"{args.duration:g} s, {args.high_share:.0%} high; max_queued {args.max_queued}"
    )
    print(
        "max_in_flight | high p50/p99 unloaded ms | high p50/p99 loaded ms | p99 ratio | "
        "high shed | low served/shed/other | served rps | sidecar RSS MiB (start -> peak)"
    )
    for max_in_flight in args.max_in_flight:
        proc, address = _start_sidecar(fleet, run_dir, max_in_flight, args.max_queued)
        try:
            asyncio.run(run_closed(address, REQUEST, priority="high", concurrency=1, duration_s=1))
            unloaded = figures(
                asyncio.run(
                    run_closed(address, REQUEST, priority="high", concurrency=1, duration_s=4)
                ),
                "high",
            )
            assert proc.pid is not None
            started = time.perf_counter()
            with RssSampler(proc.pid) as rss:
                answers = asyncio.run(
                    run_open_loop(
                        address,
                        REQUEST,
                        rate_per_s=offered,
                        duration_s=args.duration,
                        classes=shares,
                        rng=random.Random(args.seed),
                    )
                )
            elapsed = time.perf_counter() - started
            high, low = figures(answers, "high"), figures(answers, "low")
            print(
                f"{max_in_flight:13d} | {unloaded.p50_ms:9.1f} / {unloaded.p99_ms:6.1f}"
                f"     | {high.p50_ms:9.1f} / {high.p99_ms:6.1f}   | "
                f"{high.p99_ms / unloaded.p99_ms:9.2f} | {high.shed:4d}/{high.sent:<4d} | "
                f"{low.ok:5d}/{low.shed:5d}/{low.other_errors:<5d}  | "
                f"{(high.ok + low.ok) / elapsed:10.1f} | "
                f"{rss.start / 2**20:.1f} -> {rss.peak / 2**20:.1f}",
                flush=True,
            )
        finally:
            stop_all([proc])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--max-in-flight",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[2, 4, 8],
        help="sidecar settings to measure, comma-separated (default 2,4,8)",
    )
    parser.add_argument("--max-queued", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--high-share", type=float, default=0.1)
    parser.add_argument("--load-factor", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="Triton on CPU 1, everything else on CPU 0 (a 2-CPU machine)",
    )
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="pointsman-overload-"))
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY)
    fleet = Fleet(
        FleetConfig(
            instances=1,
            placement={"triton-0": ("codegen",)},
            sidecar_port=0,
            router_port=0,
            run_dir=run_dir,
            policy_file=policy,
            sidecar_args=("--cold-start-wait", "0"),
        )
    )
    fleet.start()
    if args.pin:
        # Triton gets CPU 1 to itself; the router, the sidecars and this load generator
        # share CPU 0, so the load's own CPU cost does not slow the model down.
        for proc in fleet.processes:
            if proc.pid is not None:
                _pin(proc.pid, {1} if proc.name.startswith("triton") else {0})
        _pin(os.getpid(), {0})
    try:
        triton = fleet.tritons[0].grpc_address
        asyncio.run(measure_capacity(triton, REQUEST, concurrency=8, duration_s=1))
        capacity = asyncio.run(measure_capacity(triton, REQUEST, concurrency=8, duration_s=4))
        _measure(args, fleet, run_dir, capacity)
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
