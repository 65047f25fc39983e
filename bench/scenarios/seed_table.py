"""Scenario `seed-table`: the model-router article's table, measured here on real Tritons.

Three Triton instances, several copies of `codegen` with Zipf popularity, a per-instance
budget that holds only some of them, the same closed-loop workload three ways:

 (a) round robin with load-on-miss (bench/baselines/round_robin_load_on_miss.py): the WORST
     CASE, whose load-on-miss is this benchmark's own client code;
 (b) Pointsman (router + sidecar) with Triton's dynamic batcher off, as in (a);
 (c) Pointsman with the batcher settings the models ship with.

One run of each, in a fixed order: this is the article's table, not the evidence. The fair
comparison, repeated and interleaved with confidence intervals, is `--scenario comparison`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.baselines.round_robin_load_on_miss import RoundRobinLoadOnMiss
from bench.cell import CellResult, CellSettings, run_cell
from bench.pointsman_fleet import PointsmanSystem
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck, ratio
from bench.repository import bench_repository, copy_names, zipf_popularity
from bench.scenarios import Options, Say
from bench.testbed import System, Testbed
from bench.workloads import WORKLOADS

__all__ = ["SeedTableSettings", "run_seed_table", "scenario"]

MiB = 1024**2
# codegen's declared pointsman.memory_bytes: its resident size (triton_models/README.md).
FOOTPRINT = 72 * MiB
# The article's table, for the reader's comparison (not measured here).
ARTICLE = {
    "round robin": (880.0, 42.0, 12),
    "model router": (520.0, 68.0, 2),
    "router + batching": (310.0, 94.0, 0),
}
TARGET_P99_RATIO = 0.30
TARGET_THROUGHPUT_RATIO = 2.5


@dataclass(frozen=True, slots=True)
class SeedTableSettings:
    models: int = 6
    instances: int = 3
    models_per_instance: int = 3  # the budget holds this many footprints
    zipf_exponent: float = 1.2
    cell: CellSettings = field(default_factory=lambda: CellSettings(timeout_s=60.0))

    @property
    def budget_bytes(self) -> int:
        # A little over k footprints: room for k models, never k + 1.
        return self.models_per_instance * FOOTPRINT + FOOTPRINT // 2


def _testbed(settings: SeedTableSettings, repository: Path, workdir: Path) -> Testbed:
    return Testbed(
        instances=settings.instances,
        models=copy_names("codegen", settings.models),
        repository=repository,
        footprint_bytes=FOOTPRINT,
        budget_bytes=settings.budget_bytes,
        expected_popularity=tuple(zipf_popularity(settings.models, settings.zipf_exponent)),
        workdir=workdir,
    )


def run_seed_table(settings: SeedTableSettings, say: Say = lambda _line: None) -> ScenarioResult:
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-seed-table-"))
    names = copy_names("codegen", settings.models)
    off = _testbed(settings, bench_repository(workdir / "repo-off", names, batcher=False), workdir)
    on = _testbed(settings, bench_repository(workdir / "repo-on", names), workdir)
    runs: tuple[tuple[str, System, Testbed], ...] = (
        ("(a) round robin + load-on-miss (worst case)", RoundRobinLoadOnMiss(), off),
        ("(b) Pointsman, batcher off", PointsmanSystem(name="pointsman-batcher-off"), off),
        ("(c) Pointsman + batcher", PointsmanSystem(name="pointsman"), on),
    )
    results: list[tuple[str, CellResult]] = []
    for label, system, bed in runs:
        say(f"seed-table: {label} ...")
        cell = run_cell(
            system, bed, WORKLOADS["steady-closed"], settings.cell, workdir / system.name
        )
        results.append((label, cell))
    return _result(settings, on, results, workdir)


def _result(
    settings: SeedTableSettings,
    bed: Testbed,
    results: Sequence[tuple[str, CellResult]],
    workdir: Path,
) -> ScenarioResult:
    base = results[0][1].summary
    rows = []
    for label, cell in results:
        s = cell.summary
        rows.append(
            (
                label,
                s.p50_ms,
                s.p99_ms,
                s.throughput_rps,
                cell.loads.delayed_requests,
                cell.loads.loads,
                cell.warmup_loads.loads,
                cell.costs["tritons"].peak_rss_bytes / MiB,
                cell.average_batch,
                s.errors,
                ", ".join(f"{k} {v}" for k, v in s.errors_by_status.items()) or "-",
                ratio(s.p99_ms, base.p99_ms),
                ratio(s.throughput_rps, base.throughput_rps),
            )
        )
    best = results[-1][1]
    labels = tuple(label.split(")")[0] + ")" for label, _ in results)
    c = settings.cell
    return ScenarioResult(
        name="seed-table",
        title="Seed table: round robin + load-on-miss (worst case) vs Pointsman",
        tables=(
            Table(
                f"{settings.instances} Tritons, {settings.models} codegen models "
                f"(room for {settings.models_per_instance} per instance), {c.concurrency} "
                f"closed-loop clients, {c.max_tokens} tokens, {c.warmup_s:g} s warm-up + "
                f"{c.duration_s:g} s measured, one run each",
                (
                    "system",
                    "p50 ms",
                    "p99 ms",
                    "req/s",
                    "requests delayed by a load",
                    "loads",
                    "warm-up loads",
                    "peak Triton RSS MiB",
                    "avg batch",
                    "errors",
                    "errors by status",
                    "p99 vs (a)",
                    "req/s vs (a)",
                ),
                tuple(rows),
            ),
            Table(
                "The article's table (its hardware, for comparison; not measured here)",
                ("system", "p99 ms", "QPS", "cold starts"),
                tuple((k, *v) for k, v in ARTICLE.items()),
            ),
        ),
        bars=(
            BarGroup(
                "p99 latency",
                "ms (log scale)",
                labels,
                tuple(r.summary.p99_ms for _, r in results),
                log_scale=True,
            ),
            BarGroup(
                "throughput",
                "requests/s",
                labels,
                tuple(r.summary.throughput_rps for _, r in results),
            ),
            BarGroup(
                "requests delayed by a load",
                "count",
                labels,
                tuple(float(r.loads.delayed_requests) for _, r in results),
            ),
        ),
        targets=(
            TargetCheck(
                "(c) p99 vs (a)",
                f"<= {TARGET_P99_RATIO:.2f}x",
                f"{ratio(best.summary.p99_ms, base.p99_ms):.2f}x",
                ratio(best.summary.p99_ms, base.p99_ms) <= TARGET_P99_RATIO,
            ),
            TargetCheck(
                "(c) throughput vs (a)",
                f">= {TARGET_THROUGHPUT_RATIO:.1f}x",
                f"{ratio(best.summary.throughput_rps, base.throughput_rps):.2f}x",
                ratio(best.summary.throughput_rps, base.throughput_rps) >= TARGET_THROUGHPUT_RATIO,
            ),
            TargetCheck(
                "(c) requests delayed by a load after warm-up",
                "0",
                str(best.loads.delayed_requests),
                best.loads.delayed_requests == 0,
            ),
        ),
        notes=(
            "(a) is a worst case this benchmark builds: Triton never loads on request, so the "
            "load-on-miss is client code. The fair baselines are in `--scenario comparison`.",
            "Model popularity (Zipf, exponent "
            f"{settings.zipf_exponent:g}): "
            + ", ".join(
                f"{n} {s:.0%}" for n, s in zip(bed.models, bed.expected_popularity, strict=True)
            ),
            f"Budget per instance {settings.budget_bytes / MiB:.0f} MiB; each model declares "
            f"{FOOTPRINT / MiB:.0f} MiB. Loads: models that became READY (repository indexes, "
            "same count for every system); requests delayed: (a) its own count, (b), (c) the "
            "sidecar's pointsman_sidecar_cold_starts_total.",
            f"logs: {workdir}",
        ),
        data={
            "testbed": bed.describe(),
            "cell_settings": c.describe(),
            "triton_version": results[0][1].triton_version,
            "systems": [{"label": label, **cell.to_dict()} for label, cell in results],
        },
    )


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = SeedTableSettings(
        cell=CellSettings(timeout_s=60.0, seed=options.seed, progress=options.progress)
    )
    if options.quick:
        settings = replace(
            settings,
            models=4,
            models_per_instance=2,
            cell=replace(settings.cell, concurrency=8, warmup_s=5, duration_s=5),
        )
    if options.duration_s:
        settings = replace(settings, cell=replace(settings.cell, duration_s=options.duration_s))
    return run_seed_table(settings, say)
