"""The sidecar's metrics and traces, against a real Triton and an in-test router.

A module fixture starts one tritonserver (codegen, codegen_stream, echo), the stand-in `probe`
upstream that records the metadata it gets, the in-test router of test_sidecar.py, and a
sidecar with its own Prometheus registry served on a free port and an in-memory span exporter.
Metrics are scraped over HTTP and parsed with prometheus_client's parser; the tests compare
figures before and after the traffic they send with stock tritonclient clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, SpanKind
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb

from app.processes import free_port, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from pointsman.errors import ConfigError
from pointsman.router.v1 import router_pb2
from pointsman.telemetry import Tracing
from sidecar.config import SidecarConfig, load_config
from sidecar.main import add_arguments, build_config
from sidecar.server import SidecarServer, start_sidecar
from tests.sidecar.test_sidecar import (
    INFER,
    MODELS,
    FakeRouter,
    LoopThread,
    ProbeTriton,
    client,
    codegen_inputs,
    codes_of,
    echo_inputs,
    serve_router,
    table,
    wait_for,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class RecordingRouter(FakeRouter):
    """The in-test router, also keeping the metadata and headers of each PickTarget call."""

    def __init__(self, snapshot: list[router_pb2.RouteTable]) -> None:
        super().__init__(snapshot)
        self.pick_metadata: queue.Queue[tuple[dict[str, Any], dict[str, str]]] = queue.Queue()

    async def PickTarget(
        self, request: router_pb2.PickTargetRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PickTargetResponse:
        self.pick_metadata.put((dict(context.invocation_metadata()), dict(request.headers)))
        return await super().PickTarget(request, context)


@dataclass
class Rig:
    loop: LoopThread
    triton: TritonSpec
    probe: ProbeTriton
    dead: str  # an address nothing listens on: UNAVAILABLE at once
    router: RecordingRouter
    router_port: int
    router_server: grpc.aio.Server
    sidecar: SidecarServer
    spans: InMemorySpanExporter
    tracing: Tracing

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sidecar.port}"

    def tables(self) -> list[router_pb2.RouteTable]:
        here = self.triton.grpc_address
        return [
            table("codegen", (here, ["1", "2"], 1.0)),
            table("codegen_stream", (here, ["1"], 1.0)),
            table("echo", (here, ["1"], 1.0)),
            table("ghost"),  # known to the fleet, nowhere ready
            # The dead instance weighs so much more that it is always tried first.
            table(
                "probe",
                (self.dead, ["1"], 1e6),
                (f"127.0.0.1:{self.probe.port}", ["1"], 1e-6),
            ),
        ]

    def restore(self) -> None:
        generation = self.router.publish(self.tables(), full=True)
        wait_for(lambda: self.sidecar.cache.generation >= generation, what="routes not applied")

    def scrape(self) -> Samples:
        assert self.sidecar.metrics_url is not None
        return scrape(self.sidecar.metrics_url)


def scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def families(url: str) -> dict[str, str]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def in_memory_tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(tracer=provider.get_tracer("test"), provider=provider), exporter


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    installation = prepare_installation()
    spec = TritonSpec.on_free_ports(
        "triton-t", load_models=MODELS, log_path=tmp_path_factory.mktemp("triton") / "t.log"
    )
    process = triton_process(spec, installation)
    loop = LoopThread()
    probe = ProbeTriton()
    router = RecordingRouter([])
    router_port = free_port()
    try:
        process.start()
        loop.run(probe.start())
        router_server = loop.run(serve_router(router, router_port))
        wait_until_ready(spec.grpc_address, MODELS, 90, process)
        tracing, spans = in_memory_tracing()
        config = SidecarConfig(
            listen="127.0.0.1:0",
            routers=(f"127.0.0.1:{router_port}",),
            metrics_listen="127.0.0.1:0",
            # The stand-in router places nothing: the cold path is off here.
            cold_start_wait_s=0,
            reconnect_initial_s=0.05,
            reconnect_max_s=0.3,
            router_idle_timeout_s=3.0,
        )
        sidecar = loop.run(
            start_sidecar(
                config, rng=random.Random(5), registry=CollectorRegistry(), tracing=tracing
            )
        )
        rig = Rig(
            loop,
            spec,
            probe,
            f"127.0.0.1:{free_port()}",
            router,
            router_port,
            router_server,
            sidecar,
            spans,
            tracing,
        )
        rig.restore()
        yield rig
        loop.run(sidecar.stop(0))
        loop.run(rig.router_server.stop(0))
        tracing.shutdown()
    finally:
        loop.run(probe.stop())
        loop.close()
        stop_all([process], grace_s=8)


def spans_of(rig: Rig, count: int, what: str) -> list[ReadableSpan]:
    """The spans finished so far, once there are `count` of them."""
    wait_for(lambda: len(rig.spans.get_finished_spans()) >= count, what=what)
    return list(rig.spans.get_finished_spans())


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def hex_span(span_id: int) -> str:
    return f"{span_id:016x}"


def stream_tokens(address: str, prompt: str, max_tokens: int, headers: dict[str, str]) -> int:
    """Streams one generation of codegen_stream through `address`; the tokens counted."""
    responses: queue.Queue[Any] = queue.Queue()
    count = 0
    with client(address) as c:
        c.start_stream(
            callback=lambda result, error: responses.put(error or result), headers=headers
        )
        c.async_stream_infer(
            "codegen_stream", codegen_inputs(prompt, max_tokens), enable_empty_final_response=True
        )
        while True:
            item = responses.get(timeout=20)
            if isinstance(item, Exception):
                raise item
            response = item.get_response()
            count += 1 if response.outputs else 0
            if response.parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
    return count


# -- configuration --


def test_metrics_listen_flag_and_field(tmp_path: Path) -> None:
    assert SidecarConfig().metrics_listen == ""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = build_config(parser.parse_args(["--metrics-listen", "0.0.0.0:9101"]))
    assert config.metrics_listen == "0.0.0.0:9101"
    assert SidecarConfig(metrics_listen="127.0.0.1:0").metrics_listen == "127.0.0.1:0"
    for bad in ("nowhere", "9101", "[1, 2]", "host:99999"):
        path = tmp_path / "bad.yaml"
        path.write_text(f"metrics_listen: {bad}\n")
        with pytest.raises(ConfigError, match="metrics_listen"):
            load_config(path)


# -- metrics --


@pytest.mark.triton
def test_every_metric_is_exposed_with_its_type(rig: Rig) -> None:
    assert rig.sidecar.metrics_port and rig.sidecar.metrics_url
    got = families(rig.sidecar.metrics_url)
    # The parser names counters without their _total suffix.
    assert got["pointsman_sidecar_request_duration_seconds"] == "histogram"
    for counter in (
        "requests",
        "upstream_attempts",
        "retries",
        "shed",
        "cold_starts",
        "affinity_hits",
        "routed",
    ):
        assert got[f"pointsman_sidecar_{counter}"] == "counter", counter
    for gauge in (
        "in_flight_requests",
        "route_table_age_seconds",
        "route_tables_stale",
        "router_connected",
    ):
        assert got[f"pointsman_sidecar_{gauge}"] == "gauge", gauge


@pytest.mark.triton
def test_request_counts_and_latency_match_the_traffic(rig: Rig) -> None:
    here = rig.triton.grpc_address
    values = np.ones(4, dtype=np.float32)
    before = rig.scrape()
    with client(rig.address) as via:
        for _ in range(7):
            via.infer("echo", echo_inputs(values))
        for version in ("", "1", "2", "2"):
            via.infer("codegen", codegen_inputs("def f():", 4), model_version=version)
        for _ in range(2):
            code, _ = codes_of(lambda: via.infer("ghost", echo_inputs(values)))
            assert code == grpc.StatusCode.UNAVAILABLE
        # Triton's own error (wrong input name) passes through and is counted as such.
        wrong = grpcclient.InferInput("NOT_AN_INPUT", [4], "FP32")
        wrong.set_data_from_numpy(values)
        code, _ = codes_of(lambda: via.infer("echo", [wrong]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    after = rig.scrape()

    requests = "pointsman_sidecar_requests_total"
    assert moved(before, after, requests, model="echo", method="infer", code="OK") == 7
    assert (
        moved(before, after, requests, model="echo", method="infer", code="INVALID_ARGUMENT") == 1
    )
    assert moved(before, after, requests, model="codegen", method="infer", code="OK") == 4
    assert moved(before, after, requests, model="ghost", method="infer", code="UNAVAILABLE") == 2

    count = "pointsman_sidecar_request_duration_seconds_count"
    assert moved(before, after, count, model="echo", version="default", method="infer") == 8
    assert moved(before, after, count, model="codegen", version="default", method="infer") == 1
    assert moved(before, after, count, model="codegen", version="1", method="infer") == 1
    assert moved(before, after, count, model="codegen", version="2", method="infer") == 2
    labels = {"model": "echo", "version": "default", "method": "infer"}
    assert moved(before, after, "pointsman_sidecar_request_duration_seconds_sum", **labels) > 0
    buckets = sorted(
        (float(dict(key[1])["le"]), v)
        for key, v in after.items()
        if key[0] == "pointsman_sidecar_request_duration_seconds_bucket"
        and {k: v for k, v in key[1] if k != "le"} == labels
    )
    assert buckets[0][0] == 0.001 and buckets[-2][0] == 30.0 and buckets[-1][0] == float("inf")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[-1][1] == value(after, count, **labels)

    # 12 attempts reached Triton (the echo with a wrong input too); ghost never left.
    attempts = "pointsman_sidecar_upstream_attempts_total"
    assert moved(before, after, attempts, instance=here, code="OK") == 11
    assert moved(before, after, attempts, instance=here, code="INVALID_ARGUMENT") == 1
    # Route tables name only instances with the model ready: every routed request is a hit.
    for model, sent in (("echo", 8), ("codegen", 4)):
        assert moved(before, after, "pointsman_sidecar_routed_total", model=model) == sent
        assert moved(before, after, "pointsman_sidecar_affinity_hits_total", model=model) == sent
    assert moved(before, after, "pointsman_sidecar_routed_total", model="ghost") == 0


@pytest.mark.triton
def test_unknown_models_share_one_label_value(rig: Rig) -> None:
    values = np.ones(2, dtype=np.float32)
    before = rig.scrape()
    with client(rig.address) as via:
        for k in range(12):
            code, _ = codes_of(lambda k=k: via.infer(f"bogus-{k}", echo_inputs(values)))  # type: ignore[misc]
            assert code == grpc.StatusCode.NOT_FOUND
        # A version no table lists is not a label value of its own either.
        via.infer("codegen", codegen_inputs("x", 2), model_version="1")
        code, _ = codes_of(
            lambda: via.infer("codegen", codegen_inputs("x", 2), model_version="77777")
        )
        assert code == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(rig.address) as channel:
        raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        code, _ = codes_of(lambda: raw(b"\xff\xff\xff", timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    after = rig.scrape()
    requests = "pointsman_sidecar_requests_total"
    assert moved(before, after, requests, model="_unknown", method="infer", code="NOT_FOUND") == 12
    assert (
        moved(before, after, requests, model="_unknown", method="infer", code="INVALID_ARGUMENT")
        == 1
    )
    count = "pointsman_sidecar_request_duration_seconds_count"
    assert moved(before, after, count, model="_unknown", version="default", method="infer") == 13
    assert moved(before, after, count, model="codegen", version="_unknown", method="infer") == 1
    label_values = {v for key in after for _, v in key[1]}
    assert not any("bogus" in v or "77777" in v for v in label_values)


@pytest.mark.triton
def test_streams_are_counted_once_each(rig: Rig) -> None:
    before = rig.scrape()
    assert stream_tokens(rig.address, "def s():", 5, {}) == 5
    after = rig.scrape()
    assert (
        moved(
            before,
            after,
            "pointsman_sidecar_requests_total",
            model="codegen_stream",
            method="stream",
            code="OK",
        )
        == 1
    )
    assert (
        moved(
            before,
            after,
            "pointsman_sidecar_request_duration_seconds_count",
            model="codegen_stream",
            version="default",
            method="stream",
        )
        == 1
    )
    assert (
        moved(
            before,
            after,
            "pointsman_sidecar_upstream_attempts_total",
            instance=rig.triton.grpc_address,
            code="OK",
        )
        == 1
    )
    assert moved(before, after, "pointsman_sidecar_routed_total", model="codegen_stream") == 1


@pytest.mark.triton
def test_in_flight_rises_under_load_and_returns_to_zero(rig: Rig) -> None:
    here = rig.triton.grpc_address
    in_flight = "pointsman_sidecar_in_flight_requests"
    assert value(rig.scrape(), in_flight, instance=here) == 0
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(value(rig.scrape(), in_flight, instance=here))

    async def burst() -> None:
        via = aioclient.InferenceServerClient(rig.address)
        try:
            await asyncio.gather(
                *(via.infer("codegen", codegen_inputs(f"p{k}", 48)) for k in range(12))
            )
        finally:
            await via.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        asyncio.run(burst())
    finally:
        done.set()
        watcher.join(10)
    assert max(seen) >= 2, seen
    assert value(rig.scrape(), in_flight, instance=here) == 0


@pytest.mark.triton
def test_retry_counts_both_attempts(rig: Rig) -> None:
    probe = f"127.0.0.1:{rig.probe.port}"
    before = rig.scrape()
    with client(rig.address) as via:
        assert via.infer("probe", echo_inputs(np.ones(1, dtype=np.float32))).get_response().id
    rig.probe.seen.get(timeout=5)
    after = rig.scrape()
    attempts = "pointsman_sidecar_upstream_attempts_total"
    assert moved(before, after, attempts, instance=rig.dead, code="UNAVAILABLE") == 1
    assert moved(before, after, attempts, instance=probe, code="OK") == 1
    assert moved(before, after, "pointsman_sidecar_retries_total", model="probe") == 1
    requests = "pointsman_sidecar_requests_total"
    assert moved(before, after, requests, model="probe", method="infer", code="OK") == 1


@pytest.mark.triton
def test_route_gauges_follow_the_router_stream(rig: Rig) -> None:
    samples = rig.scrape()
    # The in-test router sends a heartbeat every 0.3 s.
    assert 0 <= value(samples, "pointsman_sidecar_route_table_age_seconds") < 2.0
    assert value(samples, "pointsman_sidecar_route_tables_stale") == 0
    assert value(samples, "pointsman_sidecar_router_connected") == 1
    rig.loop.run(rig.router_server.stop(0))
    try:
        wait_for(
            lambda: value(rig.scrape(), "pointsman_sidecar_router_connected") == 0,
            what="router_connected still 1",
        )
        assert value(rig.scrape(), "pointsman_sidecar_route_tables_stale") == 1
        wait_for(
            lambda: value(rig.scrape(), "pointsman_sidecar_route_table_age_seconds") > 1.0,
            what="route table age not growing",
        )
    finally:
        rig.router_server = rig.loop.run(serve_router(rig.router, rig.router_port))
        rig.restore()
    wait_for(
        lambda: value(rig.scrape(), "pointsman_sidecar_router_connected") == 1,
        what="router_connected not back to 1",
    )
    samples = rig.scrape()
    assert value(samples, "pointsman_sidecar_route_tables_stale") == 0
    assert value(samples, "pointsman_sidecar_route_table_age_seconds") < 2.0


@pytest.mark.triton
def test_shed_and_cold_start_counters_keep_bounded_labels(rig: Rig) -> None:
    # Nothing sheds or waits for a load yet; the counters exist for the issues that will.
    metrics = rig.sidecar.metrics
    before = rig.scrape()
    metrics.shed_request("echo", 1)
    metrics.shed_request("no-such-model", 123456)
    metrics.cold_start("codegen")
    after = rig.scrape()
    shed = "pointsman_sidecar_shed_total"
    assert moved(before, after, shed, model="echo", priority="1") == 1
    assert moved(before, after, shed, model="_unknown", priority="_other") == 1
    assert moved(before, after, "pointsman_sidecar_cold_starts_total", model="codegen") == 1


# -- tracing --


@pytest.mark.triton
def test_server_span_continues_the_callers_trace_with_a_client_span_per_attempt(
    rig: Rig,
) -> None:
    rig.spans.clear()
    with client(rig.address) as via:
        via.infer(
            "probe",
            echo_inputs(np.ones(1, dtype=np.float32)),
            headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"},
        )
    metadata, _ = rig.probe.seen.get(timeout=5)
    spans = spans_of(rig, 3, "expected a server span and two client spans")
    server = next(s for s in spans if s.kind is SpanKind.SERVER)
    clients = sorted(
        (s for s in spans if s.kind is SpanKind.CLIENT),
        key=lambda s: attrs(s)["pointsman.attempt"],
    )
    assert server.name == "ModelInfer"
    assert server.context.trace_id == int(TRACE_ID, 16)
    assert server.parent is not None and server.parent.span_id == int(CALLER_SPAN_ID, 16)
    probe = f"127.0.0.1:{rig.probe.port}"
    assert attrs(server)["pointsman.model"] == "probe"
    assert attrs(server)["pointsman.model_version"] == ""
    assert attrs(server)["pointsman.instance"] == probe
    assert attrs(server)["pointsman.attempts"] == 2
    assert attrs(server)["rpc.grpc.status_code"] == 0
    # One client span per attempt, both children of the server span: the retry shows.
    assert [c.name for c in clients] == ["ModelInfer upstream"] * 2
    for number, (span, instance, code) in enumerate(
        ((clients[0], rig.dead, 14), (clients[1], probe, 0)), start=1
    ):
        assert span.context.trace_id == int(TRACE_ID, 16)
        assert span.parent is not None and span.parent.span_id == server.context.span_id
        assert attrs(span)["pointsman.attempt"] == number
        assert attrs(span)["pointsman.instance"] == instance
        assert attrs(span)["rpc.grpc.status_code"] == code
    assert not clients[0].status.is_ok and clients[1].status.is_ok
    # What reached the instance names the successful attempt's span as parent.
    assert metadata["traceparent"] == f"00-{TRACE_ID}-{hex_span(clients[1].context.span_id)}-01"
    assert metadata["tracestate"] == "vendor=1"


@pytest.mark.triton
def test_traced_requests_reach_real_triton_and_errors_mark_spans(rig: Rig) -> None:
    rig.spans.clear()
    values = np.arange(3, dtype=np.float32)
    with client(rig.address) as via:
        got = via.infer("echo", echo_inputs(values), headers={"traceparent": TRACEPARENT})
        assert np.array_equal(got.as_numpy("OUTPUT0"), values)
        code, _ = codes_of(
            lambda: via.infer("nope", echo_inputs(values), headers={"traceparent": TRACEPARENT})
        )
        assert code == grpc.StatusCode.NOT_FOUND
    spans = spans_of(rig, 3, "expected two server spans and a client span")
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    (upstream,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    ok = next(s for s in servers if attrs(s)["pointsman.model"] == "echo")
    failed = next(s for s in servers if attrs(s)["pointsman.model"] == "nope")
    assert upstream.parent is not None and upstream.parent.span_id == ok.context.span_id
    assert attrs(upstream)["server.address"] == "127.0.0.1"
    assert attrs(upstream)["server.port"] == rig.triton.grpc_port
    assert ok.status.is_ok and attrs(ok)["pointsman.instance"] == rig.triton.grpc_address
    assert attrs(failed)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not failed.status.is_ok and "NOT_FOUND" in (failed.status.description or "")
    assert "pointsman.instance" not in attrs(failed)


@pytest.mark.triton
def test_a_request_without_traceparent_starts_a_trace(rig: Rig) -> None:
    rig.spans.clear()
    with client(rig.address) as via:
        via.infer("probe", echo_inputs(np.ones(1, dtype=np.float32)))
    metadata, _ = rig.probe.seen.get(timeout=5)
    spans = spans_of(rig, 3, "expected three spans")
    server = next(s for s in spans if s.kind is SpanKind.SERVER)
    assert server.parent is None and server.context.trace_id != int(TRACE_ID, 16)
    assert metadata["traceparent"].split("-")[1] == f"{server.context.trace_id:032x}"


@pytest.mark.triton
def test_stream_has_one_server_and_one_client_span(rig: Rig) -> None:
    rig.spans.clear()
    assert stream_tokens(rig.address, "def t():", 3, {"traceparent": TRACEPARENT}) == 3
    spans = spans_of(rig, 2, "expected a server span and a client span")
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    (upstream,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert server.name == "ModelStreamInfer" and upstream.name == "ModelStreamInfer upstream"
    assert server.parent is not None and server.parent.span_id == int(CALLER_SPAN_ID, 16)
    assert upstream.parent is not None and upstream.parent.span_id == server.context.span_id
    assert attrs(upstream)["pointsman.instance"] == rig.triton.grpc_address
    assert attrs(server)["pointsman.model"] == "codegen_stream"


@pytest.mark.triton
def test_per_request_pick_carries_the_trace_and_counts_affinity(rig: Rig) -> None:
    here = rig.triton.grpc_address
    tracing, spans = in_memory_tracing()
    config = SidecarConfig(
        listen="127.0.0.1:0",
        routers=(f"127.0.0.1:{rig.router_port}",),
        pick_mode="per-request",
        # Generous: on a busy machine a slow pick must not become a table pick.
        pick_timeout_s=5.0,
    )
    picky = rig.loop.run(
        start_sidecar(config, rng=random.Random(3), registry=CollectorRegistry(), tracing=tracing)
    )
    registry = picky.metrics.registry
    try:
        wait_for(lambda: picky.cache.has_router_tables, what="no tables")
        values = np.ones(2, dtype=np.float32)
        with client(f"127.0.0.1:{picky.port}") as via:
            # The router names an instance with echo ready: an affinity hit.
            rig.router.picks["echo"] = router_pb2.PickTargetResponse(
                target=router_pb2.Target(grpc_address=here, ready_versions=["1"])
            )
            via.infer("echo", echo_inputs(values), headers={"traceparent": TRACEPARENT})
            # ...and one where it is not ready (the router chose to load it there): a miss.
            rig.router.picks["echo"] = router_pb2.PickTargetResponse(
                target=router_pb2.Target(grpc_address=here, ready_versions=[])
            )
            via.infer("echo", echo_inputs(values))
        metadata, headers = rig.router.pick_metadata.get(timeout=5)
        rig.router.pick_metadata.get(timeout=5)
        wait_for(lambda: len(spans.get_finished_spans()) >= 3, what="expected 3 spans")
        first = list(spans.get_finished_spans())[:3]
        server = next(s for s in first if s.kind is SpanKind.SERVER)
        pick = next(s for s in first if s.name == "PickTarget")
        upstream = next(s for s in first if s.name == "ModelInfer upstream")
        assert server.context.trace_id == int(TRACE_ID, 16)
        assert pick.parent is not None and pick.parent.span_id == server.context.span_id
        assert upstream.parent is not None and upstream.parent.span_id == server.context.span_id
        assert attrs(pick)["pointsman.instance"] == here
        # The router sees the PickTarget span as its parent, in the call and in `headers`.
        expected = f"00-{TRACE_ID}-{hex_span(pick.context.span_id)}-01"
        assert metadata["traceparent"] == expected and headers["traceparent"] == expected
        text = registry_text(registry)
        assert value(text, "pointsman_sidecar_routed_total", model="echo") == 2
        assert value(text, "pointsman_sidecar_affinity_hits_total", model="echo") == 1
    finally:
        rig.loop.run(picky.stop(0))
        rig.router.picks.clear()
        tracing.shutdown()


def registry_text(registry: CollectorRegistry) -> Samples:
    from prometheus_client import generate_latest

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


@pytest.mark.triton
def test_tracing_off_passes_the_callers_traceparent_untouched(rig: Rig) -> None:
    off = Tracing(tracer=NoOpTracer(), provider=None)  # what setup_tracing gives without OTEL_*
    config = SidecarConfig(
        listen="127.0.0.1:0", static_routes={"probe": (f"127.0.0.1:{rig.probe.port}",)}
    )
    quiet = rig.loop.run(start_sidecar(config, registry=CollectorRegistry(), tracing=off))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{quiet.port}") as channel:
            raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            request = pb.ModelInferRequest(model_name="probe").SerializeToString()
            raw(request, timeout=5, metadata=(("traceparent", TRACEPARENT),))
        metadata, _ = rig.probe.seen.get(timeout=5)
        assert metadata["traceparent"] == TRACEPARENT  # no span of ours in between
    finally:
        rig.loop.run(quiet.stop(0))


# -- the command: OTLP export over HTTP and gRPC, /metrics on a kernel-chosen port --


class OtlpSink:
    """An OTLP trace receiver on loopback (HTTP protobuf or gRPC): the spans it got."""

    def __init__(self, protocol: str) -> None:
        self.spans: queue.Queue[tuple[str, str, str, str]] = queue.Queue()
        self._stop: Callable[[], None]
        if protocol == "grpc":
            sink = self

            class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
                def Export(
                    self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
                ) -> trace_service_pb2.ExportTraceServiceResponse:
                    sink.add(request)
                    return trace_service_pb2.ExportTraceServiceResponse()

            server = grpc.server(futures.ThreadPoolExecutor(2))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)  # type: ignore[no-untyped-call]
            self.port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            self._stop = lambda: server.stop(0)
        else:
            sink = self

            class Handler(BaseHTTPRequestHandler):
                def do_POST(self) -> None:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    sink.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.end_headers()

                def log_message(self, *args: Any) -> None:
                    pass

            http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.port = http.server_address[1]
            threading.Thread(target=http.serve_forever, daemon=True).start()
            self._stop = http.shutdown

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.put(
                        (service, span.name, span.trace_id.hex(), span.parent_span_id.hex())
                    )

    def stop(self) -> None:
        self._stop()


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_command_exports_spans_over_otlp_and_serves_metrics(
    rig: Rig, tmp_path: Path, protocol: str
) -> None:
    sink = OtlpSink(protocol)
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"static_routes:\n  echo: [{rig.triton.grpc_address}]\n")
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    argv = [sys.executable, "-m", "sidecar", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        argv, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    output = proc.stdout

    def read() -> None:
        for line in output:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        metrics_url = ""
        while not metrics_url:
            line = lines.get(timeout=30)
            if "sidecar metrics at " in line:
                metrics_url = line.split("sidecar metrics at ")[1].strip()
        wait_until_ready(f"127.0.0.1:{port}", ["echo"], 30)
        with client(f"127.0.0.1:{port}") as via:
            via.infer(
                "echo",
                echo_inputs(np.ones(2, dtype=np.float32)),
                headers={"traceparent": TRACEPARENT},
            )
        samples = scrape(metrics_url)
        assert (
            value(
                samples, "pointsman_sidecar_requests_total", model="echo", method="infer", code="OK"
            )
            == 1
        )
        proc.send_signal(signal.SIGTERM)  # the exit flushes the spans still buffered
        assert proc.wait(20) == 0
        got: set[tuple[str, str, str, str]] = set()
        while len(got) < 2:
            got.add(sink.spans.get(timeout=10))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        sink.stop()
    server = next(s for s in got if s[1] == "ModelInfer")
    upstream = next(s for s in got if s[1] == "ModelInfer upstream")
    assert server[0] == upstream[0] == "pointsman-sidecar"
    assert server[2] == upstream[2] == TRACE_ID and server[3] == CALLER_SPAN_ID
