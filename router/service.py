"""The gRPC RouterService: PickTarget, WatchRoutes, ListInstances, ListModels, GetPolicy,
ReloadPolicy. RPC handling only: a pick is decided by `decide` (router/decision.py), and every
message is read or built in router/proto_convert.py.

PickTarget is measured (`RouterMetrics`) and, when tracing is on, recorded as a SERVER span
that continues the caller's `traceparent` and carries the decision: target, top scores,
fallbacks, or why nothing could serve (span attributes are listed in router/README.md).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import trace

from pointsman import errors
from pointsman.clock import Clock
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.telemetry import Tracing, extract_context
from router.contracts import FleetSnapshot
from router.decision import AssumedLoad, Decision, decide
from router.first_view import FirstView
from router.metrics import UNKNOWN_MODEL, RouterMetrics
from router.placement.controller import PlacementController
from router.policy import Policy, PolicyStore
from router.proto_convert import (
    instances_to_proto,
    models_to_proto,
    pick_to_proto,
    policy_to_proto,
    priority_policy_to_proto,
    request_from_proto,
    session_policy_to_proto,
    update_to_proto,
)
from router.routes import RouteBook, RouteUpdate

__all__ = ["RouterServicer"]

# Scores of this many best candidates go into a pick's span.
_TRACED_SCORES = 3
_RPC_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "pointsman.router.v1.RouterService",
    "rpc.method": "PickTarget",
}


def _describe_decision(span: trace.Span, decision: Decision) -> None:
    """Puts what decided a pick on its span: e.g. pointsman.scores 'triton-0=5.80,...'."""
    span.set_attribute("pointsman.candidates", decision.filters.considered)
    chosen = decision.pick
    if chosen is None:
        span.set_attribute("pointsman.filter_trace", decision.filters.summary())
        return
    span.set_attribute("pointsman.target", chosen.candidate.instance_id)
    span.set_attribute("pointsman.target_address", chosen.candidate.instance.grpc_address)
    span.set_attribute("pointsman.fallbacks", len(decision.targets) - 1)
    span.set_attribute(
        "pointsman.scores",
        ",".join(f"{s.candidate.instance_id}={s.total:.2f}" for s in decision.best(_TRACED_SCORES)),
    )
    span.set_attribute(
        "pointsman.target_scores",
        ",".join(f"{name}={score:.2f}" for name, score in chosen.scores.items()),
    )


class RouterServicer(pb_grpc.RouterServiceServicer):
    def __init__(
        self,
        *,
        book: RouteBook,
        snapshot: Callable[[], FleetSnapshot],
        assumed: AssumedLoad,
        clock: Clock,
        rng: random.Random,
        router_id: str,
        heartbeat_interval_s: float,
        stopping: asyncio.Event,
        metrics: RouterMetrics,
        policy: PolicyStore,
        placement: PlacementController | None = None,
        tracing: Tracing | None = None,
        placement_active: Callable[[], bool] = lambda: True,
    ) -> None:
        self._book = book
        self._policy = policy
        self._placement = placement
        # False while another replica holds the placement Lease: no cold path here.
        self._placement_active = placement_active
        self._snapshot = snapshot
        # Until the fleet has been read once, routes are held and unknown models UNAVAILABLE.
        self._first_view = FirstView(snapshot)
        self._assumed = assumed
        self._clock = clock
        self._rng = rng
        self._router_id = router_id
        self._heartbeat_interval_s = heartbeat_interval_s
        self._stopping = stopping
        self._metrics = metrics
        # None when tracing is off, so that a pick pays one `is None` check for it.
        self._tracer = tracing.tracer if tracing is not None and tracing.enabled else None

    async def PickTarget(
        self, request: pb.PickTargetRequest, context: grpc.aio.ServicerContext
    ) -> pb.PickTargetResponse:
        if self._tracer is not None:
            return await self._traced_pick(request, context, self._tracer)
        try:
            response = await self._pick_or_load(request, None)
        except Exception as exc:  # every failure leaves as a status, never a crash
            self._count_failed_pick(request, exc)
            await errors.abort(context, exc)
        self._metrics.count_pick(request.model_name, grpc.StatusCode.OK)
        return response

    async def _traced_pick(
        self,
        request: pb.PickTargetRequest,
        context: grpc.aio.ServicerContext,
        tracer: trace.Tracer,
    ) -> pb.PickTargetResponse:
        span = tracer.start_span(
            "PickTarget",
            context=extract_context(context.invocation_metadata()),
            kind=trace.SpanKind.SERVER,
            attributes=_RPC_ATTRIBUTES,
        )
        span.set_attribute("pointsman.model", request.model_name)
        if request.model_version:
            span.set_attribute("pointsman.model_version", request.model_version)
        try:
            response = await self._pick_or_load(request, span)
        except Exception as exc:
            code, message = self._count_failed_pick(request, exc)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {message}"))
            span.end()
            await errors.abort(context, exc)
        self._metrics.count_pick(request.model_name, grpc.StatusCode.OK)
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
        span.end()
        return response

    def _count_failed_pick(
        self, request: pb.PickTargetRequest, exc: Exception
    ) -> tuple[grpc.StatusCode, str]:
        code, message = errors.status_of(exc)
        known = request.model_name in self._snapshot().known_models
        self._metrics.count_pick(request.model_name if known else UNKNOWN_MODEL, code)
        return code, message

    async def _pick_or_load(
        self, request: pb.PickTargetRequest, span: trace.Span | None
    ) -> pb.PickTargetResponse:
        """A pick; on the cold path (nothing has the model ready and the caller may wait),
        a load by the placement controller first, waited for up to `wait_for_load_ms`."""
        try:
            return self._pick(request, span)
        except errors.NoReadyInstanceError:
            if (
                not request.wait_for_load_ms
                or self._placement is None
                or not self._placement_active()
            ):
                raise
        if span is not None:
            span.add_event("cold start: waiting for a load")
        ready = await self._placement.request_and_wait(
            request.model_name, request.wait_for_load_ms / 1000
        )
        if ready is None:
            raise errors.NoReadyInstanceError(
                request.model_name,
                request.model_version,
                f"no copy became ready within {request.wait_for_load_ms} ms",
            )
        return self._pick(request, span, ready)

    def _pick(
        self,
        request: pb.PickTargetRequest,
        span: trace.Span | None,
        snapshot: FleetSnapshot | None = None,
    ) -> pb.PickTargetResponse:
        if not request.model_name:
            raise errors.InvalidRequestError("model_name is required")
        snapshot = snapshot or self._snapshot()
        if request.model_name not in snapshot.known_models:
            if not self._first_view.seen:
                raise errors.NoReadyInstanceError(
                    request.model_name, request.model_version, "the router is still starting"
                )
            raise errors.ModelNotFoundError(request.model_name)
        now = self._clock()
        started = self._metrics.timer()
        decision = decide(
            request_from_proto(request),
            snapshot,
            self._book.policy,
            now=now,
            rng=self._rng,
            assumed=self._assumed,
            draining=self._book.draining,
        )
        self._metrics.observe_pick(self._metrics.timer() - started)
        if span is not None:
            _describe_decision(span, decision)
        if decision.pick is None:
            raise errors.NoReadyInstanceError(
                request.model_name, decision.request.model_version, decision.filters.summary()
            )
        self._assumed.add(decision.pick.candidate.instance_id, request.model_name, now)
        return pick_to_proto(decision, self._book.generation)

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        return policy_to_proto(self._policy.current, self._policy.activated_unix_ms)

    async def ReloadPolicy(
        self, request: pb.ReloadPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadPolicyResponse:
        try:
            changed, version = self._policy.reload()
        except Exception as exc:  # an invalid file: INVALID_ARGUMENT naming the field
            await errors.abort(context, exc)
        return pb.ReloadPolicyResponse(policy_version=version, changed=changed)

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        models = frozenset(request.model_names)
        # A fresh router's first snapshot would name only the instances read so far.
        await self._first_view.wait(self._stopping)
        queue = self._book.watch()
        # Priority classes and the session policy go with the full snapshot and again whenever
        # a reload changes them; a policy change wakes the stream with an empty update so they
        # go out at once.
        sent_priorities: pb.PriorityPolicy | None = None
        sent_sessions: pb.SessionPolicy | None = None

        def wake(policy: Policy) -> None:
            if not queue.full():
                queue.put_nowait(RouteUpdate(False, (), (), self._book.generation))

        unsubscribe = self._policy.subscribe(wake)
        try:
            while not self._stopping.is_set():
                try:  # asyncio.timeout: wait_for can swallow a racing cancel on 3.11
                    async with asyncio.timeout(self._heartbeat_interval_s):
                        update = await queue.get()
                except TimeoutError:
                    message = pb.WatchRoutesResponse(
                        generation=self._book.generation, router_id=self._router_id
                    )
                else:
                    if update is None:
                        return
                    message = update_to_proto(
                        update, models, ttl_ms=self._book.ttl_ms, router_id=self._router_id
                    )
                priorities = priority_policy_to_proto(self._policy.current)
                if message.full_snapshot or priorities != sent_priorities:
                    message.priority_policy.CopyFrom(priorities)
                    sent_priorities = priorities
                sessions = session_policy_to_proto(self._policy.current)
                if message.full_snapshot or sessions != sent_sessions:
                    message.session_policy.CopyFrom(sessions)
                    sent_sessions = sessions
                yield message
        finally:
            unsubscribe()
            self._book.unwatch(queue)

    async def ListInstances(
        self, request: pb.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListInstancesResponse:
        return instances_to_proto(self._snapshot(), self._clock())

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        placement = self._placement.model_placement if self._placement is not None else None
        return models_to_proto(self._snapshot(), self._book.tables, self._book.ttl_ms, placement)
