"""Shared fixtures: a whole local fleet of real Triton servers, the router and a sidecar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pointsman.fleet import Fleet, FleetConfig


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three Tritons (codegen on 0 and 1, codegen_stream on 1 and 2), router, sidecar."""
    run_dir: Path = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(FleetConfig(instances=3, sidecar_port=0, router_port=0, run_dir=run_dir))
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()
