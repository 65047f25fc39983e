"""`pointsman bench --scenario prefix`: the shared-prefix workload (seeded, shaped as said), the
ideal hit ratio, throughput at equal p99, the simulated agreement of two sidecars, the
model repository it makes, and a quick end-to-end run on real Tritons."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from app.cli import main
from bench.loadgen import Call
from bench.prefix_systems import MODEL, IdealRoute, prefix_repository
from bench.prefix_workload import PrefixWorkload, repository_context, schedule, shareable_blocks
from bench.scenarios.prefix import sidecar_agreement
from bench.scenarios.prefix_report import at_equal_p99

SMALL = PrefixWorkload(repositories=6, context_bytes=1024, turns=3, turn_gap_s=1.0)


def test_the_schedule_is_seeded_and_has_the_rate_and_the_shape_asked_for() -> None:
    arrivals = schedule(SMALL, 40.0, 60.0, random.Random(3))
    assert arrivals == schedule(SMALL, 40.0, 60.0, random.Random(3))
    assert 0.9 * 40 * 60 < len(arrivals) < 1.1 * 40 * 60
    assert [a.at_s for a in arrivals] == sorted(a.at_s for a in arrivals)
    kinds = Counter(a.kind for a in arrivals)
    assert 0.25 < kinds["session"] / len(arrivals) < 0.35
    by_repository = Counter(a.repository for a in arrivals)
    assert by_repository[0] > by_repository[1] > by_repository[5]  # Zipf
    for a in arrivals:
        assert a.prompt.startswith(repository_context(a.repository, SMALL.context_bytes))
    turns: dict[int, list[bytes]] = {}
    for a in arrivals:
        if a.session >= 0:
            turns.setdefault(a.session, []).append(a.prompt)
    assert any(len(t) == SMALL.turns for t in turns.values())
    for prompts in turns.values():  # each turn extends the one before
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(prompts))


def test_a_hot_repository_takes_its_share_and_contexts_differ_from_the_first_block() -> None:
    hot = PrefixWorkload(repositories=6, context_bytes=1024, hot_share=0.5)
    assert hot.popularity()[0] == 0.5 and math.isclose(sum(hot.popularity()), 1.0)
    arrivals = schedule(hot, 50.0, 60.0, random.Random(4))
    share = sum(a.repository == 0 for a in arrivals) / len(arrivals)
    assert 0.45 < share < 0.55
    contexts = [repository_context(r, 1024) for r in range(6)]
    assert len({c[:64] for c in contexts}) == 6 and all(len(c) == 1024 for c in contexts)


def test_shareable_blocks_counts_leading_blocks_an_earlier_request_sent() -> None:
    workload = PrefixWorkload(repositories=1, context_bytes=640, suffix_bytes=64, session_share=0)
    arrivals = schedule(workload, 5.0, 2.0, random.Random(1))
    lookups, hits = shareable_blocks(arrivals, 64)
    assert lookups == 11 * len(arrivals)  # 10 context blocks and a suffix block each
    assert hits == 10 * (len(arrivals) - 1)  # every request after the first finds the context


@pytest.mark.parametrize(
    ("points", "slo", "expected"),
    [
        pytest.param([(10, 20), (30, 40), (90, 50)], 60, 45.0, id="interpolated"),
        pytest.param([(10, 20), (30, 40)], 60, 40.0, id="all-within"),
        pytest.param([(70, 20), (90, 30)], 60, 0.0, id="none-within"),
        pytest.param([(10, 20), (math.inf, 25)], 60, 20.0, id="next-timed-out"),
        pytest.param([(10, 20), (math.nan, 25)], 60, 20.0, id="next-unmeasured"),
        pytest.param([(10, 20)], math.nan, math.nan, id="no-slo"),
    ],
)
def test_throughput_at_equal_p99(
    points: list[tuple[float, float]], slo: float, expected: float
) -> None:
    got = at_equal_p99(points, slo)
    assert got == pytest.approx(expected, nan_ok=True)


def test_two_sidecars_agree_on_everything_while_no_holder_reaches_its_bound() -> None:
    arrivals = schedule(SMALL, 30.0, 20.0, random.Random(5))
    roomy = sidecar_agreement(arrivals, 3, epsilon=100.0, latency_s=0.2, rng=random.Random(1))
    assert roomy["agreement"] == 1.0 and roomy["load_fallback_share"] == 0.0
    tight = sidecar_agreement(arrivals, 3, epsilon=0.25, latency_s=0.2, rng=random.Random(1))
    assert tight == sidecar_agreement(arrivals, 3, 0.25, 0.2, random.Random(1))  # seeded
    assert tight["load_fallback_share"] > 0 and tight["agreement"] < 1.0


def test_the_repository_sets_the_prefill_ratio_and_the_cache(tmp_path: Path) -> None:
    root = prefix_repository(tmp_path, prefill_ratio=0.13, cache_blocks=512, footprint_bytes=99)
    config = (root / MODEL / "config.pbtxt").read_text()
    assert 'key: "prefill_ratio" value: { string_value: "0.13" }' in config
    assert 'key: "prefix_cache_blocks" value: { string_value: "512" }' in config
    assert 'key: "pointsman.memory_bytes" value: { string_value: "99" }' in config
    assert (root / MODEL / "1" / "model.py").resolve().name == "model.py"


def test_the_ideal_keeps_a_session_on_one_instance_and_spreads_the_rest() -> None:
    route = IdealRoute(["a:1", "b:1", "c:1"], random.Random(1))
    chosen: list[str] = []

    def at(address: str) -> Call:
        async def call() -> None:
            chosen.append(address)

        return call

    async def send(session: str, times: int) -> list[str]:
        chosen.clear()
        for _ in range(times):
            await route.send(f"{MODEL}\0{session}", at)
        return list(chosen)

    assert all(len(set(asyncio.run(send(f"s{n}", 5)))) == 1 for n in range(10))
    assert len({asyncio.run(send(f"s{n}", 1))[0] for n in range(30)}) == 3
    assert set(asyncio.run(send("", 30))) == {"a:1", "b:1", "c:1"}


@pytest.mark.triton
@pytest.mark.timeout(400)
def test_prefix_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(
        ["bench", "--scenario", "prefix", "--quick", "--duration", "2", "--no-progress",
         "--systems", "least-request,pointsman-prefix", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    (scenario,) = json.loads((out / "results.json").read_text())["scenarios"]
    cells = scenario["data"]["cells"]
    assert {(c["system"], c["workload"]) for c in cells} == {
        ("least-request", "zipf"),
        ("pointsman-prefix", "zipf"),
    }
    assert scenario["data"]["capacity"] == {"0.26": {"fixed_rps": 8.0}}
    for cell in cells:
        assert cell["latency"]["ok"] > 0 and cell["latency"]["failed"] == 0, cell
        assert cell["latency"]["ttft_p50_ms"] > 0
        assert 0 < cell["prefix_cache"]["hit_ratio"] <= 1
        assert cell["max_mean_load"] >= 1
    assert scenario["data"]["sidecar_agreement"]["zipf"]["requests"] > 0
    assert any(t["name"].startswith("two sidecars agree") for t in scenario["targets"])
