"""Scenario `comparison`: Pointsman against fair baselines, repeated, with confidence intervals.

Every system (bench/baselines/: everything-everywhere, static-split, random-among-holders,
round-robin-load-on-miss as the worst case; and pointsman) runs on the same testbed: the same
Tritons, model repository, per-instance memory budget (in the constrained testbed not every
model fits on an instance, for every system alike) and, per repetition, the same seeded
workload. Workloads (bench/workloads.py): steady Zipf (closed loop, and open loop at 50, 80,
100 and 120 % of the measured capacity), a popularity shift mid-run, on/off bursts, and
streaming with time to first token and inter-token latency.

Method: capacity is measured first (the static split, closed loop, steady popularity). Then
each repetition runs every workload on every system, systems in an order rotated by one per
repetition (a b c d e, b c d e a, ...), each cell on freshly started processes. Each cell's
raw figures are appended to `cells.jsonl` as they come, so a long run that stops keeps what it
measured; the result reports medians over repetitions with 95 % bootstrap intervals
(bench.scenarios.comparison_report).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.baselines import SYSTEMS
from bench.cell import QUICK_CELL, CellResult, CellSettings, run_cell
from bench.report import ScenarioResult
from bench.repository import bench_repository, copy_names, zipf_popularity
from bench.scenarios import Options, Say
from bench.scenarios.comparison_report import comparison_result
from bench.testbed import EmulatedAccelerator, Testbed
from bench.workloads import WORKLOADS

__all__ = ["ComparisonSettings", "interleaved", "run_comparison", "scenario"]

MiB = 1024**2
CAPACITY_SYSTEM = "static-split"


@dataclass(frozen=True, slots=True)
class ComparisonSettings:
    systems: tuple[str, ...] = tuple(SYSTEMS)
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    repetitions: int = 5
    instances: int = 3
    models: int = 6
    models_per_instance: int = 3  # the budget: room for this many footprints, never one more
    footprint_bytes: int = 64 * MiB
    zipf_exponent: float = 1.2
    per_copy_capacity_rps: float = 20.0
    capacity_s: float = 15.0
    accelerator: EmulatedAccelerator = field(default_factory=EmulatedAccelerator)
    cell: CellSettings = field(default_factory=CellSettings)

    @property
    def budget_bytes(self) -> int:
        return self.models_per_instance * self.footprint_bytes + self.footprint_bytes // 2

    def describe(self) -> dict[str, object]:
        return {
            "systems": list(self.systems),
            "workloads": list(self.workloads),
            "repetitions": self.repetitions,
            "capacity_s": self.capacity_s,
            "capacity_system": CAPACITY_SYSTEM,
            "zipf_exponent": self.zipf_exponent,
            "accelerator": self.accelerator.describe(),
            "cell": self.cell.describe(),
        }


def interleaved(systems: Sequence[str], repetition: int) -> list[str]:
    """The systems' order in one repetition: rotated by one per repetition."""
    shift = repetition % len(systems) if systems else 0
    return [*systems[shift:], *systems[:shift]]


def _testbeds(settings: ComparisonSettings, workdir: Path) -> dict[str, Testbed]:
    """The testbeds by kind (Workload.testbed): "unary" (codegen copies, decoding on the CPU),
    "streaming" (codegen_stream copies) and "accelerator" (codegen copies on the emulated
    accelerator). The same instances, models, footprint, budget and popularity for all."""
    kinds = {
        "unary": ("codegen", None),
        "streaming": ("codegen_stream", None),
        "accelerator": ("codegen", settings.accelerator),
    }
    beds = {}
    for kind, (template, accelerator) in kinds.items():
        names = copy_names(template, settings.models)
        repository = bench_repository(
            workdir / f"repo-{kind}",
            names,
            template=template,
            footprint_bytes=settings.footprint_bytes,
            parameters=accelerator.model_parameters() if accelerator else None,
        )
        beds[kind] = Testbed(
            instances=settings.instances,
            models=names,
            repository=repository,
            footprint_bytes=settings.footprint_bytes,
            budget_bytes=settings.budget_bytes,
            expected_popularity=tuple(zipf_popularity(settings.models, settings.zipf_exponent)),
            workdir=workdir,
            per_copy_capacity_rps=(
                accelerator.per_copy_capacity_rps if accelerator else settings.per_copy_capacity_rps
            ),
            streaming=kind == "streaming",
            accelerator=accelerator,
        )
    return beds


# A Triton can crash under a starved machine (the Python backend's IPC lock times out:
# boost::interprocess::lock_exception, triton-inference-server/server#8882); the capacity,
# which every open loop of its testbed needs, is measured again on fresh processes.
CAPACITY_ATTEMPTS = 3


def measure_capacity(
    settings: ComparisonSettings, bed: Testbed, workdir: Path, say: Say = lambda _line: None
) -> CellResult:
    """The static split's closed-loop goodput under steady popularity on `bed`: the offered
    load of the open-loop workloads on that testbed is a fraction of it."""
    cell = replace(settings.cell, duration_s=settings.capacity_s)
    for attempt in range(1, CAPACITY_ATTEMPTS + 1):
        try:
            return run_cell(
                SYSTEMS[CAPACITY_SYSTEM](),
                bed,
                WORKLOADS["steady-closed"],
                cell,
                workdir / f"attempt-{attempt}",
            )
        except Exception as exc:
            if attempt == CAPACITY_ATTEMPTS:
                raise
            say(f"comparison: capacity cell failed ({exc!r}); measuring it again")
    raise AssertionError("unreachable")


def run_comparison(
    settings: ComparisonSettings, say: Say = lambda _line: None, notes: Sequence[str] = ()
) -> ScenarioResult:
    for name in settings.systems:
        if name not in SYSTEMS:
            raise ValueError(f"unknown system {name!r} (known: {', '.join(SYSTEMS)})")
    for name in settings.workloads:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-comparison-"))
    beds = _testbeds(settings, workdir)
    journal = workdir / "cells.jsonl"
    capacities: dict[str, CellResult] = {}
    open_loops = [WORKLOADS[w] for w in settings.workloads if WORKLOADS[w].loop == "open"]
    for kind in sorted({w.testbed for w in open_loops}):
        say(f"comparison: measuring capacity, {kind} testbed ({CAPACITY_SYSTEM}, closed loop) ...")
        capacities[kind] = measure_capacity(settings, beds[kind], workdir / f"capacity-{kind}", say)
        say(f"comparison: capacity ({kind}) {capacities[kind].summary.throughput_rps:.1f} req/s")
    cells: list[CellResult] = []
    failures: list[dict[str, object]] = []
    total = settings.repetitions * len(settings.workloads) * len(settings.systems)
    for repetition in range(settings.repetitions):
        for workload_name in settings.workloads:
            workload = WORKLOADS[workload_name]
            capacity = capacities.get(workload.testbed)
            cell_settings = replace(
                settings.cell,
                capacity_rps=capacity.summary.throughput_rps if capacity else math.nan,
            )
            for order, system_name in enumerate(interleaved(settings.systems, repetition)):
                say(
                    f"comparison: [{len(cells) + 1}/{total}] repetition {repetition + 1}, "
                    f"{workload_name}, {system_name}"
                )
                try:
                    cell = run_cell(
                        SYSTEMS[system_name](),
                        beds[workload.testbed],
                        workload,
                        cell_settings,
                        workdir / f"r{repetition}-{workload_name}-{system_name}",
                        repetition=repetition,
                        order=order,
                    )
                except Exception as exc:  # one cell lost must not lose the hours of the others
                    failure = {
                        "system": system_name,
                        "workload": workload_name,
                        "repetition": repetition,
                        "error": repr(exc),
                    }
                    say(f"comparison: cell failed: {failure}")
                    failures.append(failure)
                    with journal.open("a") as out:
                        out.write(json.dumps({"failed": failure}) + "\n")
                    continue
                cells.append(cell)
                with journal.open("a") as out:
                    out.write(json.dumps(cell.to_dict(), default=str) + "\n")
    return comparison_result(
        settings_data=settings.describe(),
        testbeds={kind: bed.describe() for kind, bed in beds.items()},
        capacities=capacities,
        cells=cells,
        seed=settings.cell.seed,
        failures=failures,
        notes=(*notes, f"raw cells as measured: {journal}", f"logs: {workdir}"),
    )


# A smoke run: two systems, one closed-loop workload (so no capacity cell), one instance with
# room for both models (a constrained one leaves requests waiting for a load that cannot
# come, up to the deadline), the quick cell.
QUICK = ComparisonSettings(
    systems=("static-split", "pointsman"),
    workloads=("shift-closed",),
    repetitions=1,
    instances=1,
    models=2,
    models_per_instance=2,
    cell=QUICK_CELL,
)


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = QUICK if options.quick else ComparisonSettings()
    cell = replace(settings.cell, seed=options.seed, progress=options.progress)
    if options.duration_s:
        cell = replace(cell, duration_s=options.duration_s)
    settings = replace(settings, cell=cell)
    if options.repetitions:
        settings = replace(settings, repetitions=options.repetitions)
    if options.systems:
        settings = replace(settings, systems=options.systems)
    if options.workloads:
        settings = replace(settings, workloads=options.workloads)
    notes = []
    if options.quick:
        notes.append(
            f"quick mode: {len(settings.systems)} of {len(SYSTEMS)} systems, "
            f"{len(settings.workloads)} of {len(WORKLOADS)} workloads, {settings.instances} "
            "instance(s); the others are not run (--systems and --workloads choose)"
        )
    return run_comparison(settings, say, notes)
