"""The system under test: Pointsman (router + sidecar, each its own process) on the testbed.

Started as a user would run it (`app.fleet.Fleet`): the Tritons start empty, the router's
placement controller loads what demand calls for within each instance's budget, and requests
go through the sidecar. The policy file names every model with its footprint, per-copy
capacity and one minimum copy (a user lists the models they serve). Its time constants are
scaled to the benchmark's compressed timeline (a shift happens within seconds here, not hours):
the values are `COMPRESSED_TIMELINE`, written into every result with the policy itself.

`random-among-holders` (bench/baselines/random_among_holders.py) is this system with the
scorers replaced by a uniform pick: same placement, no scoring.

`pointsman-proxyless` is the same router with no proxy hop: the load generator's channels are
stock gRPC xDS channels (`xds:///MODEL`) that the router's xDS server steers with the same
placement and weights (router/README.md, "Proxyless (xDS)"), so requests go straight to
Triton; what a user who cares about the sidecar's CPU would run. gRPC reads the bootstrap file
named by GRPC_XDS_BOOTSTRAP when it creates its xDS client, which it does again once every xDS
channel of the process has closed: so the variable names one file for the whole process and
each cell writes its router's bootstrap there before opening its channels.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.fleet import Fleet, FleetConfig
from app.triton import TritonSpec
from bench.calls import Metadata, TritonCalls, closing
from bench.loadgen import Call
from bench.testbed import Sender, Testbed
from sidecar.config import PickMode

__all__ = [
    "COMPRESSED_TIMELINE",
    "PointsmanDeployment",
    "PointsmanSystem",
    "ProxylessDeployment",
    "policy_document",
    "proxyless",
]

# Placement and demand windows for a benchmark that lasts a minute, not a day.
COMPRESSED_TIMELINE: Mapping[str, Mapping[str, float]] = {
    "placement": {"keep_warm_s": 30, "churn_guard_s": 5, "scale_down_cooldown_s": 10},
    "demand": {
        "bucket_s": 1,
        "span_s": 60,
        "short_window_s": 5,
        "long_window_s": 30,
        "fit_window_s": 10,
        "horizon_s": 5,
        # Two buckets: the one under way and the last complete one.
        "recent_window_s": 2,
    },
}


def policy_document(
    bed: Testbed, scheduling: Mapping[str, Any] | None, timeline: Mapping[str, Any]
) -> dict[str, Any]:
    """The policy file's content for `bed`."""
    document: dict[str, Any] = {
        "models": {
            name: {
                "min_copies": 1,
                "memory_bytes": bed.footprint_bytes,
                "per_copy_capacity_rps": bed.per_copy_capacity_rps,
            }
            for name in bed.models
        },
        **{key: dict(value) for key, value in timeline.items()},
    }
    if scheduling is not None:
        document["scheduling"] = dict(scheduling)
    return document


def _cold_starts(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return int(
            sum(
                sample.value
                for family in families
                if family.name == "pointsman_sidecar_cold_starts"
                for sample in family.samples
                if sample.name.endswith("_total")
            )
        )


class PointsmanDeployment:
    def __init__(self, system: str, fleet: Fleet) -> None:
        self.system = system
        self.fleet = fleet

    @property
    def tritons(self) -> list[TritonSpec]:
        return self.fleet.tritons

    @property
    def triton_pids(self) -> list[int]:
        return [p.pid for p in self.fleet.processes if p.name.startswith("triton-") and p.pid]

    def component_pids(self) -> Mapping[str, int]:
        return {
            p.name: p.pid
            for p in self.fleet.processes
            if p.name in ("router", "sidecar") and p.pid is not None
        }

    @contextlib.asynccontextmanager
    async def connect(self, timeout_s: float = 60.0) -> AsyncIterator[Sender]:
        async with grpc.aio.insecure_channel(self.fleet.sidecar_address) as channel:
            calls = TritonCalls(channel, timeout_s)

            def send(
                model: str, body: bytes, tokens: int | None = None, metadata: Metadata = ()
            ) -> Call:
                # The sidecar reads the model from the request itself.
                return calls.call(body, tokens, metadata)

            yield send

    def delayed_requests(self) -> int:
        """The sidecar's pointsman_sidecar_cold_starts_total: requests that waited for a load."""
        return _cold_starts(self.fleet.sidecar_metrics_url)

    def stop(self) -> None:
        self.fleet.stop()


_BOOTSTRAP_VARIABLE = "GRPC_XDS_BOOTSTRAP"


def _process_bootstrap() -> Path:
    """The one bootstrap file this process's xDS channels read (see the module docstring)."""
    named = os.environ.get(_BOOTSTRAP_VARIABLE)
    if named:
        return Path(named)
    path = Path(tempfile.mkdtemp(prefix="pointsman-bench-xds-")) / "bootstrap.json"
    os.environ[_BOOTSTRAP_VARIABLE] = str(path)
    return path


class ProxylessDeployment(PointsmanDeployment):
    """Pointsman with the load generator on xDS channels, one per model: no sidecar hop."""

    @contextlib.asynccontextmanager
    async def connect(self, timeout_s: float = 60.0) -> AsyncIterator[Sender]:
        if self.fleet.xds_bootstrap is None:
            raise RuntimeError("the fleet wrote no xDS bootstrap")
        shutil.copyfile(self.fleet.xds_bootstrap, _process_bootstrap())
        channels: dict[str, grpc.aio.Channel] = {}
        calls: dict[str, TritonCalls] = {}

        def send(
            model: str, body: bytes, tokens: int | None = None, metadata: Metadata = ()
        ) -> Call:
            if model not in calls:
                channels[model] = grpc.aio.insecure_channel(f"xds:///{model}")
                calls[model] = TritonCalls(channels[model], timeout_s)
            return calls[model].call(body, tokens, metadata)

        async with closing(channels):
            yield send

    def delayed_requests(self) -> int:
        """0: with no sidecar nothing waits for a load (a model loaded nowhere has no route)."""
        return 0


@dataclass(frozen=True)
class PointsmanSystem:
    name: str = "pointsman"
    description: str = (
        "Pointsman: router placement by demand within the budget, sidecar routing from "
        "streamed route tables (default scheduling profile)"
    )
    # The policy's `scheduling` section; None: the default profile.
    scheduling: Mapping[str, Any] | None = None
    pick_mode: PickMode = "table"
    timeline: Mapping[str, Any] = field(default_factory=lambda: COMPRESSED_TIMELINE)
    # Send over xDS channels straight to Triton instead of through the sidecar.
    proxyless: bool = False

    def start(self, bed: Testbed, workdir: Path) -> PointsmanDeployment:
        workdir.mkdir(parents=True, exist_ok=True)
        policy = workdir / "policy.yaml"
        policy.write_text(
            yaml.safe_dump(policy_document(bed, self.scheduling, self.timeline), sort_keys=False)
        )
        fleet = Fleet(
            FleetConfig(
                instances=bed.instances,
                placement={f"triton-{i}": () for i in range(bed.instances)},
                models=bed.models,
                model_repository=bed.repository,
                sidecar_port=0,
                router_port=0,
                memory_budget_bytes=bed.budget_bytes,
                policy_file=policy,
                run_dir=workdir,
                sidecar_pick_mode=self.pick_mode,
            )
        )
        fleet.start()
        deployment = ProxylessDeployment if self.proxyless else PointsmanDeployment
        return deployment(self.name, fleet)


def proxyless() -> PointsmanSystem:
    return PointsmanSystem(
        name="pointsman-proxyless",
        description=(
            "Pointsman's placement and weights with no proxy hop: stock gRPC xDS channels "
            "(xds:///MODEL) steered by the router, straight to Triton"
        ),
        proxyless=True,
    )
