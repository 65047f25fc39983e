"""`pointsman bench`: runs the chosen scenarios and writes results.json, .md and .png.

    pointsman bench --scenario all --out bench/results/reference
    pointsman bench --scenario overhead --duration 5 --quick

`--quick` shrinks every scenario to a smoke run (seconds, not minutes); `--duration` sets the
measured seconds of seed-table and of each overhead cell. Exit status: 0 when every scenario
ran (whether or not targets were met: they are reported, not enforced), 1 when one failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench.report import BenchRun, ScenarioResult, machine_info, utc_now, write_report

__all__ = ["SCENARIOS", "add_arguments", "run"]

SCENARIOS = ("seed-table", "overhead", "scale")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        choices=(*SCENARIOS, "all"),
        default="all",
        help="seed-table: round robin vs Pointsman vs Pointsman + batching on 3 real Tritons; "
        "overhead: direct vs sidecar vs nghttpx on add_one; scale: the router's engines on "
        "simulated fleets (default: all)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_seconds,
        help="measured seconds: seed-table per system (default 30), overhead per cell (8)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for results.json, results.md, results.png (default: ./pointsman-bench-TIME)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument("--seed", type=int, default=7, help="random seed of every workload")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _seed_table(args: argparse.Namespace) -> ScenarioResult:
    from bench.scenarios.seed_table import SeedTableSettings, run_seed_table

    settings = SeedTableSettings(seed=args.seed, progress=not args.no_progress)
    if args.quick:
        settings = replace(
            settings, models=4, models_per_instance=2, concurrency=8, warmup_s=5, duration_s=5
        )
    if args.duration:
        settings = replace(settings, duration_s=args.duration)
    return run_seed_table(settings, _say)


def _overhead(args: argparse.Namespace) -> ScenarioResult:
    from bench.scenarios.overhead import OverheadSettings, run_overhead

    settings = OverheadSettings(progress=not args.no_progress)
    if args.quick:
        settings = replace(settings, duration_s=1.0, warmup_s=0.3)
    if args.duration:
        settings = replace(settings, duration_s=args.duration)
    return run_overhead(settings, _say)


def _scale(args: argparse.Namespace) -> ScenarioResult:
    from bench.scenarios.scale import FULL, QUICK, run_scale

    return run_scale(replace(QUICK if args.quick else FULL, seed=args.seed), _say)


def _command_line(args: argparse.Namespace, out: Path) -> str:
    """The command that reproduces this run."""
    words = ["pointsman", "bench", "--scenario", args.scenario, "--seed", str(args.seed)]
    if args.duration:
        words += ["--duration", f"{args.duration:g}"]
    if args.quick:
        words.append("--quick")
    return shlex.join([*words, "--out", str(out)])


def run(args: argparse.Namespace) -> int:
    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    out: Path = args.out or Path(f"pointsman-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    started = utc_now()
    results: list[ScenarioResult] = []
    triton_version = ""
    failed: list[str] = []
    runners: dict[str, Callable[[argparse.Namespace], ScenarioResult]] = {
        "seed-table": _seed_table,
        "overhead": _overhead,
        "scale": _scale,
    }
    for name in chosen:
        _say(f"pointsman bench: {name}")
        try:
            result = runners[name](args)
        except Exception as exc:  # one broken scenario must not lose the others' figures
            traceback.print_exc()
            _say(f"pointsman bench: {name} failed: {exc}")
            failed.append(name)
            continue
        results.append(result)
        triton_version = triton_version or str(result.data.get("triton_version", ""))
    bench_run = BenchRun(
        _command_line(args, out), started, machine_info(triton_version), tuple(results)
    )
    paths = write_report(bench_run, out)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    if failed:
        _say(f"pointsman bench: failed: {', '.join(failed)}")
        return 1
    return 0
