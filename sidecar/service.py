"""Triton's `inference.GRPCInferenceService`, served by routing each call to a Triton instance.

Every handler takes and returns raw bytes (the server registers them with no serializers).
ModelInfer and ModelStreamInfer go through the request pipeline (`sidecar.pipeline`: head,
decision, attempts); this module wires it and answers the other RPCs for the fleet: readiness
and metadata, calls routed to one instance that has the model, fan-outs merged over every
instance (RepositoryIndex, ModelStatistics), and refusals (placement is the router's; shared
memory and per-instance settings are local to one Triton). Errors map to statuses through
`pointsman.errors`; Triton's own keep their code and message. See README.md for each RPC.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from importlib import metadata as package_metadata
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from pointsman.clock import Clock, monotonic
from pointsman.errors import (
    ManagedByRouterError,
    NotSupportedError,
    PointsmanError,
    abort,
)
from sidecar.admission import Admission
from sidecar.attempts import AttemptLoop
from sidecar.balancer import pick
from sidecar.config import SidecarConfig
from sidecar.decide import Decider
from sidecar.flow import FlowControl
from sidecar.head import Context, forward_metadata, time_left
from sidecar.idempotency import idempotency_store
from sidecar.metrics import SidecarMetrics
from sidecar.pipeline import InferencePipeline
from sidecar.resilience import EjectionPolicy, OutlierDetector
from sidecar.router_picker import RouterPicker
from sidecar.routes import NoRouteTablesError, RouteCache
from sidecar.tracing import RpcTracer
from sidecar.upstream import Upstream, UpstreamPool
from sidecar.wire import peek_model

__all__ = ["InferenceProxy"]

SERVER_NAME = "pointsman-sidecar"
# What a request through the sidecar can use (`sequence`: every step of a sequence reaches the
# instance holding it, sidecar/sequences.py); shared memory, tracing and logging settings are
# missing on purpose (see README.md).
EXTENSIONS = ("classification", "sequence", "model_configuration", "binary_tensor_data",
              "parameters", "statistics")  # fmt: skip
_REPOSITORY_STATE_RANK = {"READY": 0, "LOADING": 1, "UNLOADING": 2, "UNAVAILABLE": 3}


def outlier_detector(config: SidecarConfig, clock: Clock = monotonic) -> OutlierDetector:
    """The passive outlier detection the config asks for (shared by picks and attempts)."""
    policy = EjectionPolicy(
        consecutive_failures=config.outlier_consecutive_failures,
        base_ejection_s=config.outlier_base_ejection_s,
        max_ejection_s=config.outlier_max_ejection_s,
    )
    return OutlierDetector(policy, clock=clock)


def _version() -> str:
    try:
        return package_metadata.version("pointsman")
    except package_metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "0.0.0"


class InferenceProxy:
    """The handlers of the inference service, over a route cache and a pool of upstreams."""

    def __init__(
        self,
        config: SidecarConfig,
        cache: RouteCache,
        pool: UpstreamPool,
        *,
        rng: random.Random,
        metrics: SidecarMetrics,
        tracer: RpcTracer | None = None,
        picker: RouterPicker | None = None,
        cold_picker: RouterPicker | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self._config = config
        self._cache = cache
        self._pool = pool
        self._rng = rng
        outliers = outlier_detector(config, clock)
        # In memory or in Redis (None when replay is off); `start_sidecar` starts and closes it.
        self.idempotency = idempotency_store(config, metrics.idempotency)
        self._decider = Decider(
            config,
            cache,
            pool,
            rng=rng,
            outliers=outliers,
            metrics=metrics,
            tracer=tracer,
            picker=picker,
            cold_picker=cold_picker,
            clock=clock,
        )
        admission = Admission(
            config.max_in_flight,
            config.max_queued,
            retry_after_ms=config.shed_retry_after_ms,
            max_queued_bytes=config.max_queued_bytes,
        )
        flow = FlowControl(
            admission,
            enabled=config.flow_control,
            backoff_s=config.queue_full_backoff_ms / 1000,
            max_backoff_s=config.queue_full_max_backoff_ms / 1000,
            max_retries=config.queue_full_retries if config.retry_unavailable else 0,
            rng=rng,
        )
        flow.follow(cache)
        attempts = AttemptLoop(
            config, self._decider, admission=admission, flow=flow, outliers=outliers,
            metrics=metrics, tracer=tracer, clock=clock,
        )  # fmt: skip
        self._pipeline = InferencePipeline(
            config,
            self._decider,
            attempts=attempts,
            admission=admission,
            idempotency=self.idempotency,
            metrics=metrics,
            tracer=tracer,
        )
        self._server_live: bytes = pb.ServerLiveResponse(live=True).SerializeToString()
        self._ready_true: bytes = pb.ServerReadyResponse(ready=True).SerializeToString()
        self._ready_false: bytes = pb.ServerReadyResponse(ready=False).SerializeToString()
        self._model_not_ready: bytes = pb.ModelReadyResponse(ready=False).SerializeToString()
        self._server_metadata: bytes = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_version(), extensions=EXTENSIONS
        ).SerializeToString()

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Every method of the service, raw bytes in and out."""
        unary: dict[str, Callable[[bytes, Context], Any]] = {
            "ModelInfer": self._pipeline.model_infer,
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self._routed("ModelMetadata"),
            "ModelConfig": self._routed("ModelConfig"),
            "ModelStatistics": self.model_statistics,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self._refuse(
                ManagedByRouterError(
                    "RepositoryModelLoad is refused: model placement is the Pointsman "
                    "router's job; ask the router, not the sidecar"
                )
            ),
            "RepositoryModelUnload": self._refuse(
                ManagedByRouterError(
                    "RepositoryModelUnload is refused: model placement is the Pointsman "
                    "router's job; ask the router, not the sidecar"
                )
            ),
            "TraceSetting": self._refuse(
                NotSupportedError("TraceSetting is per Triton instance: call the instance directly")
            ),
            "LogSettings": self._refuse(
                NotSupportedError("LogSettings is per Triton instance: call the instance directly")
            ),
        }
        for kind in ("SystemSharedMemory", "CudaSharedMemory"):
            for op in ("Status", "Register", "Unregister"):
                unary[kind + op] = self._refuse(
                    NotSupportedError(
                        f"{kind}{op} is not supported through the sidecar: shared memory is "
                        "local to one Triton host; call the instance directly"
                    )
                )
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=None, response_serializer=None
            )
            for name, handler in unary.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self._pipeline.model_stream_infer, request_deserializer=None, response_serializer=None
        )
        return handlers

    # -- RPCs answered for the fleet -----------------------------------------------------------

    async def server_live(self, request: bytes, context: Context) -> bytes:
        return self._server_live

    async def server_ready(self, request: bytes, context: Context) -> bytes:
        return self._ready_true if self._cache.ready else self._ready_false

    async def server_metadata(self, request: bytes, context: Context) -> bytes:
        return self._server_metadata

    async def model_ready(self, request: bytes, context: Context) -> bytes:
        try:
            name, version = peek_model(request)
            route = self._cache.routes.get(name)
            candidates = None if route is None else route.candidates(version)
            if candidates is None:
                return self._model_not_ready  # as Triton answers for a model it does not have
            return await self._call(pick(candidates, self._rng), "ModelReady", request, context)
        except Exception as error:
            await abort(context, error)

    def _routed(self, method: str) -> Callable[[bytes, Context], Any]:
        async def handler(request: bytes, context: Context) -> bytes:
            try:
                name, version = peek_model(request)
                upstream = pick(self._decider.candidates(name, version), self._rng)
                return await self._call(upstream, method, request, context)
            except Exception as error:
                await abort(context, error)

        handler.__name__ = method
        return handler

    async def model_statistics(self, request: bytes, context: Context) -> bytes:
        try:
            name, version = peek_model(request, require_name=False)
            if name:
                upstream = pick(self._decider.candidates(name, version), self._rng)
                return await self._call(upstream, "ModelStatistics", request, context)
            merged = pb.ModelStatisticsResponse()
            for raw in await self._fan_out("ModelStatistics", request, context):
                part = pb.ModelStatisticsResponse.FromString(raw)
                merged.model_stats.extend(part.model_stats)
            data: bytes = merged.SerializeToString()
            return data
        except Exception as error:
            await abort(context, error)

    async def repository_index(self, request: bytes, context: Context) -> bytes:
        """The union of every instance's index; per (model, version) the best state wins."""
        try:
            best: dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex] = {}
            for raw in await self._fan_out("RepositoryIndex", request, context):
                for entry in pb.RepositoryIndexResponse.FromString(raw).models:
                    key = (entry.name, entry.version)
                    seen = best.get(key)
                    if seen is None or _state_rank(entry.state) < _state_rank(seen.state):
                        best[key] = entry
            merged = pb.RepositoryIndexResponse(models=[best[k] for k in sorted(best)])
            data: bytes = merged.SerializeToString()
            return data
        except Exception as error:
            await abort(context, error)

    def _refuse(self, error: PointsmanError) -> Callable[[bytes, Context], Any]:
        async def handler(request: bytes, context: Context) -> bytes:
            await abort(context, error)

        return handler

    # -- helpers -------------------------------------------------------------------------------

    async def _call(
        self, upstream: Upstream, method: str, request: bytes, context: Context
    ) -> bytes:
        response: bytes = await upstream.unary(method)(
            request,
            timeout=time_left(context),
            metadata=forward_metadata(context.invocation_metadata()),
        )
        return response

    async def _fan_out(self, method: str, request: bytes, context: Context) -> list[bytes]:
        """The same call on every known instance; the answers of those that answered.

        Fails only when every instance fails (with the first error), or, before any route
        table has arrived, with UNAVAILABLE.
        """
        addresses = sorted(self._cache.addresses())
        if not addresses:
            if self._cache.awaiting_router:
                raise NoRouteTablesError()
            return []
        timeout = context.time_remaining()
        timeout = (
            self._config.fanout_timeout_s
            if timeout is None
            else min(timeout, self._config.fanout_timeout_s)
        )
        md = forward_metadata(context.invocation_metadata())
        results = await asyncio.gather(
            *(
                self._pool.get(a).unary(method)(request, timeout=timeout, metadata=md)
                for a in addresses
            ),
            return_exceptions=True,
        )
        answers = [r for r in results if isinstance(r, bytes)]
        if not answers:
            first = results[0]
            raise first if isinstance(first, BaseException) else RuntimeError(repr(first))
        return answers


def _state_rank(state: str) -> int:
    return _REPOSITORY_STATE_RANK.get(state, len(_REPOSITORY_STATE_RANK))
