"""`pointsman bench`: runs the chosen scenarios and writes results.json, .md and .png.

    pointsman bench --scenario all --out bench/results/reference
    pointsman bench --scenario comparison --repetitions 5
    pointsman bench --scenario overhead --quick

`--quick` shrinks every scenario to a smoke run of seconds: the scenarios that need one Triton
share one small fleet (bench.scenarios.quick_fleet), while those that start their own systems
run beside the others in a second `pointsman bench` process, so that the two lanes' waits
(process starts and stops, model loads, fixed-length runs) overlap; the figures of a quick run
show that the machinery works, not what anything is worth. `--duration` sets the measured
seconds of each cell. Exit status: 0 when every scenario ran (whether or not targets were
met: they are reported, not enforced), 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from app.arguments import positive_seconds
from bench.report import (
    BenchRun,
    ScenarioResult,
    machine_info,
    provenance,
    scenario_from_json,
    utc_now,
    write_report,
)
from bench.scenarios import OWN_SYSTEMS, SCENARIOS, Options, run_scenario
from bench.scenarios.quick_fleet import SharedFleet

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
        "--duration", type=positive_seconds, help="measured seconds of each cell or run"
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


def _options_words(args: argparse.Namespace) -> list[str]:
    """The options of this run but the scenarios and the output folder."""
    words = ["--seed", str(args.seed)]
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
    return words


def _command_line(args: argparse.Namespace, out: Path) -> str:
    """The command that reproduces this run."""
    words = ["pointsman", "bench"]
    for name in args.scenario or ["all"]:
        words += ["--scenario", name]
    return shlex.join([*words, *_options_words(args), "--out", str(out)])


def run(args: argparse.Namespace) -> int:
    out: Path = args.out or Path(f"pointsman-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    started, origin = utc_now(), provenance()
    names = _chosen(args)
    here = [n for n in names if n not in OWN_SYSTEMS]
    beside = [n for n in names if n in OWN_SYSTEMS] if args.quick and here else []
    with SharedFleet() if args.quick else nullcontext() as shared:
        options = Options(
            quick=args.quick,
            duration_s=args.duration,
            seed=args.seed,
            # Two lanes write to one terminal: lines, not progress bars.
            progress=not (args.no_progress or beside),
            repetitions=args.repetitions,
            systems=args.systems,
            workloads=args.workloads,
            shared=shared,
        )
        if beside:
            results, failed = _two_lanes(here, beside, options, args)
        else:
            results, failed = _run_all(names, options)
    results.sort(key=lambda r: names.index(r.name))
    triton_version = next(
        (str(r.data["triton_version"]) for r in results if r.data.get("triton_version")), ""
    )
    bench_run = BenchRun(
        _command_line(args, out),
        started,
        machine_info(triton_version),
        tuple(results),
        replace(origin, loadavg_end=os.getloadavg()),
    )
    # A smoke run's bars mean nothing, and drawing them takes seconds.
    paths = write_report(bench_run, out, plot=not args.quick)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths) + (" (quick: no PNG)" if args.quick else ""))
    if failed:
        _say(f"pointsman bench: failed: {', '.join(failed)}")
        return 1
    return 0


def _run_all(names: list[str], options: Options) -> tuple[list[ScenarioResult], list[str]]:
    """Each scenario in turn, timed; the results, and the names of those that failed."""
    results: list[ScenarioResult] = []
    failed: list[str] = []
    for name in names:
        _say(f"pointsman bench: {name}")
        began = time.perf_counter()
        try:
            result = run_scenario(name, options, _say)
        except Exception as exc:  # one broken scenario must not lose the others' figures
            traceback.print_exc()
            _say(f"pointsman bench: {name} failed: {exc}")
            failed.append(name)
            continue
        wall_s = time.perf_counter() - began
        _say(f"pointsman bench: {name} done in {wall_s:.1f} s")
        results.append(replace(result, wall_s=wall_s))
    return results, failed


def _two_lanes(
    here: list[str], beside: list[str], options: Options, args: argparse.Namespace
) -> tuple[list[ScenarioResult], list[str]]:
    """`here` in this process, `beside` at the same time in a second `pointsman bench`
    process (quick mode); both lanes' results, and the names of the scenarios that failed."""
    with tempfile.TemporaryDirectory(prefix="pointsman-bench-lane-") as folder:
        argv = [sys.executable, "-m", "app", "bench", *_options_words(args), "--no-progress"]
        argv += [word for name in beside for word in ("--scenario", name)]
        _say(f"pointsman bench: {', '.join(beside)} in a second process, beside the others")
        lane = subprocess.Popen([*argv, "--out", folder], stdout=subprocess.DEVNULL)
        try:
            results, failed = _run_all(here, options)
        except BaseException:  # Ctrl-C included: the second lane stops too
            lane.terminate()
            raise
        finally:
            lane.wait()
        document = Path(folder, "results.json")
        entries = json.loads(document.read_text())["scenarios"] if document.exists() else []
    found = [scenario_from_json(entry) for entry in entries]
    failed += [name for name in beside if name not in {r.name for r in found}]
    return results + found, failed
