"""`pointsman top`: its screen in a pseudo-terminal against a real fleet, `--once`, an
unreachable router, and the decision log's table of cases."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from app.fleet import Fleet, FleetConfig
from app.processes import free_port
from app.top import DecisionLog, FleetView, TopState, describe_table, render
from pointsman.router.v1 import router_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two Tritons (each model on both by default), router, sidecar, all on free ports."""
    fleet = Fleet(
        FleetConfig(
            instances=2,
            sidecar_port=0,
            router_port=0,
            run_dir=tmp_path_factory.mktemp("top-fleet"),
        )
    )
    with fleet:
        yield fleet


def _top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "top", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.triton
def test_live_screen_shows_instances_and_models_and_ctrl_c_exits_0(small_fleet: Fleet) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "app", "top", "--router", small_fleet.router_address, "--interval", "0.5"],
        cwd=str(ROOT),
        dimensions=(50, 180),
        env={
            **{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
            "TERM": "xterm-256color",
        },
        encoding="utf-8",
        codec_errors="replace",  # Ctrl-C's echo can land inside a box-drawing character
        timeout=30,
    )
    try:
        for text in ("triton-0", "triton-1", "codegen_stream", "codegen ", "recent decisions"):
            child.expect_exact(text)
        # A later frame still shows the fleet: the view refreshes.
        child.expect_exact("refreshed")
        child.expect_exact("triton-1")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


@pytest.mark.triton
def test_once_prints_one_frame_of_the_fleet(small_fleet: Fleet) -> None:
    done = _top("--router", small_fleet.router_address, "--once")
    assert done.returncode == 0, done.stderr
    screen = done.stdout
    for text in ("triton-0", "triton-1", "codegen", "codegen_stream", "recent decisions"):
        assert text in screen
    # Both instances hold both models (two instances, two copies each), healthy, with a
    # memory budget of 2 GiB, and each model's route lists both with their weights.
    assert screen.count(" ok ") >= 2
    assert "/ 2048 MiB" in screen
    assert "gen " in screen and " -> triton-" in screen
    assert "unreachable" not in screen


def test_once_against_no_router_says_so_and_exits_1() -> None:
    done = _top("--router", f"127.0.0.1:{free_port()}", "--once")
    assert done.returncode == 1
    assert "unreachable" in done.stdout and "UNAVAILABLE" in done.stdout


def _model(name: str, generation: int, *weights: tuple[str, float]) -> pb.ModelSummary:
    return pb.ModelSummary(
        model_name=name,
        route_table=pb.RouteTable(
            model_name=name,
            generation=generation,
            candidates=[
                pb.RouteCandidate(target=pb.Target(instance_id=i), weight=w) for i, w in weights
            ],
        ),
    )


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        pytest.param([[]], [], id="empty fleet"),
        pytest.param(
            [[_model("codegen", 3, ("triton-0", 1.0), ("triton-1", 0.85))]],
            ["gen 3: codegen -> triton-0 1.00, triton-1 0.85"],
            id="first view seeds the log",
        ),
        pytest.param(
            [[_model("codegen", 3, ("triton-0", 1.0))]] * 3,
            ["gen 3: codegen -> triton-0 1.00"],
            id="unchanged tables add nothing",
        ),
        pytest.param(
            [
                [_model("codegen", 3, ("triton-0", 1.0)), _model("echo", 2, ("triton-1", 1.0))],
                [_model("codegen", 7, ("triton-1", 1.0)), _model("echo", 2, ("triton-1", 1.0))],
            ],
            [
                "gen 7: codegen -> triton-1 1.00",
                "gen 3: codegen -> triton-0 1.00",
                "gen 2: echo -> triton-1 1.00",
            ],
            id="a new generation is logged, newest first",
        ),
        pytest.param(
            [[_model("codegen", 3, ("triton-0", 1.0))], [_model("codegen", 4)], []],
            [
                "codegen: gone from every repository index",
                "gen 4: codegen -> no ready instance",
                "gen 3: codegen -> triton-0 1.00",
            ],
            id="no candidates, then gone",
        ),
        pytest.param(
            [[pb.ModelSummary(model_name="codegen")]],
            ["codegen: no route table"],
            id="model without a route table",
        ),
    ],
)
def test_decision_log(views: list[list[pb.ModelSummary]], expected: list[str]) -> None:
    log = DecisionLog()
    for now, view in enumerate(views):
        log.observe(view, float(now))
    assert [d.text for d in log.entries] == expected


def test_decision_log_keeps_the_newest() -> None:
    log = DecisionLog(keep=2)
    for generation in range(5):
        log.observe([_model("codegen", generation, ("triton-0", 1.0))], float(generation))
    assert [d.text for d in log.entries] == [
        "gen 4: codegen -> triton-0 1.00",
        "gen 3: codegen -> triton-0 1.00",
    ]
    assert describe_table(_model("m", 1)) == "gen 1: m -> no ready instance"


def test_decision_log_shows_each_placement_decision_once() -> None:
    decided = pb.PlacementDecision(
        action="load", instance_id="triton-1", reason="requested while loaded nowhere",
        decided_unix_ms=1_700_000_000_000,
    )  # fmt: skip
    model = pb.ModelSummary(model_name="echo", last_decision=decided)
    log = DecisionLog()
    log.observe([model], 1.0)
    log.observe([model], 2.0)
    placements = [e.text for e in log.entries if e.text.startswith("placement:")]
    assert placements == ["placement: load echo on triton-1: requested while loaded nowhere"]


def test_the_models_table_shows_the_prefix_cache_hit_ratio() -> None:
    cached = _model("codegen", 3, ("triton-0", 1.0))
    cached.prefix_cache_lookup_blocks = 640
    cached.prefix_cache_hit_ratio = 0.875
    view = FleetView(instances=(), models=(cached, _model("echo", 2, ("triton-1", 1.0))))
    console = Console(width=200, record=True)
    console.print(render(TopState("r:1", 1.0, view=view, answered_at=0.0), 0.0))
    lines = console.export_text().splitlines()
    assert "prefix hits" in next(line for line in lines if "model" in line and "copies" in line)
    assert "88%" in next(line for line in lines if "codegen" in line)
    assert next(line for line in lines if " echo " in line).rstrip(" │").endswith("-")
