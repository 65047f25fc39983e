"""A smoke run of the proxyless benchmark (bench/scenarios/proxyless.py) on a real Triton:
every path answers, every cell has figures. In a subprocess: the scenario sets
GRPC_XDS_BOOTSTRAP for the process that runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton


@pytest.mark.timeout(240)
def test_proxyless_bench_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "bench.scenarios.proxyless", "--quick", "--duration", "0.3",
         "--out", str(out)],
        capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (scenario,) = json.loads((out / "results.json").read_text())["scenarios"]
    cells = scenario["data"]["cells"]
    paths = {c["path"] for c in cells}
    assert {"direct", "proxyless", "sidecar"} <= paths
    assert ("nghttpx" in paths) is (shutil.which("nghttpx") is not None)
    for cell in cells:
        assert cell["ok"] > 0 and cell["errors"] == 0, cell
        assert cell["client_cpu_us_per_request"] > 0
    assert "Proxyless" in (out / "results.md").read_text()
