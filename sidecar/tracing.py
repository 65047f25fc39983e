"""OpenTelemetry spans of the sidecar's inference RPCs.

A `RpcTracer` exists only when tracing is on; the service holds None otherwise, so with tracing
off a request pays an `is None` check and nothing else (no span objects, no context parsing).

The span tree of one ModelInfer, all in the caller's trace when it sent a W3C `traceparent`
(else in a new one):

    ModelInfer                  SERVER  model, version, instance, attempts, status, and
                                        for prefix-routed models how the instance was chosen
      PickTarget                CLIENT  per-request pick mode: the router's span is its child
      ModelInfer upstream       CLIENT  one per attempt: instance, attempt number, status;
                                        Triton's own spans are its children (its traceparent
                                        goes to Triton in the call's metadata)

ModelStreamInfer is the same with one upstream span for the whole stream. Spans are started
with an explicit parent rather than made current, so nothing is attached to the event loop's
context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from pointsman.telemetry import extract_context, inject_metadata
from sidecar.upstream import SERVICE

__all__ = [
    "ATTEMPT",
    "ATTEMPTS",
    "INSTANCE",
    "MODEL",
    "MODEL_VERSION",
    "PREFIX_ROUTE",
    "RpcTracer",
]

# Attribute names (beside OpenTelemetry's rpc.* and server.* conventions).
MODEL = "pointsman.model"
MODEL_VERSION = "pointsman.model_version"
INSTANCE = "pointsman.instance"  # host:port of the Triton instance
ATTEMPT = "pointsman.attempt"  # 1 for the first try, 2 for the retry...
ATTEMPTS = "pointsman.attempts"  # on the server span: attempts made
# On the server span of a model with prefix routing: how the instance was chosen
# (preferred, load_fallback, no_key or router; see sidecar.prefix_routing).
PREFIX_ROUTE = "pointsman.prefix_route"
STATUS_CODE = "rpc.grpc.status_code"


class RpcTracer:
    """Starts and ends the sidecar's spans; see the module docstring for the tree."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def server_span(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> Span:
        """The span of one call to the sidecar, continuing the caller's trace if it sent one."""
        return self._tracer.start_span(
            method,
            context=extract_context(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
        )

    def client_span(
        self,
        parent: Span,
        name: str,
        service: str,
        method: str,
        extra: Mapping[str, str | int],
        *,
        address: str = "",
    ) -> tuple[Span, Context]:
        """A span of a call the sidecar makes for `parent`, and the context to propagate."""
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            **extra,
        }
        if address:
            host, _, port = address.rpartition(":")
            attributes["server.address"] = host
            if port.isdigit():
                attributes["server.port"] = int(port)
        span = self._tracer.start_span(
            name,
            context=trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        return span, trace.set_span_in_context(span)

    @staticmethod
    def propagate(metadata: Sequence[tuple[str, Any]], ctx: Context) -> tuple[tuple[str, Any], ...]:
        """`metadata` with the caller's traceparent replaced by that of `ctx`."""
        return inject_metadata(metadata, ctx)

    @staticmethod
    def end(
        span: Span,
        code: grpc.StatusCode,
        message: str = "",
        attributes: Mapping[str, str | int] | None = None,
    ) -> None:
        """Ends `span` with a gRPC status (an error status for anything but OK) and any last
        `attributes` (set in one call: each call on a span takes its lock)."""
        span.set_attributes(
            {STATUS_CODE: code.value[0], **attributes}
            if attributes
            else {STATUS_CODE: code.value[0]}
        )
        if code is not grpc.StatusCode.OK:
            span.set_status(
                Status(StatusCode.ERROR, f"{code.name}: {message}" if message else code.name)
            )
        span.end()
