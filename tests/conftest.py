"""Shared fixtures: a whole local fleet of real Triton servers, the router and a sidecar.

Every test that starts a real Triton is marked `@pytest.mark.triton` (`pytest -m "not triton"`
runs the fast half). An unmarked test that tries to start one fails with a message saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.fleet import Fleet, FleetConfig
from app.processes import ManagedProcess

# Start-up placement stays as it is (placement never shrinks below it) and `echo` is never
# placed, so the routing tests see a fixed fleet; the cold path has its own tests.
SESSION_POLICY = """\
models:
  codegen: {min_copies: 2}
  codegen_stream: {min_copies: 2}
  echo: {max_copies: 0}
"""


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three Tritons (codegen on 0 and 1, codegen_stream on 1 and 2), router, sidecar."""
    run_dir: Path = tmp_path_factory.mktemp("fleet")
    policy = run_dir / "session-policy.yaml"
    policy.write_text(SESSION_POLICY)
    fleet = Fleet(
        FleetConfig(
            instances=3,
            sidecar_port=0,
            router_port=0,
            run_dir=run_dir,
            policy_file=policy,
            sidecar_args=("--cold-start-wait", "0"),
        )
    )
    with fleet:
        yield fleet


# The test whose setup, call or teardown is running: fixtures of any scope start their
# processes inside one of those phases, so this names the test that asked for a Triton.
_running: list[pytest.Item] = []
_start_process = ManagedProcess.start


def _start_checked(process: ManagedProcess) -> None:
    """Keeps the `triton` mark honest: only a marked test (or its fixtures) starts a Triton."""
    item = _running[-1] if _running else None
    argv = process.spec.argv
    starts_triton = bool(argv) and str(argv[0]).endswith("tritonserver")
    if starts_triton and item is not None and item.get_closest_marker("triton") is None:
        raise AssertionError(f"{item.nodeid} starts a real Triton: mark it @pytest.mark.triton")
    _start_process(process)


ManagedProcess.start = _start_checked  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()
