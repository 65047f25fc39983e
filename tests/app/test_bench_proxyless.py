"""The proxyless scenario's own pieces (bench/scenarios/proxyless.py): CPU per request from a
cost window, the "within noise" goal, and the figures per path and concurrency. The scenario
end to end on real Tritons (every path answers, every cell has its costs) is part of the quick
run in tests/app/test_bench.py."""

from __future__ import annotations

import math
import os
import random

import pytest

from bench.procstats import ProcessSampler
from bench.scenarios.paths import PathSettings
from bench.scenarios.proxyless import CostWindow, PathRun, _cells, _noise_target, _result
from bench.stats import LoadSummary, bootstrap_median


def _summary(p50_ms: float) -> LoadSummary:
    return LoadSummary(
        requests=10,
        ok=10,
        timed_out=0,
        failed=0,
        errors_by_status={},
        elapsed_s=1.0,
        throughput_rps=10.0,
        p50_ms=p50_ms,
        p90_ms=p50_ms,
        p99_ms=p50_ms * 2,
        max_ms=p50_ms * 2,
        mean_ms=p50_ms,
    )


def _run(p50_ms: float, client_us: float, proxy_us: float = math.nan) -> PathRun:
    cpu = {"client": client_us, "proxy": proxy_us, "triton": 100.0}
    return PathRun(_summary(p50_ms), cpu, router_cpu_cores=0.01, proxy_peak_rss_mib=proxy_us)


def test_a_cost_window_times_this_process_and_its_wall_time() -> None:
    with CostWindow({"client": ProcessSampler([os.getpid()], interval_s=0.01)}) as window:
        sum(i * i for i in range(300_000))  # some CPU
    assert window.cpu_s("client") > 0 and 0 < window.elapsed_s < 60
    assert window.peak_rss_mib("client") > 10
    assert math.isnan(window.cpu_s("proxy")) and math.isnan(window.peak_rss_mib("proxy"))


@pytest.mark.parametrize(
    ("added_ms", "met"),
    [
        ([0.02, -0.03, 0.01, 0.04, -0.01], True),  # straddles 0: within noise
        ([0.30, 0.25, 0.35, 0.28, 0.31], False),  # always above direct
        ([0.1, -0.1], None),  # two rounds cannot tell noise
        ([0.0], None),
    ],
)
def test_proxyless_is_within_noise_when_the_added_p50_interval_includes_0(
    added_ms: list[float], met: bool | None
) -> None:
    check = _noise_target(bootstrap_median(added_ms, random.Random(3)), 1)
    assert check.met is met
    assert check.measured.endswith("not judged)") is (met is None)


def test_figures_per_path_take_cpu_medians_and_the_proxy_only_where_there_is_one() -> None:
    runs = {
        (1, "direct"): [_run(1.0, 200.0), _run(3.0, 220.0), _run(2.0, 210.0)],
        (1, "proxyless"): [_run(1.1, 230.0), _run(2.9, 250.0), _run(2.0, 240.0)],
        (1, "sidecar"): [_run(2.0, 300.0, 400.0), _run(4.0, 320.0, 420.0), _run(3.0, 310.0, 410.0)],
    }
    cells = {c.path: c for c in _cells(runs, seed=1)}
    assert cells["proxyless"].figures.added_p50_ms.median == pytest.approx(0.0)
    assert cells["sidecar"].figures.added_p50_ms.median == pytest.approx(1.0)
    sidecar = cells["sidecar"].cpu_us_per_request
    assert (sidecar["client"].median, sidecar["proxy"].median) == (310.0, 410.0)
    assert sidecar["client + proxy"].median == 720.0
    direct = cells["direct"].cpu_us_per_request
    assert direct["proxy"].samples == 0 and direct["client + proxy"].median == 210.0
    settings = PathSettings(rounds=3, concurrencies=(1,))
    result = _result(runs, settings, ["direct", "proxyless", "sidecar"], [])
    noise, sidecar_cpu, sidecar_p50 = result.targets
    assert noise.met is True  # added p50 per round: 0.1, -0.1, 0.0
    assert sidecar_cpu.met is False and sidecar_cpu.measured.endswith("us")  # 410 > 200
    assert sidecar_p50.met is False  # +1 ms
    rows = {row[1]: row for row in result.tables[1].rows}
    assert rows["direct"][3] == "-" and rows["sidecar"][3].startswith("410 [")


def test_the_sidecar_targets_show_the_bare_proxy_floor_of_the_same_run() -> None:
    runs = {
        (1, "direct"): [_run(1.0, 200.0)] * 3,
        (1, "proxyless"): [_run(1.0, 200.0)] * 3,
        (1, "sidecar"): [_run(1.3, 300.0, 180.0)] * 3,
        (1, "bare proxy"): [_run(1.2, 250.0, 150.0)] * 3,
    }
    settings = PathSettings(rounds=3, concurrencies=(1,))
    _, cpu, p50 = _result(runs, settings, [path for _, path in runs], []).targets
    assert cpu.met is True and cpu.measured.endswith("(bare proxy: 150 us)")
    assert p50.met is True and p50.measured.endswith("(bare proxy: 0.2 ms)")
    without_sidecar = {key: value for key, value in runs.items() if key[1] != "sidecar"}
    paths = [path for _, path in without_sidecar]
    assert len(_result(without_sidecar, settings, paths, []).targets) == 1
