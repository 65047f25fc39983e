"""Shared fixtures: a whole local fleet of real Triton servers, the router and a sidecar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pointsman.fleet import Fleet, FleetConfig

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
