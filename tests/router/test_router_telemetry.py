"""The router's Prometheus metrics and PickTarget spans, against two real Triton servers.

The router runs in-process (its own event loop thread) with a private registry served on a
free port; every figure is read the way Prometheus reads it: an HTTP scrape of /metrics parsed
with prometheus_client's parser.
"""

from __future__ import annotations

import argparse
import math
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.processes import ManagedProcess, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from pointsman.errors import ConfigError
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.telemetry import Tracing
from router.config import RouterConfig, parse_router_config
from router.main import add_arguments, config_from_args
from router.metrics import UNKNOWN_MODEL
from router.server import RouterServer, start_router
from tests.support.loop_thread import LoopThread

BUDGET = 2 * 1024**3  # triton-0 only: triton-1's budget stays unknown
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@dataclass
class Fleet:
    tritons: list[TritonSpec]
    router: RouterServer
    spans: InMemorySpanExporter
    channel: grpc.Channel

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.router.metrics_port}/metrics"

    def stub(self) -> pb_grpc.RouterServiceStub:
        return pb_grpc.RouterServiceStub(self.channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    installation = prepare_installation()
    logs = tmp_path_factory.mktemp("router-telemetry")
    specs = [
        TritonSpec.on_free_ports(name, load_models=("codegen",), log_path=logs / f"{name}.log")
        for name in ("triton-0", "triton-1")
    ]
    processes: list[ManagedProcess] = [triton_process(s, installation) for s in specs]
    loop = LoopThread()
    router: RouterServer | None = None
    try:
        for process in processes:
            process.start()
        for spec, process in zip(specs, processes, strict=True):
            wait_until_ready(spec.grpc_address, ["codegen"], 90, process)
        config = parse_router_config(
            {
                "listen": "127.0.0.1:0",
                "metrics_listen": "127.0.0.1:0",
                "instances": [
                    {
                        "id": s.instance_id,
                        "grpc": s.grpc_address,
                        "metrics_url": s.metrics_url,
                        **({"memory_budget_bytes": BUDGET} if s is specs[0] else {}),
                    }
                    for s in specs
                ],
                "seed": 7,
            }
        )
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing = Tracing(tracer=provider.get_tracer("test"), provider=provider)
        router = loop.run(start_router(config, registry=CollectorRegistry(), tracing=tracing))
        with grpc.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            fleet = Fleet(specs, router, exporter, channel)
            _wait_for(lambda: _codegen_everywhere(fleet), 15, "router never saw codegen on both")
            yield fleet
    finally:
        if router is not None:
            loop.run(router.stop(0))
        loop.close()
        stop_all(processes, grace_s=8)


def _codegen_everywhere(fleet: Fleet) -> bool:
    instances = fleet.router.snapshot.instances
    return len(instances) == 2 and all(
        i.healthy and (m := i.model("codegen")) is not None and m.is_ready for i in instances
    )


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(fleet: Fleet) -> Samples:
    with urllib.request.urlopen(fleet.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a counter or bucket not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def has(samples: Samples, name: str, **labels: str) -> bool:
    return (name, frozenset(labels.items())) in samples


def codegen_inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    tokens = grpcclient.InferInput("MAX_TOKENS", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [text, tokens]


# -- configuration --


def test_metrics_listen_is_off_by_default_and_validated() -> None:
    assert parse_router_config({}).metrics_listen == ""
    assert parse_router_config({"metrics_listen": "0.0.0.0:0"}).metrics_listen == "0.0.0.0:0"
    with pytest.raises(ConfigError, match="metrics_listen: must be host:port"):
        parse_router_config({"metrics_listen": "9101"})


def test_metrics_listen_flag_overrides_the_file(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    path = tmp_path / "router.yaml"
    path.write_text("metrics_listen: 127.0.0.1:9101\n")
    from_file: RouterConfig = config_from_args(parser.parse_args(["--config", str(path)]))
    assert from_file.metrics_listen == "127.0.0.1:9101"
    args = parser.parse_args(["--config", str(path), "--metrics-listen", "127.0.0.1:0"])
    assert config_from_args(args).metrics_listen == "127.0.0.1:0"


# -- metrics --


@pytest.mark.triton
def test_per_instance_gauges_describe_both_instances(fleet: Fleet) -> None:
    samples = scrape(fleet)
    for spec in fleet.tritons:
        instance = spec.instance_id
        assert value(samples, "pointsman_router_instance_healthy", instance=instance) == 1.0
        age = value(samples, "pointsman_router_instance_data_age_seconds", instance=instance)
        assert 0 <= age < 2
        assert has(samples, "pointsman_router_instance_pending_requests", instance=instance)
        assert has(samples, "pointsman_router_instance_inferences_per_second", instance=instance)
        assert has(samples, "pointsman_router_batch_size", instance=instance, model="codegen")
        # Declared footprints of codegen's two versions: the instances run on CPU.
        assert value(samples, "pointsman_router_memory_used_bytes", instance=instance) > 0
    assert value(samples, "pointsman_router_memory_budget_bytes", instance="triton-0") == BUDGET
    assert not has(samples, "pointsman_router_memory_budget_bytes", instance="triton-1")
    assert value(samples, "pointsman_router_route_generation") >= 1
    assert value(samples, "pointsman_router_route_updates_total") >= 1
    assert value(samples, "pointsman_router_score_duration_seconds_count", operation="rebuild") > 0


@pytest.mark.triton
def test_route_watchers_gauge_follows_watch_streams(fleet: Fleet) -> None:
    assert value(scrape(fleet), "pointsman_router_route_watchers") == 0
    call = fleet.stub().WatchRoutes(pb.WatchRoutesRequest(), timeout=10)
    try:
        next(call)  # the full snapshot: the watcher is registered
        assert value(scrape(fleet), "pointsman_router_route_watchers") == 1
    finally:
        call.cancel()
    _wait_for(
        lambda: value(scrape(fleet), "pointsman_router_route_watchers") == 0, 5, "watcher stayed"
    )


@pytest.mark.triton
def test_picks_are_counted_by_model_and_code(fleet: Fleet) -> None:
    stub = fleet.stub()
    before = scrape(fleet)
    for _ in range(5):
        stub.PickTarget(pb.PickTargetRequest(model_name="codegen"), timeout=5)
    failures = [
        ("no_such_model", grpc.StatusCode.NOT_FOUND),
        ("no_such_model", grpc.StatusCode.NOT_FOUND),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("codegen_stream", grpc.StatusCode.UNAVAILABLE),  # in the repositories, loaded nowhere
    ]
    for model, code in failures:
        with pytest.raises(grpc.RpcError) as info:
            stub.PickTarget(pb.PickTargetRequest(model_name=model), timeout=5)
        assert info.value.code() == code
    after = scrape(fleet)

    def picks(model: str, code: str) -> float:
        return value(after, "pointsman_router_picks_total", model=model, code=code) - value(
            before, "pointsman_router_picks_total", model=model, code=code
        )

    assert picks("codegen", "OK") == 5
    assert picks(UNKNOWN_MODEL, "NOT_FOUND") == 2
    assert picks(UNKNOWN_MODEL, "INVALID_ARGUMENT") == 1
    assert picks("codegen_stream", "UNAVAILABLE") == 1
    assert not any(
        name == "pointsman_router_picks_total" and ("model", "no_such_model") in labels
        for name, labels in after
    )
    # Scheduling ran for the 5 picks and the UNAVAILABLE one, not for the refused names.
    count = "pointsman_router_score_duration_seconds_count"
    assert value(after, count, operation="pick") - value(before, count, operation="pick") == 6
    # Picks over two instances are far below the 50 ms alerting threshold.
    bucket = "pointsman_router_score_duration_seconds_bucket"
    picks_in_50ms = value(after, bucket, operation="pick", le="0.05")
    assert picks_in_50ms == value(after, count, operation="pick")


@pytest.mark.triton
def test_batch_size_and_throughput_move_with_traffic(fleet: Fleet) -> None:
    target = fleet.tritons[0]
    qps_name, batch_name = (
        "pointsman_router_instance_inferences_per_second",
        "pointsman_router_batch_size",
    )

    def client(i: int) -> None:
        with grpcclient.InferenceServerClient(target.grpc_address) as c:
            for j in range(6):
                c.infer("codegen", codegen_inputs(f"def f{i}_{j}():", 4))

    qps_seen = batch_seen = 0.0
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, i) for i in range(16)]
        # While traffic flows, and a little after (the rate window is 5 s).
        deadline = None
        while not (qps_seen > 0 and batch_seen > 1):
            samples = scrape(fleet)
            qps = value(samples, qps_name, instance=target.instance_id)
            batch = value(samples, batch_name, instance=target.instance_id, model="codegen")
            qps_seen, batch_seen = max(qps_seen, qps), max(batch_seen, batch)
            if deadline is None and all(f.done() for f in futures):
                deadline = time.monotonic() + 3
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for future in futures:
            future.result()
    assert qps_seen > 0
    assert batch_seen > 1, "Triton's batcher should have batched 16 concurrent clients"


@pytest.mark.triton
def test_model_load_time_is_observed(fleet: Fleet) -> None:
    name = "pointsman_router_model_load_duration_seconds"
    before = scrape(fleet)
    assert value(before, f"{name}_count", model="echo") == 0
    generation = value(before, "pointsman_router_route_generation")
    target = fleet.tritons[1]
    started = time.monotonic()
    with grpcclient.InferenceServerClient(target.grpc_address) as c:
        c.load_model("echo")
        took = time.monotonic() - started
        try:
            _wait_for(
                lambda: value(scrape(fleet), f"{name}_count", model="echo") == 1,
                5,
                "no load observed for echo",
            )
            after = scrape(fleet)
            observed = value(after, f"{name}_sum", model="echo")
            # Seen LOADING to seen READY: within a few refresh intervals of the real load.
            assert 0 < observed <= took + 0.5
            # The route rebuild that publishes echo may trail the load's observation a little.
            _wait_for(
                lambda: value(scrape(fleet), "pointsman_router_route_generation") > generation,
                5,
                "no route update for echo",
            )
        finally:
            c.unload_model("echo")


# -- tracing --


def _pick_spans(fleet: Fleet) -> list[Any]:
    return [s for s in fleet.spans.get_finished_spans() if s.name == "PickTarget"]


@pytest.mark.triton
def test_pick_span_continues_the_callers_trace(fleet: Fleet) -> None:
    fleet.spans.clear()
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    picked = fleet.stub().PickTarget(
        pb.PickTargetRequest(model_name="codegen", model_version="2"),
        metadata=(("traceparent", traceparent),),
        timeout=5,
    )
    (span,) = _pick_spans(fleet)
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_SPAN_ID
    assert span.parent.is_remote
    assert span.kind is trace.SpanKind.SERVER
    attributes = dict(span.attributes or {})
    assert attributes["pointsman.model"] == "codegen"
    assert attributes["pointsman.model_version"] == "2"
    assert attributes["pointsman.target"] == picked.target.instance_id
    assert attributes["pointsman.fallbacks"] == 1
    scores = dict(part.split("=") for part in str(attributes["pointsman.scores"]).split(","))
    assert set(scores) == {"triton-0", "triton-1"}
    assert all(math.isfinite(float(v)) for v in scores.values())
    assert "model-affinity=" in str(attributes["pointsman.target_scores"])
    assert attributes["rpc.grpc.status_code"] == 0
    assert span.status.status_code is trace.StatusCode.UNSET


@pytest.mark.triton
def test_pick_span_without_a_caller_starts_a_trace(fleet: Fleet) -> None:
    fleet.spans.clear()
    fleet.stub().PickTarget(pb.PickTargetRequest(model_name="codegen"), timeout=5)
    (span,) = _pick_spans(fleet)
    assert span.parent is None


@pytest.mark.triton
def test_failed_pick_spans_say_why(fleet: Fleet) -> None:
    fleet.spans.clear()
    stub = fleet.stub()
    for model in ("codegen_stream", "no_such_model"):
        with pytest.raises(grpc.RpcError):
            stub.PickTarget(pb.PickTargetRequest(model_name=model), timeout=5)
    unavailable, not_found = _pick_spans(fleet)
    assert unavailable.status.status_code is trace.StatusCode.ERROR
    assert "UNAVAILABLE" in (unavailable.status.description or "")
    assert "filtered by" in str((unavailable.attributes or {})["pointsman.filter_trace"])
    assert "pointsman.target" not in (unavailable.attributes or {})
    assert not_found.status.status_code is trace.StatusCode.ERROR
    not_found_code = (not_found.attributes or {})["rpc.grpc.status_code"]
    assert not_found_code == grpc.StatusCode.NOT_FOUND.value[0]
