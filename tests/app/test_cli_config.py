"""`pointsman router|sidecar --config F` with a bad file: exit 2 at once, before serving,
saying which field is wrong (the real command, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.processes import free_port

REPO = Path(__file__).resolve().parents[2]
# Generous for a loaded CI machine: a start that goes on to serve would never exit at all.
_PROMPT_S = 10.0


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "refresh_interval_s: .nan\n",
            "refresh_interval_s: must be a finite number > 0, got nan",
            id="nan",
        ),
        pytest.param(
            "route_ttl_ms: .inf\n",
            "route_ttl_ms: must be an integer in (0, 4294967295], got inf",
            id="inf",
        ),
        pytest.param(
            "route_ttl_ms: 1.5\n",
            "route_ttl_ms: must be an integer in (0, 4294967295], got 1.5",
            id="fraction",
        ),
        pytest.param(
            "seed: 1\nseed: 2\n", "seed: duplicate key (lines 2 and 3)", id="duplicate-key"
        ),
    ],
)
def test_router_with_a_bad_config_exits_2_naming_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\n{text}")
    result, elapsed = _run("router", "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"pointsman router: {message}"
    assert "listening" not in result.stdout
    assert elapsed < _PROMPT_S


def test_router_with_a_bad_policy_file_exits_2_naming_the_field(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("models:\n  codegen: {min_copies: 1}\n  codegen: {min_copies: 2}\n")
    config = tmp_path / "router.yaml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\npolicy_file: policy.yaml\n")
    result, elapsed = _run("router", "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"pointsman router: policy {policy}: models.codegen: duplicate key (lines 2 and 3)"
    )
    assert "listening" not in result.stdout
    assert elapsed < _PROMPT_S


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        pytest.param(
            "reconnect_initial_s: .nan\n",
            [],
            "reconnect_initial_s: must be a finite number > 0, got nan",
            id="nan",
        ),
        pytest.param(
            "max_attempts: 1.5\n", [], "max_attempts: must be an integer >= 1, got 1.5", id="1.5"
        ),
        pytest.param(
            "max_queued: 1\nmax_queued: 2\n",
            [],
            "max_queued: duplicate key (lines 2 and 3)",
            id="duplicate-key",
        ),
        pytest.param(
            "",
            ["--max-in-flight", "0"],
            "max_in_flight: must be an integer >= 1, got 0",
            id="bad-flag",
        ),
    ],
)
def test_sidecar_with_a_bad_config_exits_2_naming_the_field(
    tmp_path: Path, text: str, flags: list[str], message: str
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\n{text}")
    result, elapsed = _run("sidecar", "--config", str(config), *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"pointsman sidecar: {message}"
    assert "serving" not in result.stdout + result.stderr
    assert elapsed < _PROMPT_S
