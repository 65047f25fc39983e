"""`pointsman up` as a user runs it: a ready file, traffic, metrics, a reported child death,
SIGTERM; and with tracing on, one trace from the client through sidecar and router into Triton."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from app.fleet import (
    FleetConfig,
    parse_otlp_endpoint,
    tracing_environment,
    triton_trace_args,
)
from bench.calls import codegen_inputs
from tests.support.otlp_receiver import OtlpReceiver


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


@dataclass
class UpRun:
    """A `pointsman up` run: its process, ready file and, once it has exited, its output."""

    process: subprocess.Popen[str]
    ready_file: Path
    ready: dict[str, Any] = field(default_factory=dict)
    out: str = ""
    err: str = ""


@contextmanager
def _up(tmp_path: Path, *flags: str) -> Iterator[UpRun]:
    """A running `pointsman up` with two instances and its ready file; SIGTERM on exit, which
    must end it with code 0."""
    ready_file = tmp_path / "ready.json"
    run = UpRun(
        subprocess.Popen(
            [
                sys.executable, "-m", "app", "up",
                "--instances", "2",
                "--sidecar-port", "0", "--router-port", "0",
                "--run-dir", str(tmp_path / "run"),
                "--ready-file", str(ready_file),
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        ready_file,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready_file.exists():
            assert run.process.poll() is None, run.process.communicate()
            assert time.monotonic() < deadline, "fleet never became ready"
            time.sleep(0.2)
        run.ready = json.loads(ready_file.read_text())
        yield run
    finally:
        run.process.send_signal(signal.SIGTERM)
        run.out, run.err = run.process.communicate(timeout=60)
    assert run.process.returncode == 0, run.err


@pytest.mark.triton
def test_up_serves_reports_deaths_and_stops_everything(tmp_path: Path) -> None:
    with _up(tmp_path, "--placement", "0=codegen;1=codegen,codegen_stream") as run:
        up, ready, ready_file = run.process, run.ready, run.ready_file
        assert set(ready) >= {
            "sidecar",
            "router",
            "tritons",
            "sidecar_metrics_url",
            "router_metrics_url",
        }
        assert len(ready["tritons"]) == 2
        assert all(t["metrics_url"].startswith("http://127.0.0.1:") for t in ready["tritons"])
        for part in ("sidecar", "router"):
            url = ready[f"{part}_metrics_url"]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
            with urllib.request.urlopen(url, timeout=5) as response:
                assert f"pointsman_{part}_" in response.read().decode()
        addresses = [ready["sidecar"], ready["router"], *(t["grpc"] for t in ready["tritons"])]
        addresses += [ready[f"{p}_metrics_url"].split("/")[2] for p in ("sidecar", "router")]
        assert all(a.startswith("127.0.0.1:") for a in addresses)

        with grpcclient.InferenceServerClient(ready["sidecar"]) as client:
            result = client.infer("codegen", codegen_inputs("def up():", 4))
            assert result.as_numpy("TOKEN_IDS").size == 4

        # A Triton that dies is reported, and the rest keep running.
        victim = ready["tritons"][0]["grpc"]
        pid = int(
            subprocess.run(
                ["pgrep", "-f", "--", f"--grpc-port={victim.rsplit(':', 1)[1]}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        )
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)
        assert up.poll() is None
        assert _port_open(ready["sidecar"])
    assert ready["sidecar_metrics_url"] in run.out and ready["router_metrics_url"] in run.out
    assert "triton-0" in run.err and "exited with code" in run.err
    for address in addresses:
        assert not _port_open(address), f"{address} still listening after SIGTERM"
    assert not ready_file.exists()


@pytest.mark.triton
def test_up_traces_one_request_from_client_through_sidecar_and_router_into_triton(
    tmp_path: Path,
) -> None:
    receiver = OtlpReceiver().start()
    try:
        flags = ("--trace-otlp-endpoint", receiver.endpoint, "--sidecar-pick-mode", "per-request")
        with _up(tmp_path, *flags) as run:
            ready = run.ready
            assert ready["trace_otlp_endpoint"] == receiver.endpoint
            trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
            with grpcclient.InferenceServerClient(str(ready["sidecar"])) as client:
                client.infer(
                    "codegen",
                    codegen_inputs("def traced():", 4),
                    headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
                )
            deadline = time.monotonic() + 30  # batch span processors export every few seconds
            while True:
                spans = receiver.trace(trace_id)
                services = {s.service for s in spans}
                tritons = {s for s in services if s.startswith("triton-")}
                if {"pointsman-sidecar", "pointsman-router"} <= services and tritons:
                    break
                assert time.monotonic() < deadline, f"spans of the trace: {spans}"
                time.sleep(0.3)
    finally:
        receiver.stop()
    by_id = {s.span_id: s for s in spans}

    def ancestors(span_id: str) -> list[str]:
        chain = []
        while span_id in by_id:
            chain.append(by_id[span_id].service)
            span_id = by_id[span_id].parent_span_id
        assert span_id == client_span, "every span descends from the client's"
        return chain

    # Triton's spans sit under the sidecar's, and the router's pick under the sidecar's too.
    triton_root = next(
        s for s in spans if s.service.startswith("triton-") and s.name == "InferRequest"
    )
    assert ancestors(triton_root.span_id)[1] == "pointsman-sidecar"
    router_span = next(s for s in spans if s.service == "pointsman-router")
    assert "pointsman-sidecar" in ancestors(router_span.span_id)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318"),
        ("https://collector.example:4318/otlp/", "https://collector.example:4318/otlp"),
        ("127.0.0.1:4318", ValueError),
        ("http://127.0.0.1", ValueError),
        ("grpc://127.0.0.1:4317", ValueError),
        ("http://127.0.0.1:4318/v1/traces", ValueError),
    ],
)
def test_parse_otlp_endpoint(text: str, expected: str | type[Exception]) -> None:
    if isinstance(expected, str):
        assert parse_otlp_endpoint(text) == expected
    else:
        with pytest.raises(expected):
            parse_otlp_endpoint(text)


def test_trace_settings_for_triton_and_the_python_parts() -> None:
    assert triton_trace_args("http://127.0.0.1:4318/", "triton-1") == (
        "--trace-config=mode=opentelemetry",
        "--trace-config=rate=0",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=count=-1",
        "--trace-config=opentelemetry,url=127.0.0.1:4318/v1/traces",
        "--trace-config=opentelemetry,resource=service.name=triton-1",
    )
    env = tracing_environment("http://127.0.0.1:4318")
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:4318/v1/traces"
    with pytest.raises(ValueError, match="sidecar_pick_mode"):
        FleetConfig(sidecar_pick_mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="OTLP endpoint"):
        FleetConfig(trace_otlp_endpoint="localhost")
