"""The comparison's method, piece by piece: workloads, baselines' placement and routing rules,
bootstrap intervals, interleaving, load counting, aggregation and the goal checks. The
comparison end to end on real Tritons is part of the quick run (tests/app/test_bench.py)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest
import yaml

from app.cli import main
from bench import testbed
from bench.baselines import FAIR_BASELINES, SYSTEMS, WORST_CASE
from bench.baselines.everything_everywhere import replica_models
from bench.baselines.random_among_holders import random_among_holders
from bench.baselines.static_split import LeastRequest, plan_static_split
from bench.cell import CellResult
from bench.loadgen import Call
from bench.placement_watch import LoadCounts, PlacementEvent, load_counts
from bench.pointsman_fleet import COMPRESSED_TIMELINE, policy_document
from bench.procstats import ProcessCost, ProcessSampler
from bench.repository import zipf_popularity
from bench.scenarios import Options
from bench.scenarios.comparison import interleaved
from bench.scenarios.comparison_report import aggregate, comparison_result
from bench.stats import Interval, LoadSummary, bootstrap_median, percentile
from bench.workloads import WORKLOADS, ModelChooser, on_off_arrivals, shifted

MiB = 1024**2


def _bed(instances: int = 3, models: int = 6, slots: int = 3) -> testbed.Testbed:
    names = tuple(f"m{i}" for i in range(models))
    return testbed.Testbed(
        instances=instances,
        models=names,
        repository=Path("/nonexistent"),
        footprint_bytes=64 * MiB,
        budget_bytes=slots * 64 * MiB + 32 * MiB,
        expected_popularity=tuple(zipf_popularity(models, 1.2)),
        workdir=Path("/nonexistent"),
    )


# --- statistics ---------------------------------------------------------------------------------


def test_bootstrap_median_is_seeded_and_brackets_the_median() -> None:
    values = [10.0, 12.0, 11.0, 30.0, 9.0]
    first = bootstrap_median(values, random.Random(1))
    assert first == bootstrap_median(values, random.Random(1))
    assert first.median == 11.0 and first.samples == 5
    assert 9.0 <= first.low <= first.median <= first.high <= 30.0


@pytest.mark.parametrize(
    ("values", "median", "low", "high", "samples"),
    [
        ([], math.nan, math.nan, math.nan, 0),
        ([5.0], 5.0, 5.0, 5.0, 1),
        ([math.nan, 4.0], 4.0, 4.0, 4.0, 1),  # not measured is left out
        ([math.inf] * 3, math.inf, math.inf, math.inf, 3),  # every p99 a timeout
    ],
)
def test_bootstrap_median_edges(
    values: list[float], median: float, low: float, high: float, samples: int
) -> None:
    got = bootstrap_median(values, random.Random(0))
    for have, want in ((got.median, median), (got.low, low), (got.high, high)):
        assert (math.isnan(have) and math.isnan(want)) or have == want
    assert got.samples == samples


def test_intervals_overlap_unless_apart() -> None:
    assert Interval(5, 4, 6, 5).overlaps(Interval(7, 6, 8, 5))
    assert not Interval(5, 4, 6, 5).overlaps(Interval(8, 7, 9, 5))


def test_percentile_with_infinities() -> None:
    assert percentile([1.0, 2.0, math.inf], 50) == 2.0
    assert percentile([1.0, math.inf, math.inf], 90) == math.inf
    assert math.isnan(percentile([], 50))


# --- workloads ----------------------------------------------------------------------------------


def test_model_chooser_is_seeded_follows_popularity_and_reverses_at_the_shift() -> None:
    models, shares = ["a", "b", "c"], [0.7, 0.2, 0.1]
    chooser = ModelChooser(models, shares, seed=3, streams=2, shift_at_s=10.0)
    again = ModelChooser(models, shares, seed=3, streams=2, shift_at_s=10.0)
    before = [chooser.choose(i % 2, 1.0) for i in range(4000)]
    assert before == [again.choose(i % 2, 1.0) for i in range(4000)]
    after = Counter(chooser.choose(0, 10.0) for _ in range(4000))
    assert Counter(before)["a"] / 4000 == pytest.approx(0.7, abs=0.03)
    assert after["c"] / 4000 == pytest.approx(0.7, abs=0.03)  # the coldest became the hottest
    assert shifted([0.7, 0.2, 0.1]) == [0.1, 0.2, 0.7]


def test_bursts_keep_the_mean_rate_and_crowd_the_on_periods() -> None:
    arrivals = on_off_arrivals(50.0, 60.0, random.Random(5), on_s=2, off_s=4, peak=2.5)
    assert len(arrivals) / 60.0 == pytest.approx(50.0, rel=0.06)
    assert arrivals == sorted(arrivals)
    on = sum(1 for t in arrivals if t % 6 < 2)
    assert on / len(arrivals) == pytest.approx(5 / 6, abs=0.04)  # 2 s x 2.5 of 6 s x 1
    with pytest.raises(ValueError, match="exceeds the mean"):
        on_off_arrivals(50.0, 10.0, random.Random(5), on_s=2, off_s=1, peak=2.5)


def test_workloads_cover_the_issue() -> None:
    loads = sorted(w.load_factor for w in WORKLOADS.values() if w.name.startswith("steady-open"))
    assert loads == [0.5, 0.8, 1.0, 1.2]
    assert any(w.loop == "closed" for w in WORKLOADS.values())
    assert any(w.shift_at is not None for w in WORKLOADS.values())
    assert any(w.bursts for w in WORKLOADS.values())
    assert any(w.streaming for w in WORKLOADS.values())


# --- baselines ----------------------------------------------------------------------------------


def test_static_split_places_every_model_within_the_budget_and_the_hottest_most() -> None:
    bed = _bed()
    plan = plan_static_split(bed)
    assert all(len(models) == bed.slots_per_instance for models in plan)  # every slot used
    assert all(len(set(models)) == len(models) for models in plan)  # no copy twice on one
    copies = Counter(m for models in plan for m in models)
    assert set(copies) == set(bed.models)  # every model placed once at least
    assert copies["m0"] == 3 and copies["m0"] >= copies["m1"] >= copies["m5"]


def test_static_split_places_the_most_popular_when_not_all_fit() -> None:
    plan = plan_static_split(_bed(instances=2, models=6, slots=2))
    assert sorted(m for models in plan for m in models) == ["m0", "m1", "m2", "m3"]


def test_everything_everywhere_loads_the_models_that_fit() -> None:
    assert replica_models(_bed(slots=3)) == ["m0", "m1", "m2"]
    assert replica_models(_bed(slots=9)) == [f"m{i}" for i in range(6)]
    assert _bed(slots=3).constrained and not _bed(slots=9).constrained


def test_least_request_prefers_the_idle_holder_and_sends_unplaced_models_anywhere() -> None:
    rule = LeastRequest({"m": ["a", "b"], "solo": ["c"]}, ["a", "b", "c"], random.Random(1))
    rule._in_flight["a"] = 3
    assert {rule.choose("m") for _ in range(20)} == {"b"}
    assert rule.choose("solo") == "c"
    assert {rule.choose("nowhere") for _ in range(3)} == {"a", "b", "c"}

    async def counted() -> list[str]:
        seen: list[str] = []

        def send_to(address: str) -> Call:
            async def call() -> None:
                seen.append(f"{address}:{rule._in_flight[address]}")

            return call

        await rule.send("solo", send_to)
        return seen

    assert asyncio.run(counted()) == ["c:1"]  # counted while in flight
    assert rule._in_flight["c"] == 0


def test_systems_registry() -> None:
    assert set(SYSTEMS) == {"pointsman", "pointsman-proxyless", *FAIR_BASELINES, WORST_CASE}
    for name, make in SYSTEMS.items():
        assert make().name == name


@pytest.mark.parametrize("scheduling", [None, random_among_holders().scheduling])
def test_pointsman_policy_files_are_valid(tmp_path: Path, scheduling: object) -> None:
    document = policy_document(_bed(), scheduling, COMPRESSED_TIMELINE)  # type: ignore[arg-type]
    assert document["models"]["m0"] == {
        "min_copies": 1,
        "memory_bytes": 64 * MiB,
        "per_copy_capacity_rps": 20.0,
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["policy", "check", str(path)]) == 0


# --- loads, costs, method -----------------------------------------------------------------------


def test_load_counts_in_the_window_and_convergence_from_the_reference() -> None:
    events = [
        PlacementEvent(1.0, "i0", "a", True),  # warm-up
        PlacementEvent(12.0, "i1", "b", True),
        PlacementEvent(14.0, "i1", "c", False),
        PlacementEvent(18.0, "i2", "b", True),
        PlacementEvent(40.0, "i2", "c", True),  # after the window
    ]
    counts = load_counts(events, 10.0, 30.0, reference_s=15.0, delayed=4)
    assert counts == LoadCounts(loads=2, unloads=1, delayed_requests=4, converge_s=3.0)
    assert load_counts([], 0.0, 1.0, 0.0, 0).converge_s == 0.0


def test_process_sampler_reads_this_process() -> None:
    import os

    with ProcessSampler([os.getpid()], interval_s=0.01) as sampler:
        sum(i * i for i in range(300_000))  # some CPU
    assert sampler.cost.peak_rss_bytes >= sampler.cost.start_rss_bytes > 10 * MiB
    assert sampler.cost.cpu_s > 0
    assert sampler.cost.to_dict(10)["cpu_ms_per_request"] == pytest.approx(sampler.cost.cpu_s * 100)


def test_systems_rotate_by_one_per_repetition() -> None:
    systems = ["a", "b", "c", "d"]
    assert [interleaved(systems, r) for r in range(5)] == [
        ["a", "b", "c", "d"],
        ["b", "c", "d", "a"],
        ["c", "d", "a", "b"],
        ["d", "a", "b", "c"],
        ["a", "b", "c", "d"],
    ]


def _cell(system: str, repetition: int, p99: float, goodput: float, failed: int = 0) -> CellResult:
    summary = LoadSummary(
        requests=100, ok=100 - failed, timed_out=0, failed=failed, errors_by_status={},
        elapsed_s=10.0, throughput_rps=goodput, p50_ms=p99 / 3, p90_ms=p99 / 2, p99_ms=p99,
        max_ms=p99, mean_ms=p99 / 3,
    )  # fmt: skip
    return CellResult(
        system=system, workload="shift-open-80", repetition=repetition, order=0, seed=1,
        summary=summary, warmup_loads=LoadCounts(3, 0, 0, 0.0), loads=LoadCounts(1, 1, 2, 4.0),
        average_batch=1.5, costs={"tritons": ProcessCost(10, 20, 1.0)},
        placement={"i0": ["a"]}, loadavg=(1.0, 1.0, 1.0), started_utc="t", elapsed_s=20.0,
    )  # fmt: skip


def test_aggregation_and_goal_checks() -> None:
    cells = [_cell("pointsman", r, 100 + r, 50 + r) for r in range(5)]
    cells += [_cell("static-split", r, 400 + r, 30 + r) for r in range(5)]
    cells += [_cell("everything-everywhere", r, 900 + r, 20 + r, failed=5) for r in range(5)]
    cells += [_cell(WORST_CASE, r, 9000 + r, 2 + r) for r in range(5)]
    figures = aggregate(cells, seed=1)
    mine = figures["shift-open-80"]["pointsman"]
    assert mine["p99_ms"].median == 102 and mine["p99_ms"].samples == 5
    assert math.isnan(mine["sidecar_cpu_ms_per_request"].median)  # no sidecar in these cells
    result = comparison_result(
        settings_data={}, testbeds={}, capacity=None, cells=cells, seed=1, notes=()
    )
    checks = {t.name: t for t in result.targets}
    p99 = checks["shift-open-80: p99 vs static-split"]
    assert p99.met is True and p99.measured == f"{102 / 402:.2f}x"
    goodput = checks["shift-open-80: goodput vs static-split"]
    # 80 % of capacity: goodput is reported but cannot decide (every system keeps up).
    assert goodput.met is None and goodput.measured.startswith(f"{52 / 32:.2f}x")
    assert checks["shift-open-80: Pointsman failed + timed out (median)"].met is True
    assert checks["shift-open-80: p99 and goodput intervals apart from static-split's"].met
    # Every fair baseline is checked, never the worst case.
    assert checks["shift-open-80: p99 vs everything-everywhere"].met is True
    assert not any(WORST_CASE in name for name in checks)
    json.dumps(result.data, default=str)  # plain data, ready for results.json
    assert len(result.data["cells"]) == 20  # type: ignore[arg-type]
    assert statistics.median(c.summary.p99_ms for c in cells[:5]) == 102


def test_scale_sweep_quick_times_index_rebuild_and_pick_target_over_grpc() -> None:
    from bench.scenarios.scale_sweep import scenario

    result = scenario(Options(quick=True), lambda _line: None)
    sweep = result.data["sweep"]
    assert isinstance(sweep, list)
    assert [m["holders_per_model"] for m in sweep] == [1, 8, 100]
    # 100 instances x 50 models: models per instance grow with the holders of each model.
    assert [m["models_per_instance"] for m in sweep] == [0.5, 4.0, 50.0]
    for figures in sweep:
        for key in (
            "index_build_p50_ms",
            "decision_p99_ms",
            "rebuild_from_empty_p50_ms",
            "pick_target_grpc_p50_ms",
        ):
            assert 0 < figures[key] < 5000, (key, figures)
