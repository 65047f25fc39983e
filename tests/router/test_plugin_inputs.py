"""Plugins declare the snapshot fields they read; the data layer declares what it fills; a
policy over a field no running collector fills is refused at start-up and at a reload."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry

from app.processes import free_port
from pointsman.errors import ConfigError
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from router.config import RouterConfig, parse_router_config
from router.contracts import Candidate, SchedulingCycle, SnapshotField
from router.datalayer.fields import (
    ALWAYS_FILLED,
    METRICS_FILLS,
    CollectedFields,
    collected_fields,
)
from router.decision import check_inputs
from router.plugins.registry import PluginRegistry, build_profile, default_registry
from router.policy import PolicyStore
from router.server import inputs_check, start_router
from tests.support.loop_thread import LoopThread

REPO = Path(__file__).resolve().parents[2]
WITH_METRICS = {"id": "a", "grpc": "127.0.0.1:1", "metrics_url": "http://127.0.0.1:2/metrics"}
NO_METRICS = {"id": "a", "grpc": "127.0.0.1:1"}
METRICS_OFF = "metrics scraping is off: no instance in `instances` has a metrics_url"
# A policy that reads nothing the metrics scrape fills.
INDEX_ONLY = """\
scheduling:
  scorers:
    - {type: model-affinity, weight: 3}
    - {type: memory-headroom, weight: 1}
"""
WITH_QUEUE = INDEX_ONLY + "    - {type: queue-depth, weight: 2}\n"
QUEUE_REFUSED = (
    "scheduling.scorers[2] (queue-depth): reads model.pending_requests, which no running "
    f"collector fills ({METRICS_OFF})"
)


def config(data: Mapping[str, Any]) -> RouterConfig:
    return parse_router_config(dict(data))


# --- what the data layer fills ---------------------------------------------------------------


def test_every_snapshot_field_has_a_collector() -> None:
    assert frozenset(SnapshotField) == ALWAYS_FILLED | METRICS_FILLS


@pytest.mark.parametrize(
    ("data", "off"),
    [
        pytest.param({"instances": [WITH_METRICS]}, "", id="static-with-metrics"),
        pytest.param(
            {"instances": [NO_METRICS, {**WITH_METRICS, "id": "b"}]}, "", id="static-some-metrics"
        ),
        pytest.param(
            {"instances": [NO_METRICS]},
            "no instance in `instances` has a metrics_url",
            id="static-no-metrics",
        ),
        pytest.param({}, "", id="static-empty-list-says-nothing"),
        pytest.param({"discovery": {"kind": "kubernetes"}}, "", id="kubernetes"),
        pytest.param(
            {"discovery": {"kind": "kubernetes", "metrics_port_name": ""}},
            "discovery.metrics_port_name is empty",
            id="kubernetes-no-metrics-port",
        ),
        pytest.param({"discovery": {"kind": "dns", "service": "t.local"}}, "", id="dns"),
        pytest.param(
            {"discovery": {"kind": "dns", "service": "t.local", "metrics_port": 0}},
            "discovery.metrics_port is 0",
            id="dns-metrics-port-0",
        ),
    ],
)
def test_collected_fields(data: Mapping[str, Any], off: str) -> None:
    collected = collected_fields(config(data))
    if not off:
        assert collected.filled == frozenset(SnapshotField)
        return
    assert collected.filled == ALWAYS_FILLED
    assert collected.unfilled_because == {
        field: f"metrics scraping is off: {off}" for field in METRICS_FILLS
    }


# --- the check of a profile against them ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuScorer:
    """Reads a field only Triton's GPU metrics fill."""

    TYPE_NAME: ClassVar[str] = "gpu-idle"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset({SnapshotField.GPU_UTILIZATION})

    name: str = TYPE_NAME

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        return [1.0 - (c.instance.gpu_utilization or 0.0) for c in candidates]

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> GpuScorer:
        return cls(name)


def registry_with_gpu() -> PluginRegistry:
    registry = default_registry()
    registry.register_plugin(GpuScorer)
    return registry


EVERYTHING = CollectedFields.everything()
NO_SCRAPE = collected_fields(config({"instances": [NO_METRICS]}))


@pytest.mark.parametrize(
    ("scheduling", "collected", "message"),
    [
        pytest.param({}, EVERYTHING, None, id="default-with-metrics"),
        pytest.param(
            {},
            NO_SCRAPE,
            "scheduling.scorers[1] (queue-depth): reads model.pending_requests, which no "
            f"running collector fills ({METRICS_OFF})",
            id="default-without-metrics",
        ),
        pytest.param(yaml.safe_load(INDEX_ONLY)["scheduling"], NO_SCRAPE, None, id="index-only"),
        pytest.param(
            {"scorers": [{"type": "load", "name": "busy", "weight": 1}]},
            NO_SCRAPE,
            "scheduling.scorers[0] (busy): reads instance.inferences_per_second, which no "
            f"running collector fills ({METRICS_OFF})",
            id="named-load-scorer",
        ),
        pytest.param(
            {"scorers": [{"type": "gpu-idle", "weight": 1}]},
            NO_SCRAPE,
            "scheduling.scorers[0] (gpu-idle): reads instance.gpu_utilization, which no "
            f"running collector fills ({METRICS_OFF})",
            id="gpu-field-without-metrics",
        ),
        pytest.param(
            {"filters": [{"type": "model-ready"}], "scorers": [{"type": "gpu-idle", "weight": 1}]},
            CollectedFields(ALWAYS_FILLED, {}),
            "scheduling.scorers[0] (gpu-idle): reads instance.gpu_utilization, which no "
            "running collector fills (no collector fills it)",
            id="field-nobody-fills",
        ),
        pytest.param(
            {"filters": [{"type": "healthy-fresh"}], "scorers": []},
            CollectedFields(frozenset(), {}),
            "scheduling.filters[0] (healthy-fresh): reads instance.healthy",
            id="filter",
        ),
    ],
)
def test_check_inputs(
    scheduling: Mapping[str, Any], collected: CollectedFields, message: str | None
) -> None:
    profile = build_profile(scheduling, registry_with_gpu())
    if message is None:
        check_inputs(profile, collected)
        return
    with pytest.raises(ConfigError) as caught:
        check_inputs(profile, collected)
    assert str(caught.value).startswith(message)


# --- refused at start-up and at a reload ----------------------------------------------------


def test_store_refuses_at_start_and_at_reload_and_keeps_the_running_policy(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(WITH_QUEUE)
    with pytest.raises(ConfigError, match=r"^scheduling\.scorers\[2\] \(queue-depth\)"):
        PolicyStore(path, check=inputs_check(NO_SCRAPE))
    # The built-in default runs anywhere: without metrics its load scorers score all alike.
    assert PolicyStore(None, check=inputs_check(NO_SCRAPE)).current.source

    path.write_text(INDEX_ONLY)
    store = PolicyStore(path, check=inputs_check(NO_SCRAPE))
    running = store.current.version
    path.write_text(WITH_QUEUE)
    with pytest.raises(ConfigError) as caught:
        store.reload()
    assert str(caught.value) == QUEUE_REFUSED
    assert store.current.version == running
    # With metrics scraped, the same file is taken.
    assert PolicyStore(path, check=inputs_check(EVERYTHING)).current.version != running


@pytest.mark.asyncio
async def test_watched_file_over_an_unfilled_field_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(INDEX_ONLY)
    store = PolicyStore(path, check=inputs_check(NO_SCRAPE))
    running = store.current.version
    watcher = asyncio.create_task(store.watch(interval_s=0.05))
    try:
        with caplog.at_level(logging.WARNING, logger="router.policy"):
            path.write_text(WITH_QUEUE)
            await asyncio.sleep(0.5)
        assert store.current.version == running
        assert any(QUEUE_REFUSED in r.getMessage() for r in caplog.records)
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


def test_router_refuses_to_start_before_binding(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(WITH_QUEUE)
    loop = LoopThread()
    try:
        with pytest.raises(ConfigError, match=r"scorers\[2\] \(queue-depth\)"):
            loop.run(
                start_router(
                    config(
                        {
                            "listen": f"127.0.0.1:{port}",
                            "instances": [NO_METRICS],
                            "policy_file": str(policy),
                        }
                    ),
                    registry=CollectorRegistry(),
                )
            )
    finally:
        loop.close()
    with socket.socket() as probe:  # nothing was bound
        probe.bind(("127.0.0.1", port))


def test_reload_policy_rpc_refuses_and_the_router_keeps_serving(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(INDEX_ONLY)
    listen = f"127.0.0.1:{free_port()}"
    router_config = config(
        {"listen": listen, "instances": [NO_METRICS], "policy_file": str(policy)}
    )
    loop = LoopThread()
    router = loop.run(start_router(router_config, registry=CollectorRegistry()))
    try:
        with grpc.insecure_channel(listen) as channel:
            stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
            running = stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).policy_version
            policy.write_text(WITH_QUEUE)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == QUEUE_REFUSED
            assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).policy_version == running
    finally:
        loop.run(router.stop(0.1))
        loop.close()


def test_pointsman_router_exits_2_naming_plugin_and_field(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(WITH_QUEUE)
    router_file = tmp_path / "router.yaml"
    router_file.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "instances": [NO_METRICS],
                "policy_file": str(policy),
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "app", "router", "--config", str(router_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"pointsman router: policy {policy}: scheduling.scorers[2] (queue-depth): "
        "reads model.pending_requests" in result.stderr
    )
