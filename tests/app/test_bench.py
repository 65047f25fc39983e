"""`pointsman bench`: the load generator (open and closed loop, timeouts, streams, no coordinated
omission), the report files and their JSON Schema, the pieces of the path scenarios (rotated
rounds, added latency per round) and of the quick run's shared fleet, the scale scenario in
quick mode, streaming calls against a real Triton, and the CI smoke run: `pointsman bench
--quick`, every scenario end to end on real Tritons."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml

from app.cli import main
from app.processes import stop_all
from app.triton import (
    DEFAULT_MODEL_REPOSITORY,
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)
from bench.calls import TritonCalls, codegen_inputs, infer_request_bytes
from bench.cell import average_batch
from bench.loadgen import (
    CallRecord,
    Request,
    fixed_arrivals,
    poisson_arrivals,
    run_closed_loop,
    run_open_loop,
    status_of,
)
from bench.report import (
    SCHEMA,
    BarGroup,
    BenchRun,
    ScenarioResult,
    Table,
    TargetCheck,
    format_cell,
    machine_info,
    provenance,
    render_markdown,
    scenario_from_json,
    write_report,
)
from bench.repository import model_config, zipf_popularity
from bench.scenarios import ON_SHARED_FLEET, SCENARIOS
from bench.scenarios.h2load import grpc_frame, h2load_command, parse_h2load_log
from bench.scenarios.paths import PathSettings, measure_rounds, path_figures
from bench.scenarios.quick_fleet import merged, shared_policy
from bench.scenarios.route_propagation import ALL_ON_TWO, SPLIT
from bench.scenarios.scale import QUICK, run_scale
from bench.stats import LoadSummary, bootstrap_median, summarize
from tests.support.fakes import FakeClock

BENCH = Path(__file__).resolve().parents[2] / "bench"
RESULTS = BENCH / "results"
RESULTS_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((BENCH / "results.schema.json").read_text())
)

# --- the load generator ------------------------------------------------------------------------


def _ok(ms: float, tag: str = "") -> CallRecord:
    return CallRecord(tag, 0.0, ms / 1e3, "OK")


def test_percentiles_come_from_the_full_record_of_successes() -> None:
    records = [_ok(ms) for ms in range(1, 101)]  # 1..100 ms
    records += [CallRecord("", 0.0, 5.0, "UNAVAILABLE")] * 3 + [CallRecord("", 0.0, 0, "NOT_FOUND")]
    summary = summarize(records, elapsed_s=4.0)
    assert (summary.requests, summary.ok, summary.errors, summary.failed) == (104, 100, 4, 4)
    assert summary.timed_out == 0
    assert summary.errors_by_status == {"NOT_FOUND": 1, "UNAVAILABLE": 3}
    assert summary.throughput_rps == pytest.approx(25.0)
    # Linear interpolation between ranks; the failed calls' 5 s never reach the percentiles.
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p90_ms == pytest.approx(90.1)
    assert summary.p99_ms == pytest.approx(99.01)
    assert summary.max_ms == pytest.approx(100.0)
    assert summary.mean_ms == pytest.approx(50.5)


def test_a_timeout_is_an_infinite_latency_in_the_tail() -> None:
    records = [_ok(ms) for ms in range(1, 99)] + [CallRecord("", 0.0, 9.0, "DEADLINE_EXCEEDED")] * 2
    summary = summarize(records, elapsed_s=1.0)
    assert (summary.ok, summary.timed_out, summary.failed) == (98, 2, 0)
    assert summary.p50_ms == pytest.approx(50.5)  # the median of 98 successes and 2 infinities
    assert summary.p99_ms == math.inf and summary.max_ms == math.inf
    assert summary.mean_ms == pytest.approx(49.5)  # over the successes only


@pytest.mark.parametrize(
    ("records", "ok", "p99_is_nan"),
    [
        ([], 0, True),
        ([CallRecord("", 0.0, 0.002, "OK")], 1, False),
        ([CallRecord("", 0.0, 0.002, "INTERNAL")], 0, True),
    ],
)
def test_summary_of_empty_single_and_all_failed(
    records: list[CallRecord], ok: int, p99_is_nan: bool
) -> None:
    summary = summarize(records, elapsed_s=1.0)
    assert summary.ok == ok
    assert math.isnan(summary.p99_ms) is p99_is_nan


def test_stream_records_give_time_to_first_token_and_inter_token_gaps() -> None:
    stream = CallRecord("m", 0.0, 0.050, "OK", first_response_s=0.010, inter_response_s=(0.01,) * 4)
    summary = summarize([stream, _ok(5.0)], elapsed_s=1.0)
    assert summary.ttft_p50_ms == pytest.approx(10.0)
    assert summary.itl_p50_ms == pytest.approx(10.0) and summary.itl_p99_ms == pytest.approx(10.0)


def test_arrival_schedules_are_seeded_and_spaced_by_the_rate() -> None:
    first = poisson_arrivals(1000.0, 20.0, random.Random(3))
    assert first == poisson_arrivals(1000.0, 20.0, random.Random(3))
    assert first != poisson_arrivals(1000.0, 20.0, random.Random(4))
    assert all(0 <= t < 20.0 for t in first)
    assert first == sorted(first)
    gaps = [b - a for a, b in itertools.pairwise(first)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 1000, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.stdev(gaps) == pytest.approx(1 / 1000, rel=0.05)
    assert fixed_arrivals(4.0, 1.0) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="rate_rps"):
        poisson_arrivals(0.0, 1.0, random.Random(1))


def test_status_of_names_grpc_codes_and_other_failures() -> None:
    metadata = grpc.aio.Metadata()
    rpc_error = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, metadata, metadata)
    assert status_of(rpc_error) == "RESOURCE_EXHAUSTED"
    assert status_of(TimeoutError()) == "DEADLINE_EXCEEDED"
    assert status_of(KeyError("x")) == "KeyError"


class _Refused(Exception):
    pass


def test_closed_loop_counts_errors_by_status_and_keeps_tags() -> None:
    calls = 0

    def make(worker: int, _at: float) -> Request:
        async def call() -> None:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.002)
            if calls % 4 == 0:
                raise _Refused

        return Request(call, tag=f"w{worker}")

    run = asyncio.run(run_closed_loop(make, concurrency=3, duration_s=0.3))
    summary = summarize(run.records, run.elapsed_s)
    assert summary.requests > 20
    assert summary.errors_by_status == {"_Refused": summary.errors}
    assert summary.errors == pytest.approx(summary.requests / 4, abs=3)
    assert summary.p50_ms >= 2.0
    assert {r.tag for r in run.records} == {"w0", "w1", "w2"}


def test_refusals_keep_their_retry_hint() -> None:
    trailers = grpc.aio.Metadata(("retry-after-ms", "250"))
    shed = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailers)

    async def refuse() -> None:
        raise shed

    run = asyncio.run(run_open_loop(lambda _i, _at: Request(refuse, "low"), arrivals=[0.0, 0.001]))
    assert [(r.tag, r.status, r.retry_after_ms) for r in run.records] == [
        ("low", "RESOURCE_EXHAUSTED", 250.0)
    ] * 2


def test_open_loop_measures_from_the_scheduled_time_not_the_send() -> None:
    """Coordinated omission: a call sent late still counts its lateness. A fake clock that
    jumps 1 s as each request is made stands for a generator stalled by the load: the calls
    go out at t=1 and t=2 and both answer at t=2, so from the send they would take 1 s and
    0 s; from their scheduled times (0 and 0.5) they take 2 s and 1.5 s."""
    clock = FakeClock(0.0)

    async def instant() -> None:
        return None

    def make(_index: int, _at: float) -> Request:
        clock.advance(1.0)
        return Request(instant)

    run = asyncio.run(run_open_loop(make, arrivals=[0.0, 0.5], clock=clock))
    assert sorted(r.started_s for r in run.records) == [0.0, 0.5]
    assert sorted(r.latency_s for r in run.records) == [1.5, 2.0]


def test_open_loop_sends_every_arrival_bounds_outstanding_calls_and_times_out() -> None:
    async def quick() -> None:
        await asyncio.sleep(0.001)

    arrivals = poisson_arrivals(200, 0.5, random.Random(11))
    run = asyncio.run(run_open_loop(lambda _i, _at: Request(quick), arrivals=arrivals))
    assert len(run.records) == len(arrivals)
    assert all(r.status == "OK" for r in run.records)

    async def stuck() -> None:
        await asyncio.sleep(0.5)

    run = asyncio.run(
        run_open_loop(
            lambda _i, _at: Request(stuck), arrivals=fixed_arrivals(100, 0.1), max_outstanding=2
        )
    )
    assert Counter(r.status for r in run.records) == {"OK": 2, "GENERATOR_SATURATED": 8}
    run = asyncio.run(run_open_loop(lambda _i, _at: Request(stuck), arrivals=[0.0], timeout_s=0.05))
    assert [r.status for r in run.records] == ["DEADLINE_EXCEEDED"]


# --- pure pieces of the scenarios ----------------------------------------------------------


def test_h2load_log_is_read_as_latencies_and_http_statuses() -> None:
    log = "1700000000000000\t200\t1500\n1700000000001000\t200\t2500\n1700000000002000\t503\t10\n"
    summary = parse_h2load_log(log, duration_s=1.0)
    assert (summary.ok, summary.errors_by_status) == (2, {"HTTP_503": 1})
    assert summary.p50_ms == pytest.approx(2.0)


def test_grpc_frame_is_length_prefixed() -> None:
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_zipf_popularity_is_skewed_and_sums_to_one() -> None:
    shares = zipf_popularity(6, 1.2)
    assert sum(shares) == pytest.approx(1.0)
    assert shares == sorted(shares, reverse=True)
    assert shares[0] > 2 * shares[1] > shares[2]


@pytest.mark.parametrize("template", ["codegen", "codegen_stream"])
def test_model_config_variants_rename_reseed_and_drop_only_the_batcher(template: str) -> None:
    text = (DEFAULT_MODEL_REPOSITORY / template / "config.pbtxt").read_text()
    off = model_config(text, "copy_b", 99, batcher=False)
    on = model_config(text, "copy_b", 99, footprint_bytes=123456)
    for variant in (off, on):
        assert 'name: "copy_b"' in variant
        assert 'key: "seed" value: { string_value: "99" }' in variant
        assert "version_policy" not in variant
        assert "max_batch_size: 8" in variant
    assert 'key: "pointsman.memory_bytes" value: { string_value: "123456" }' in on
    assert 'key: "pointsman.memory_bytes" value: { string_value: "75497472" }' in off
    assert "dynamic_batching" in on and "max_queue_delay_microseconds" in on
    assert "dynamic_batching" not in off and "default_queue_policy" not in off


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({("i0", "m"): (10.0, 10.0)}, {("i0", "m"): (50.0, 20.0)}, 4.0),
        ({}, {("i0", "m"): (12.0, 3.0)}, 4.0),  # a series that appeared counts from zero
        ({("i0", "m"): (90.0, 30.0)}, {("i0", "m"): (6.0, 6.0)}, math.nan),  # reset by a reload
        ({("i0", "m"): (1.0, 1.0)}, {}, math.nan),  # vanished: its model was unloaded
        (
            {("i0", "m"): (5.0, 5.0), ("i1", "m"): (0.0, 0.0)},
            {("i0", "m"): (9.0, 7.0), ("i1", "m"): (8.0, 1.0)},
            4.0,  # summed over instances: 12 inferences in 3 executions
        ),
    ],
)
def test_average_batch_over_the_window(
    before: dict[tuple[str, str], tuple[float, float]],
    after: dict[tuple[str, str], tuple[float, float]],
    expected: float,
) -> None:
    got = average_batch(before, after)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


# --- the scale scenario and the report --------------------------------------------------------


def test_scale_scenario_quick_mode_measures_every_shape() -> None:
    result = run_scale(QUICK)
    rows = result.tables[0].rows
    assert [row[0] for row in rows] == [f"{s.instances} x {s.models}" for s in QUICK.shapes]
    for row in rows:
        p50, p99, per_core = float(str(row[2])), float(str(row[3])), float(str(row[4]))
        assert 0 < p50 <= p99
        assert per_core > 0
    assert [t.met for t in result.targets] == [None]  # 1000 instances are not in quick mode


def test_report_writes_json_markdown_and_png_with_provenance(tmp_path: Path) -> None:
    result = ScenarioResult(
        name="demo",
        title="Demo scenario",
        tables=(Table("figures", ("system", "p99 ms"), (("a|b", 1.5), ("c", math.nan))),),
        bars=(BarGroup("p99", "ms", ("a", "c"), (1.5, math.inf)),),
        targets=(TargetCheck("p99", "< 2 ms", "1.5 ms", True),),
        notes=("a note",),
        data={"p99": math.nan, "tail": math.inf},
    )
    origin = provenance()
    run = BenchRun(
        "pointsman bench --scenario demo", "2026-01-01T00:00:00Z", machine_info(), (result,), origin
    )
    paths = write_report(run, tmp_path / "out")
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    document = json.loads(paths[0].read_text())
    assert document["schema"] == "pointsman-bench/2"
    assert document["machine"]["cores"] >= 1
    assert len(document["provenance"]["commit"]) == 40  # this checkout's HEAD
    assert document["provenance"]["dirty"] is bool(document["provenance"]["dirty_paths"])
    assert len(document["provenance"]["loadavg_start"]) == 3
    # NaN (not measured) is null; an infinite latency (a timeout) is "inf".
    assert document["scenarios"][0]["data"] == {"p99": None, "tail": "inf"}
    markdown = paths[1].read_text()
    assert "| system | p99 ms |" in markdown
    assert "| a/b | 1.50 |" in markdown and "| c | - |" in markdown
    assert "| p99 | < 2 ms | 1.5 ms | yes |" in markdown
    assert run.machine.cpu_model in markdown and origin.commit in markdown
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("value", "text"),
    [(1234.5, "1,234"), (12.34, "12.3"), (1.234, "1.23"), (0.01234, "0.0123"), (None, "-"),
     (True, "yes"), (7, "7")],
)  # fmt: skip
def test_format_cell(value: object, text: str) -> None:
    assert format_cell(value) == text


def test_a_scenario_read_back_from_results_json_renders_the_same(tmp_path: Path) -> None:
    """What a quick run's second lane hands back: the scenario as written, NaN and inf
    included, renders the same markdown."""
    result = ScenarioResult(
        name="demo",
        title="Demo",
        tables=(Table("figures", ("system", "p99 ms"), (("a", 1.5), ("b", math.nan))),),
        bars=(BarGroup("p99", "ms", ("a", "b", "c"), (1.5, math.nan, math.inf), log_scale=True),),
        targets=(TargetCheck("p99", "< 2 ms", "1.5 ms", None),),
        notes=("a note",),
        data={"tail": math.inf},
        wall_s=2.5,
    )
    run = BenchRun("pointsman bench --scenario demo", "2026-01-01T00:00:00Z", machine_info(), ())
    paths = write_report(replace(run, scenarios=(result,)), tmp_path / "out", plot=False)
    assert [p.name for p in paths] == ["results.json", "results.md"]
    (entry,) = json.loads(paths[0].read_text())["scenarios"]
    back = scenario_from_json(entry)
    assert back.bars[0].values[0] == 1.5 and math.isnan(back.bars[0].values[1])
    assert back.bars[0].values[2] == math.inf and back.bars[0].log_scale
    assert (back.targets, back.notes, back.wall_s) == (result.targets, result.notes, 2.5)
    assert render_markdown(replace(run, scenarios=(back,))) == paths[1].read_text()
    assert "- ran 2.5 s" in paths[1].read_text()


@pytest.mark.parametrize(
    ("values", "text"),
    [([], "-"), ([2.0], "2"), ([1.0, 2.0, 3.0], "2 [1, 3]")],
)
def test_an_interval_reads_as_median_and_bounds_from_two_samples_on(
    values: list[float], text: str
) -> None:
    assert bootstrap_median(values, random.Random(0)).text() == text


def test_rounds_rotate_the_paths_and_keep_every_run_in_round_order() -> None:
    settings = PathSettings(rounds=3, concurrencies=(1, 64))
    order: list[tuple[int, str]] = []

    def measure(path: str, concurrency: int) -> str:
        order.append((concurrency, path))
        return f"{path}@{concurrency}#{len(order)}"

    runs = measure_rounds(["a", "b", "c"], settings, measure, lambda _line: None, "test")
    assert [p for c, p in order if c == 1] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert list(runs) == [(1, "a"), (1, "b"), (1, "c"), (64, "a"), (64, "b"), (64, "c")]
    assert runs[(64, "b")] == ["b@64#5", "b@64#10", "b@64#18"]


def _summary(p50_ms: float, p99_ms: float, rps: float, errors: int = 0) -> LoadSummary:
    return LoadSummary(
        requests=100 + errors,
        ok=100,
        timed_out=0,
        failed=errors,
        errors_by_status={"UNAVAILABLE": errors} if errors else {},
        elapsed_s=1.0,
        throughput_rps=rps,
        p50_ms=p50_ms,
        p90_ms=p50_ms,
        p99_ms=p99_ms,
        max_ms=p99_ms,
        mean_ms=p50_ms,
    )


def test_what_a_path_adds_is_taken_per_round_against_that_rounds_direct_run() -> None:
    direct = [_summary(1.0, 2.0, 1000.0), _summary(3.0, 6.0, 500.0), _summary(2.0, 4.0, 800.0)]
    # Each round's sidecar run is its direct run plus 0.5 ms at p50, at 80 % of its rate:
    # the rounds' drift (1 to 3 ms) cancels out.
    sidecar = [_summary(d.p50_ms + 0.5, d.p99_ms + 1.0, d.throughput_rps * 0.8) for d in direct]
    sidecar[1] = replace(sidecar[1], requests=102, failed=2)
    figures = path_figures(sidecar, direct, seed=1)
    assert figures.added_p50_ms.median == pytest.approx(0.5)
    assert figures.added_p50_ms.low == pytest.approx(0.5) == figures.added_p50_ms.high
    assert figures.added_p99_ms.median == pytest.approx(1.0)
    assert figures.throughput_vs_direct.median == pytest.approx(0.8)
    assert figures.p50_ms.median == pytest.approx(2.5) and figures.p50_ms.samples == 3
    assert figures.errors == 2
    assert figures.cells(is_direct=True)[3:6] == ("-", "-", "-")


def test_h2load_takes_durations_to_the_millisecond() -> None:
    argv = h2load_command("127.0.0.1:1", Path("body"), 0.3, 64, Path("log"), warmup_s=0.1)
    assert "--duration=300ms" in argv and "--warm-up-time=100ms" in argv
    assert "--max-concurrent-streams=64" in argv


def test_the_shared_fleets_policy_is_the_union_and_the_router_accepts_it(tmp_path: Path) -> None:
    document = yaml.safe_load(shared_policy(ALL_ON_TWO))
    assert document["placement"] == {"enabled": False}
    assert set(document["priority_classes"]) == {"high", "low"}
    assert document["models"]["codegen"] == {"min_copies": 1, "versions": {"split": {"2": 1}}}
    for text in (SPLIT, ALL_ON_TWO):
        path = tmp_path / "policy.yaml"
        path.write_text(shared_policy(text))
        assert main(["policy", "check", str(path)]) == 0


@pytest.mark.parametrize(
    ("base", "overlay", "expected"),
    [
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}, {"a": {"x": 1, "y": 3}}),
        ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),
        ({"a": [1]}, {"a": [2]}, {"a": [2]}),
    ],
)
def test_merged_writes_the_overlay_over_the_base_key_by_key(
    base: dict[str, object], overlay: dict[str, object], expected: dict[str, object]
) -> None:
    assert merged(base, overlay) == expected


def test_committed_results_of_this_schema_are_valid() -> None:
    """Every committed results.json that says pointsman-bench/2 matches the JSON Schema."""
    checked = 0
    for path in sorted(RESULTS.rglob("results.json")):
        document = json.loads(path.read_text())
        if document.get("schema") == SCHEMA:
            RESULTS_SCHEMA.validate(document)
            checked += 1
    assert checked > 0


# --- end to end, real Triton ----------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.timeout(120)
def test_stream_calls_time_every_token_and_count_model_errors(tmp_path: Path) -> None:
    """The generator's streaming call against codegen_stream on a real Triton."""
    spec = TritonSpec.on_free_ports(
        "bench-stream", load_models=("codegen_stream",), log_path=tmp_path / "triton.log"
    )
    process = triton_process(spec, prepare_installation())
    process.start()
    try:
        wait_until_ready(spec.grpc_address, ["codegen_stream"], 60, process)
        good = infer_request_bytes("codegen_stream", codegen_inputs("def f():", 4))
        bad = infer_request_bytes("codegen_stream", codegen_inputs("def f():", 0))

        async def run() -> tuple[LoadSummary, LoadSummary]:
            async with grpc.aio.insecure_channel(spec.grpc_address) as channel:
                calls = TritonCalls(channel, timeout_s=30)
                ok = await run_closed_loop(
                    lambda _w, _at: Request(calls.stream(good, 4)),
                    concurrency=2,
                    duration_s=1.0,
                    warmup_s=0.3,
                )
                failed = await run_closed_loop(
                    lambda _w, _at: Request(calls.stream(bad, 4)), concurrency=1, duration_s=0.3
                )
                return summarize(ok.records, ok.elapsed_s), summarize(
                    failed.records, failed.elapsed_s
                )

        ok, failed = asyncio.run(run())
    finally:
        stop_all([process])
    assert ok.ok > 0 and ok.errors == 0, ok
    assert 0 < ok.ttft_p50_ms <= ok.p50_ms
    assert 0 < ok.itl_p50_ms < ok.p50_ms
    assert failed.ok == 0 and failed.errors_by_status == {"StreamError": failed.requests}


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_bench_quick_smokes_every_scenario_on_real_tritons(tmp_path: Path) -> None:
    """The CI smoke run: `pointsman bench --quick` runs every scenario end to end (its own
    process: the proxyless scenario sets GRPC_XDS_BOOTSTRAP), exits 0, and writes a
    results.json that matches the JSON Schema and holds what each scenario must measure."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", "--quick", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=580, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    document = json.loads((out / "results.json").read_text())
    RESULTS_SCHEMA.validate(document)
    assert document["machine"]["triton_server"] and "--quick" in document["command"]
    assert len(document["provenance"]["commit"]) == 40
    assert (out / "results.md").exists() and not (out / "results.png").exists()
    scenarios = {s["name"]: s for s in document["scenarios"]}
    assert list(scenarios) == list(SCENARIOS)  # every one, in the registry's order
    assert all(s["wall_s"] > 0 for s in scenarios.values())
    for name in ON_SHARED_FLEET:
        assert any("shared" in note for note in scenarios[name]["notes"]), name
    _check_comparison(scenarios["comparison"]["data"])
    _check_seed_table(scenarios["seed-table"])
    # Pointsman served, in one of its two quick cells at least: each has two seconds of warm-up
    # to load its models from nothing, which a busy machine may not be enough for.
    pointsman = [
        c["latency"]["ok"]
        for c in (
            *scenarios["comparison"]["data"]["cells"],
            *scenarios["seed-table"]["data"]["systems"],
        )
        if c["system"] == "pointsman"
    ]
    assert len(pointsman) == 2 and sum(pointsman) > 0, pointsman
    _check_paths(scenarios["overhead"], {"direct", "sidecar", "minimal proxy"})
    _check_paths(scenarios["proxyless"], {"direct", "proxyless", "sidecar", "bare proxy"})
    _check_proxyless_costs(scenarios["proxyless"]["data"]["cells"])
    batching = scenarios["batching"]["data"]
    assert set(batching["decode_step_ms"]) == {"1", "2", "4", "8"}
    assert {c["batcher"] for c in batching["triton"]} == {"on", "off"}
    assert all(run["ok"] > 0 for c in batching["triton"] for run in c["runs"])
    (overload,) = scenarios["overload"]["data"]["cells"]
    assert overload["max_in_flight"] == 8 and overload["high"]["sent"] > 0
    propagation = scenarios["route-propagation"]["data"]
    assert (len(propagation["load_ms"]), len(propagation["policy_applied_ms"])) == (1, 2)
    assert propagation["traffic_during_reloads"]["ok"] > 0
    sweep = scenarios["scale-sweep"]["data"]["sweep"]
    assert [m["holders_per_model"] for m in sweep] == [1, 8, 100]


def _check_comparison(data: dict[str, Any]) -> None:
    """Two systems, one closed-loop workload (no capacity cell), one instance."""
    assert data["capacity"] is None and data["failed_cells"] == []
    cells = data["cells"]
    assert [(c["system"], c["workload"]) for c in cells] == [
        ("static-split", "shift-closed"),
        ("pointsman", "shift-closed"),
    ]
    for cell in cells:
        assert cell["latency"]["requests"] > 0, cell
        assert cell["final_placement"] and {"tritons", "bench_process"} <= set(cell["cost"])
    static, pointsman = cells
    assert static["latency"]["ok"] > 0, static  # placed at start, before the window
    assert static["warmup_loads"]["loads"] == static["loads"]["loads"] == 0
    assert sorted(m for ms in static["final_placement"].values() for m in ms) == [
        "codegen_a",
        "codegen_b",
    ]
    assert {"router", "sidecar"} <= set(pointsman["cost"])
    # It started empty and placed by demand.
    assert pointsman["warmup_loads"]["loads"] + pointsman["loads"]["loads"] > 0
    assert set(data["aggregates"]["shift-closed"]) == {"static-split", "pointsman"}


def _check_seed_table(scenario: dict[str, Any]) -> None:
    systems = scenario["data"]["systems"]
    assert [s["label"][:3] for s in systems] == ["(a)", "(c)"]
    assert "(b) not run (quick mode)" in scenario["notes"]
    assert all(s["latency"]["requests"] > 0 for s in systems), systems


def _check_paths(scenario: dict[str, Any], paths: set[str]) -> None:
    """Every path answered every call, at both concurrencies; nghttpx where installed."""
    cells = scenario["data"]["cells"]
    if shutil.which("nghttpx"):
        paths.add("nghttpx")
    assert {c["path"] for c in cells} == paths
    assert {c["concurrency"] for c in cells} == {1, 64}
    for cell in cells:
        (only,) = cell["rounds"]
        assert only["ok"] > 0 and only["errors"] == 0, cell
        assert 0 < cell["p50_ms"]["median"] <= cell["p99_ms"]["median"]


def _check_proxyless_costs(cells: list[dict[str, Any]]) -> None:
    for cell in cells:
        cpu = cell["cpu_us_per_request"]
        assert cpu["client"]["median"] > 0, cell  # the load generator is this process
        assert (cpu["proxy"]["median"] is None) is (cell["path"] in ("direct", "proxyless"))
    # The sidecar and the bare proxy spend CPU on the requests they proxy (summed: one short
    # run each).
    for proxy in ("sidecar", "bare proxy"):
        assert sum(c["cpu_us_per_request"]["proxy"]["median"] for c in cells if c["path"] == proxy)
