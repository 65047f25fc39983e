"""Tracing and metrics plumbing shared by the router and the sidecar.

Tracing follows the standard OpenTelemetry environment variables, read once at start-up:

    OTEL_TRACES_EXPORTER            otlp | console | none, comma-separated (default: none, so
                                    tracing is off and costs one boolean check per request)
    OTEL_EXPORTER_OTLP_PROTOCOL     grpc | http/protobuf (also ..._TRACES_PROTOCOL)
    OTEL_EXPORTER_OTLP_ENDPOINT     where OTLP goes (also ..._TRACES_ENDPOINT)
    OTEL_TRACES_SAMPLER(_ARG)       e.g. parentbased_traceidratio with 0.1
    OTEL_SERVICE_NAME               overrides the part's own name

W3C `traceparent` travels in gRPC metadata; `extract_context` and `inject_metadata` move it
between metadata tuples and OpenTelemetry contexts.

Metrics are prometheus-client collectors in a registry per process, served over HTTP by
`serve_metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CollectorRegistry, start_http_server

from pointsman.errors import ConfigError

__all__ = [
    "MetricsEndpoint",
    "Tracing",
    "extract_context",
    "inject_metadata",
    "serve_metrics",
    "setup_tracing",
]


@dataclass
class Tracing:
    """The process's tracer; `enabled` is False when no exporter is configured."""

    tracer: trace.Tracer
    provider: TracerProvider | None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        """Flushes spans still buffered; call on exit."""
        if self.provider is not None:
            self.provider.shutdown()


def _otlp_exporter() -> SpanExporter:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not grpc or http/protobuf")


def setup_tracing(service_name: str) -> Tracing:
    """A tracer from the OTEL_* environment; a no-op tracer when tracing is off."""
    names = [
        n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()
    ]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            exporters.append(_otlp_exporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}")
    if not exporters:
        return Tracing(tracer=trace.NoOpTracer(), provider=None)
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over ours; the
    # provider reads OTEL_TRACES_SAMPLER itself.
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(tracer=provider.get_tracer(f"pointsman.{service_name}"), provider=provider)


def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The caller's trace context from gRPC metadata (W3C traceparent/tracestate)."""
    carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
    return propagate.extract(carrier)


def inject_metadata(
    metadata: Sequence[tuple[str, Any]], ctx: otel_context.Context | None = None
) -> tuple[tuple[str, Any], ...]:
    """`metadata` with traceparent/tracestate replaced by those of `ctx` (default: current)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    if not carrier:
        return tuple(metadata)
    kept = tuple(item for item in metadata if item[0] not in carrier)
    return kept + tuple(carrier.items())


@dataclass
class MetricsEndpoint:
    """A running /metrics server; `close` frees its port."""

    port: int
    _server: Any

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(address: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serves `registry` at http://address/metrics in a daemon thread (port 0: any free)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"metrics address: must be host:port, got {address!r}")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return MetricsEndpoint(port=int(server.server_port), _server=server)
