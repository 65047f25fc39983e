"""`pointsman bench`: runs the chosen scenarios and writes results.json, .md and .png.

    pointsman bench --scenario all --out bench/results/reference
    pointsman bench --scenario comparison --repetitions 5
    pointsman bench --scenario overhead --quick

`--quick` shrinks every scenario to a smoke run (seconds to a few minutes, not hours);
`--duration` sets the measured seconds of each cell. Exit status: 0 when every scenario ran
(whether or not targets were met: they are reported, not enforced), 1 when one failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from bench.report import BenchRun, ScenarioResult, machine_info, provenance, utc_now, write_report
from bench.scenarios import SCENARIOS, Options, run_scenario

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        action="append",
        choices=(*SCENARIOS, "all"),
        help="; ".join(f"{s.name}: {s.help}" for s in SCENARIOS.values())
        + " (repeatable; default: all)",
    )
    parser.add_argument(
        "--duration", type=_positive_seconds, help="measured seconds of each cell or run"
    )
    parser.add_argument("--repetitions", type=_positive_int, help="repetitions (rounds) per cell")
    parser.add_argument(
        "--systems", type=_names, default=(), help="comparison, prefix: systems, comma-separated"
    )
    parser.add_argument(
        "--workloads", type=_names, default=(), help="comparison: workloads, comma-separated"
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _chosen(args: argparse.Namespace) -> list[str]:
    named = args.scenario or ["all"]
    return list(SCENARIOS) if "all" in named else list(dict.fromkeys(named))


def _command_line(args: argparse.Namespace, out: Path) -> str:
    """The command that reproduces this run."""
    words = ["pointsman", "bench"]
    for name in args.scenario or ["all"]:
        words += ["--scenario", name]
    words += ["--seed", str(args.seed)]
    if args.duration:
        words += ["--duration", f"{args.duration:g}"]
    if args.repetitions:
        words += ["--repetitions", str(args.repetitions)]
    if args.systems:
        words += ["--systems", ",".join(args.systems)]
    if args.workloads:
        words += ["--workloads", ",".join(args.workloads)]
    if args.quick:
        words.append("--quick")
    return shlex.join([*words, "--out", str(out)])


def run(args: argparse.Namespace) -> int:
    out: Path = args.out or Path(f"pointsman-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    options = Options(
        quick=args.quick,
        duration_s=args.duration,
        seed=args.seed,
        progress=not args.no_progress,
        repetitions=args.repetitions,
        systems=args.systems,
        workloads=args.workloads,
    )
    started, origin = utc_now(), provenance()
    results: list[ScenarioResult] = []
    triton_version = ""
    failed: list[str] = []
    for name in _chosen(args):
        _say(f"pointsman bench: {name}")
        try:
            result = run_scenario(name, options, _say)
        except Exception as exc:  # one broken scenario must not lose the others' figures
            traceback.print_exc()
            _say(f"pointsman bench: {name} failed: {exc}")
            failed.append(name)
            continue
        results.append(result)
        triton_version = triton_version or str(result.data.get("triton_version", ""))
    bench_run = BenchRun(
        _command_line(args, out),
        started,
        machine_info(triton_version),
        tuple(results),
        replace(origin, loadavg_end=os.getloadavg()),
    )
    paths = write_report(bench_run, out)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    if failed:
        _say(f"pointsman bench: failed: {', '.join(failed)}")
        return 1
    return 0
