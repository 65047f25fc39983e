"""Triton's `inference.GRPCInferenceService`, served by routing each call to a Triton instance.

Every handler takes and returns raw bytes (the server registers them with no serializers), so
ModelInfer is forwarded without a protobuf parse: `peek_model` reads the model name, the route
cache and `pick` choose the instance, and the bytes go out on that instance's channel. Handlers
map every exception to a status through `pointsman.errors` (`status_of`, `abort`); Triton's
own errors keep their code and message. See README.md for what each RPC does.

ModelInfer and ModelStreamInfer also record metrics (`sidecar.metrics`) and, with tracing on,
spans (`sidecar.tracing`): a SERVER span per call and a CLIENT span per upstream attempt.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import metadata as package_metadata
from time import perf_counter
from typing import Any, NoReturn, TypeAlias

import grpc
from opentelemetry.trace import Span
from tritonclient.grpc import service_pb2 as pb

from pointsman.clock import Clock, monotonic
from pointsman.errors import (
    DeadlineExpiredError,
    ManagedByRouterError,
    NoReadyInstanceError,
    NotSupportedError,
    PointsmanError,
    abort,
    status_of,
)
from pointsman.versions import PIN_HEADER, select_version
from sidecar.admission import (
    Admission,
    PriorityClass,
    ShedError,
    request_keys,
)
from sidecar.balancer import CandidateSet, pick, pick_avoiding
from sidecar.config import SidecarConfig
from sidecar.idempotency import IdempotencyCache
from sidecar.metrics import RequestSeries, SidecarMetrics
from sidecar.resilience import (
    EjectionPolicy,
    OutlierDetector,
    RetryBudget,
    counts_against_instance,
    retryable,
    sets_queue_timeout,
    with_queue_timeout,
)
from sidecar.router_picker import ROUTER_SERVICE, RouterPicker, RouterUnreachableError
from sidecar.routes import NoRouteTablesError, RouteCache
from sidecar.stream_feed import StreamFeed
from sidecar.tracing import ATTEMPT, ATTEMPTS, INSTANCE, MODEL, MODEL_VERSION, RpcTracer
from sidecar.upstream import SERVICE, Upstream, UpstreamPool
from sidecar.wire import (
    peek_model,
    peek_request,
    sets_parameter,
    with_model_version,
    with_uint64_parameter,
)

__all__ = ["InferenceProxy", "forward_metadata"]

log = logging.getLogger(__name__)

# grpc ships no type hints, so this is Any to mypy; it names what handlers receive.
Context: TypeAlias = grpc.aio.ServicerContext
Metadata = tuple[tuple[str, str | bytes], ...]

SERVER_NAME = "pointsman-sidecar"
# What a request through the sidecar can use; shared memory, sequences (no sticky routing),
# tracing and logging settings are missing on purpose (see README.md).
EXTENSIONS = ("classification", "model_configuration", "binary_tensor_data", "parameters",
              "statistics")  # fmt: skip

# Keys that describe one HTTP/2 hop, not the request: grpc sets its own for the next hop.
_HOP_BY_HOP = frozenset({"user-agent", "content-type", "te"})
_REPOSITORY_STATE_RANK = {"READY": 0, "LOADING": 1, "UNLOADING": 2, "UNAVAILABLE": 3}
_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
# How Triton says that a model's queue (its queue policy's max_queue_size) is full.
TRITON_QUEUE_FULL = "Exceeds maximum queue size"
# The `method` label of the request metrics.
INFER = "infer"
STREAM = "stream"


def forward_metadata(metadata: Sequence[tuple[str, Any]] | None) -> Metadata:
    """The caller's metadata minus hop-by-hop and reserved keys, for the upstream call."""
    if not metadata:
        return ()
    kept = []
    for item in metadata:
        key = item[0]
        if key in _HOP_BY_HOP or key[0] == ":" or key.startswith("grpc-"):
            continue
        kept.append(item)
    return tuple(kept)


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
        # Asks the router for a load when a model is ready nowhere (None: the cold path is off).
        self._cold_picker = cold_picker
        self._cache = cache
        self._pool = pool
        self._rng = rng
        self._metrics = metrics
        # None when tracing is off: then a request creates no span and parses no traceparent.
        self._tracer = tracer
        self._picker = picker
        self._retry = config.retry_unavailable
        self.admission = Admission(
            config.max_in_flight,
            config.max_queued,
            retry_after_ms=config.shed_retry_after_ms,
            max_queued_bytes=config.max_queued_bytes,
        )
        # None when replay is off; concurrent duplicates are then not coalesced either.
        self.idempotency = (
            IdempotencyCache(config.idempotency_ttl_s, config.idempotency_max_bytes)
            if config.idempotency_ttl_s > 0
            else None
        )
        self._max_attempts = config.max_attempts
        self._queue_timeout = config.deadline_queue_timeout
        self._budget = RetryBudget(
            ratio=config.retry_budget_ratio,
            min_retries=config.retry_budget_min,
            window_s=config.retry_budget_window_s,
            clock=clock,
        )
        self._outliers = OutlierDetector(
            EjectionPolicy(
                consecutive_failures=config.outlier_consecutive_failures,
                base_ejection_s=config.outlier_base_ejection_s,
                max_ejection_s=config.outlier_max_ejection_s,
            ),
            clock=clock,
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
            "ModelInfer": self.model_infer,
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
            self.model_stream_infer, request_deserializer=None, response_serializer=None
        )
        return handlers

    # -- choosing a version and an instance ----------------------------------------------------

    def _apply_version_policy(
        self, name: str, request: bytes, metadata: Sequence[tuple[str, Any]] | None
    ) -> tuple[str, bytes]:
        """For an unpinned request: the version the policy gives it, and the request bytes
        pinned to it (unchanged when the policy says nothing)."""
        version = self._policy_version(name, metadata)
        return version, with_model_version(request, version) if version else request

    def _policy_version(self, name: str, metadata: Sequence[tuple[str, Any]] | None) -> str:
        """The version an unpinned request gets: the x-model-version header, else the route's
        header rules and canary split (the router's policy), else "" (Triton's highest)."""
        route = self._cache.routes.get(name)
        rules = route.version_rules if route is not None else None
        headers: dict[str, str] = {}
        for key, value in metadata or ():
            if key == PIN_HEADER and isinstance(value, str):
                return value
            if rules is not None and isinstance(value, str):
                headers[key] = value
        if route is None or rules is None:
            return ""
        available = [v for v in route.by_version if v]
        return select_version(rules, headers, self._rng, available) or ""

    def _candidates(self, name: str, version: str) -> CandidateSet:
        route = self._cache.routes.get(name)
        if route is None:
            raise self._cache.missing(name, version)
        candidates = route.by_version.get(version, route.fallback)
        if candidates is None:
            raise NoReadyInstanceError(name, version)
        return candidates

    def _pick(self, candidates: CandidateSet) -> Upstream:
        """`pick`, skipping instances that outlier detection has ejected while others exist
        (the check costs one truth test while none is ejected)."""
        if self._outliers.any_ejected:
            return pick_avoiding(candidates, self._rng, self._outliers.is_ejected)
        return pick(candidates, self._rng)

    @property
    def outliers(self) -> OutlierDetector:
        """The passive outlier detector (read by tests and diagnostics)."""
        return self._outliers

    async def _table_pick(
        self, name: str, version: str, md: Metadata, context: Context
    ) -> tuple[Upstream, bool]:
        """A pick from the route table, and whether it was an affinity hit. On the cold path
        (the model is known but ready nowhere) the router is asked to load it, and the
        request waits for that load, up to `cold_start_wait_s` and the caller's deadline."""
        try:
            return self._pick(self._candidates(name, version)), True
        except NoRouteTablesError:
            raise
        except NoReadyInstanceError:
            if self._cold_picker is None:
                raise
        wait_s = self._config.cold_start_wait_s
        remaining = _remaining(context)
        if remaining is not None:
            wait_s = min(wait_s, remaining)
        self._metrics.cold_start(name)
        headers = {k: v for k, v in md if isinstance(v, str)}
        try:
            answer = await self._cold_picker.pick(
                name, version, headers, remaining, metadata=md, wait_for_load_ms=int(wait_s * 1000)
            )
        except RouterUnreachableError:
            raise NoReadyInstanceError(
                name, version, "no router answered for a cold load"
            ) from None
        if not answer.target.grpc_address:
            raise NoReadyInstanceError(name, version, "the router named no target")
        return self._pool.get(answer.target.grpc_address), False

    async def _router_targets(
        self, name: str, version: str, md: Metadata, timeout: float | None, span: Span | None
    ) -> tuple[Upstream, list[Upstream] | None, bool, str]:
        """Per-request mode: the first instance to try, the router's further ones, whether
        the first had the model (and version) ready (an affinity hit), and the version the
        router's policy chose; without an answer from the router, a table pick."""
        assert self._picker is not None
        headers = {k: v for k, v in md if isinstance(v, str)}
        pick_md: Metadata = ()
        pick_span: Span | None = None
        if span is not None:
            assert self._tracer is not None
            pick_span, ctx = self._tracer.client_span(
                span, "PickTarget", ROUTER_SERVICE, "PickTarget", {MODEL: name}
            )
            # The router may read the trace context from the call or from `headers`: both
            # carry the PickTarget span's, so the router's span is its child.
            pick_md = self._tracer.propagate((), ctx)
            headers.update((k, v) for k, v in pick_md if isinstance(v, str))
        code, message = _OK, ""
        try:
            answer = await self._picker.pick(name, version, headers, timeout, metadata=pick_md)
            targets = [t for t in (answer.target, *answer.fallbacks) if t.grpc_address]
            if pick_span is not None and targets:
                pick_span.set_attribute(INSTANCE, targets[0].grpc_address)
        except RouterUnreachableError as error:
            code, message = _UNAVAILABLE, str(error)
            return self._pick(self._candidates(name, version)), None, True, ""
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
            raise
        finally:
            if pick_span is not None:
                RpcTracer.end(pick_span, code, message)
        if not targets:
            raise NoReadyInstanceError(name, version, "the router named no target")
        ready = targets[0].ready_versions
        hit = bool(ready) and (not version or version in ready)
        upstreams = [self._pool.get(a) for a in dict.fromkeys(t.grpc_address for t in targets)]
        return upstreams[0], upstreams, hit, answer.model_version

    def _next_target(
        self,
        name: str,
        version: str,
        tried: Sequence[Upstream],
        targets: list[Upstream] | None,
    ) -> Upstream | None:
        """Where to try after a failed attempt: the router's next fallback not yet tried
        (per-request mode), else the least busy route-table candidate not yet tried; ejected
        instances are left out. None when there is nowhere else."""
        ordered = [u for u in targets or () if u not in tried]
        try:
            table: Sequence[Upstream] = self._candidates(name, version).upstreams
        except PointsmanError:  # the model left the tables meanwhile
            table = ()
        ordered.extend(
            sorted((u for u in table if u not in tried and u not in ordered),
                   key=lambda u: u.in_flight)
        )  # fmt: skip
        ejected = self._outliers.is_ejected
        return next((u for u in ordered if not ejected(u.address)), None)

    def _failover(
        self,
        name: str,
        version: str,
        error: grpc.aio.AioRpcError,
        tried: Sequence[Upstream],
        targets: list[Upstream] | None,
    ) -> Upstream | None:
        """The instance to retry on after `error`, or None to give the caller the error:
        retries must be on, the error one after which Triton did not run the request, attempts
        left, another candidate, and room in the retry budget."""
        if not self._retry or len(tried) >= self._max_attempts:
            return None
        if not retryable(error.code(), error.details() or ""):
            return None
        following = self._next_target(name, version, tried, targets)
        if following is None:
            return None
        if not self._budget.try_spend():
            self._metrics.budget_exhausted(name)
            return None
        return following

    # -- ModelInfer ----------------------------------------------------------------------------

    async def model_infer(self, request: bytes, context: Context) -> bytes:
        # The hot path: one peek, one dict lookup, one pick, one upstream await, and the
        # metrics of one pre-resolved series. With tracing off, `span` is None throughout.
        # Requests without an id skip idempotency; admission is a counter while not full.
        started = perf_counter()
        metadata = context.invocation_metadata()
        span = None if self._tracer is None else self._tracer.server_span("ModelInfer", metadata)
        series: RequestSeries | None = None
        name = version = ""
        code, message = _OK, ""
        try:
            name, version, body_id = peek_request(request)
            request_id, priority_name = request_keys(metadata)
            asked_version = version
            if not version and self._picker is None:
                version, request = self._apply_version_policy(name, request, metadata)
            series = self._metrics.series(name, version, INFER)
            md = forward_metadata(metadata)
            priority = self._cache.priorities.resolve(priority_name)
            if priority.triton_priority and not sets_parameter(request, "priority"):
                request = with_uint64_parameter(request, "priority", priority.triton_priority)
            request_id = request_id or body_id
            if not request_id or self.idempotency is None:
                return await self._admitted_infer(
                    name, version, series, request, md, context, span, priority
                )
            sent, chosen = request, version
            response, reuse = await self.idempotency.run(
                (name, asked_version, request_id),
                lambda: self._admitted_infer(
                    name, chosen, series, sent, md, context, span, priority
                ),
            )
            self._metrics.idempotent.labels(reuse.value).inc()
            return response
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception as error:
            code, message = status_of(error)
            await _abort(context, code, message, self._refusal(name, error, code, message))
        finally:
            (series or self._metrics.series("", "", INFER)).done(code, perf_counter() - started)
            if span is not None:
                _end_server_span(span, name, version, code, message)

    async def _admitted_infer(
        self,
        name: str,
        version: str,
        series: RequestSeries,
        request: bytes,
        md: Metadata,
        context: Context,
        span: Span | None,
        priority: PriorityClass,
    ) -> bytes:
        """`_infer` within a slot of the sidecar's admission (waiting for one if need be)."""
        admission = self.admission
        if not admission.try_enter():
            await admission.wait(priority, _remaining(context), len(request))
        try:
            return await self._infer(name, version, series, request, md, context, span)
        finally:
            admission.leave()

    def _refusal(
        self, name: str, error: Exception, code: grpc.StatusCode, message: str
    ) -> Metadata:
        """Counts a shed request or a full Triton queue; the trailing metadata to answer with
        (a shed request's retry hint)."""
        if isinstance(error, ShedError):
            self._metrics.shed_request(name, error.priority.triton_priority)
            return error.trailing_metadata()
        if code is _UNAVAILABLE and TRITON_QUEUE_FULL in message:
            self._metrics.queue_full(name)
        return ()

    async def _infer(
        self,
        name: str,
        version: str,
        series: RequestSeries,
        request: bytes,
        md: Metadata,
        context: Context,
        span: Span | None,
    ) -> bytes:
        targets: list[Upstream] | None = None
        if self._picker is None:
            # Route tables list only instances with the model ready (static routes are
            # assumed to serve every version): a table pick is always an affinity hit.
            upstream, hit = await self._table_pick(name, version, md, context)
        else:
            upstream, targets, hit, chosen = await self._router_targets(
                name, version, md, _remaining(context), span
            )
            if chosen and not version:  # the router's policy chose the version
                request = with_model_version(request, chosen)
        series.routed.inc()
        if hit:
            series.hits.inc()
        if targets is not None and self._outliers.any_ejected:
            ejected = self._outliers.is_ejected
            upstream = next((u for u in targets if not ejected(u.address)), upstream)
        self._budget.record_request()
        own_timeout: bool | None = None  # whether the request sets Triton's timeout itself
        tried = [upstream]
        try:
            while True:
                # Checked before every attempt: an expired request is never forwarded.
                remaining = _remaining(context)
                sent = request
                if remaining is not None and self._queue_timeout:
                    if own_timeout is None:
                        own_timeout = sets_queue_timeout(request)
                    sent = with_queue_timeout(request, remaining, own_timeout)
                try:
                    if span is None:
                        return await self._send(upstream, sent, remaining, md)
                    return await self._traced_send(upstream, sent, remaining, md, len(tried), span)
                except grpc.aio.AioRpcError as error:
                    following = self._failover(name, version, error, tried, targets)
                    if following is None:
                        raise
                    upstream = following
                    tried.append(upstream)
                    series.retries.inc()
        finally:
            if span is not None:
                span.set_attributes({INSTANCE: upstream.address, ATTEMPTS: len(tried)})

    async def _send(
        self, upstream: Upstream, request: bytes, timeout: float | None, md: Metadata
    ) -> bytes:
        """One attempt, counted in the instance's in-flight requests while it runs."""
        upstream.in_flight += 1
        try:
            response: bytes = await upstream.infer(request, timeout=timeout, metadata=md)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            self._metrics.attempt(upstream.address, code)
            if counts_against_instance(code, error.details() or ""):
                self._instance_failed(upstream.address)
            raise
        except asyncio.CancelledError:
            self._metrics.attempt(upstream.address, _CANCELLED)
            raise
        finally:
            upstream.in_flight -= 1
        self._metrics.attempt(upstream.address, _OK)
        self._outliers.success(upstream.address)
        return response

    def _instance_failed(self, address: str) -> None:
        ejected_for = self._outliers.failure(address)
        if ejected_for is not None:
            self._metrics.ejection(address)
            log.warning("ejected %s from picks for %.1fs after repeated failures",
                        address, ejected_for)  # fmt: skip

    async def _traced_send(
        self,
        upstream: Upstream,
        request: bytes,
        timeout: float | None,
        md: Metadata,
        attempt: int,
        span: Span,
    ) -> bytes:
        """`_send` in a CLIENT span whose traceparent goes to Triton, so Triton's spans are
        its children."""
        assert self._tracer is not None
        client, ctx = self._tracer.client_span(
            span,
            "ModelInfer upstream",
            SERVICE,
            "ModelInfer",
            {INSTANCE: upstream.address, ATTEMPT: attempt},
            address=upstream.address,
        )
        code, message = _OK, ""
        try:
            return await self._send(upstream, request, timeout, self._tracer.propagate(md, ctx))
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
            raise
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        finally:
            RpcTracer.end(client, code, message)

    # -- ModelStreamInfer ----------------------------------------------------------------------

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """Forwards a bidirectional stream, bound to the instance chosen for its first message.

        Counted as one request (its duration the stream's). Until its first response reaches
        the caller a stream fails over as ModelInfer does (`_failover`): the messages sent so
        far are replayed on the next instance (`StreamFeed`); each try is one upstream attempt.
        """
        started = perf_counter()
        metadata = context.invocation_metadata()
        span = (
            None if self._tracer is None else self._tracer.server_span("ModelStreamInfer", metadata)
        )
        client: Span | None = None
        series: RequestSeries | None = None
        name = version = ""
        code, message = _OK, ""
        upstream: Upstream | None = None
        call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None
        pump: asyncio.Task[None] | None = None
        feed: StreamFeed | None = None
        tried: list[Upstream] = []
        admitted = False
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                return  # the caller half-closed without a request: nothing to route
            name, version = peek_model(first)
            if not version and self._picker is None:
                # Only the first message: a stream is bound to what its first message chose.
                version, first = self._apply_version_policy(name, first, metadata)
            series = self._metrics.series(name, version, STREAM)
            md = forward_metadata(metadata)
            timeout = _remaining(context)
            # A stream holds one admission slot for its whole life.
            if not self.admission.try_enter():
                priority = self._cache.priorities.resolve(request_keys(metadata)[1])
                await self.admission.wait(priority, timeout, len(first))
            admitted = True
            targets: list[Upstream] | None = None
            if self._picker is None:
                chosen, hit = await self._table_pick(name, version, md, context)
            else:
                chosen, targets, hit, picked = await self._router_targets(
                    name, version, md, timeout, span
                )
                if picked and not version:
                    first = with_model_version(first, picked)
            series.routed.inc()
            if hit:
                series.hits.inc()
            self._budget.record_request()
            feed = StreamFeed(first, requests, self._config.max_message_bytes)
            while True:
                upstream, attempt_md = chosen, md
                upstream.in_flight += 1
                tried.append(upstream)
                if span is not None:
                    assert self._tracer is not None
                    client, ctx = self._tracer.client_span(
                        span,
                        "ModelStreamInfer upstream",
                        SERVICE,
                        "ModelStreamInfer",
                        {INSTANCE: upstream.address, ATTEMPT: len(tried)},
                        address=upstream.address,
                    )
                    attempt_md = self._tracer.propagate(md, ctx)
                call = upstream.open_stream(timeout=_remaining(context), metadata=attempt_md)
                pump = asyncio.create_task(feed.pump_to(call))
                try:
                    async for response in call:
                        feed.commit()
                        await context.write(response)
                    break  # the upstream ended with OK
                except grpc.aio.AioRpcError as error:
                    following = (
                        self._failover(name, version, error, tried, targets)
                        if feed.replayable
                        else None
                    )
                    if following is None:
                        raise
                    # Nothing reached the caller yet: this attempt ends, the next replays.
                    failed = error.code()
                    if counts_against_instance(failed, error.details() or ""):
                        self._instance_failed(upstream.address)
                    self._end_stream_attempt(upstream, call, pump, client, failed, error)
                    upstream = call = pump = client = None
                    chosen = following
                    series.retries.inc()
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception as error:
            code, message = status_of(error)
            await _abort(context, code, message, self._refusal(name, error, code, message))
        finally:
            if admitted:
                self.admission.leave()
            if feed is not None:
                feed.close()
            if upstream is not None:
                # The stream's status, whichever side ended it.
                self._end_stream_attempt(upstream, call, pump, client, code, message)
            (series or self._metrics.series("", "", STREAM)).done(code, perf_counter() - started)
            if span is not None:
                _end_server_span(span, name, version, code, message, upstream, len(tried))

    def _end_stream_attempt(
        self,
        upstream: Upstream,
        call: grpc.aio.StreamStreamCall[bytes, bytes] | None,
        pump: asyncio.Task[None] | None,
        client: Span | None,
        code: grpc.StatusCode,
        error: grpc.aio.AioRpcError | str,
    ) -> None:
        if pump is not None:
            pump.cancel()
        if call is not None:
            call.cancel()  # a no-op once it has ended; stops Triton if the caller left
        upstream.in_flight -= 1
        self._metrics.attempt(upstream.address, code)
        if code is _OK:
            self._outliers.success(upstream.address)
        if client is not None:
            detail = error if isinstance(error, str) else error.details() or ""
            RpcTracer.end(client, code, detail)

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
                upstream = pick(self._candidates(name, version), self._rng)
                return await self._call(upstream, method, request, context)
            except Exception as error:
                await abort(context, error)

        handler.__name__ = method
        return handler

    async def model_statistics(self, request: bytes, context: Context) -> bytes:
        try:
            name, version = peek_model(request, require_name=False)
            if name:
                upstream = pick(self._candidates(name, version), self._rng)
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
            timeout=_remaining(context),
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


def _remaining(context: Context) -> float | None:
    """The caller's remaining time; never send a request whose deadline has passed, since
    Triton would run it anyway."""
    timeout: float | None = context.time_remaining()
    if timeout is not None and timeout <= 0:
        raise DeadlineExpiredError("deadline expired before the request was sent")
    return timeout


async def _abort(
    context: Context, code: grpc.StatusCode, message: str, trailers: Metadata = ()
) -> NoReturn:
    """Ends the RPC with (code, message) from `status_of`, which the metrics saw too."""
    await context.abort(code, message, trailing_metadata=trailers)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _end_server_span(
    span: Span,
    name: str,
    version: str,
    code: grpc.StatusCode,
    message: str,
    stream_upstream: Upstream | None = None,
    stream_attempts: int = 1,
) -> None:
    attributes: dict[str, str | int] = {MODEL: name, MODEL_VERSION: version}
    if stream_upstream is not None:  # ModelInfer's `_infer` sets these itself
        attributes[INSTANCE] = stream_upstream.address
        attributes[ATTEMPTS] = stream_attempts
    RpcTracer.end(span, code, message, attributes)
