"""The gRPC RouterService: PickTarget, WatchRoutes, ListInstances, ListModels.

PickTarget is measured (`RouterMetrics`) and, when tracing is on, recorded as a SERVER span
that continues the caller's `traceparent` and carries the decision: target, top scores,
fallbacks, or why nothing could serve (span attributes are listed in router/README.md).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from opentelemetry import trace

from pointsman import errors
from pointsman.clock import Clock
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.telemetry import Tracing, extract_context
from pointsman.versions import PIN_HEADER, rules_to_proto, select_version
from router.contracts import (
    FleetSnapshot,
    MemorySource,
    RoutingRequest,
    SchedulingCycle,
    ScoredCandidate,
)
from router.first_view import FirstView
from router.metrics import UNKNOWN_MODEL, RouterMetrics
from router.placement.controller import PlacementController
from router.policy import Policy, PolicyStore
from router.routes import (
    AssumedLoad,
    ModelRoutes,
    RouteBook,
    RouteEntry,
    RouteUpdate,
    candidates_for,
)
from router.scheduling import FilterTrace

__all__ = ["RouterServicer"]

_MEMORY_SOURCE = {
    MemorySource.UNKNOWN: pb.MEMORY_SOURCE_UNSPECIFIED,
    MemorySource.GPU_METRICS: pb.MEMORY_SOURCE_GPU_METRICS,
    MemorySource.DECLARED: pb.MEMORY_SOURCE_DECLARED,
}


def _target(entry: RouteEntry) -> pb.Target:
    return pb.Target(
        instance_id=entry.instance_id,
        grpc_address=entry.grpc_address,
        ready_versions=list(entry.ready_versions),
    )


# Scores of this many best candidates go into a pick's span.
_TRACED_SCORES = 3
_RPC_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "pointsman.router.v1.RouterService",
    "rpc.method": "PickTarget",
}


def _describe_decision(
    span: trace.Span,
    ranked: Sequence[ScoredCandidate],
    ordered: Sequence[ScoredCandidate],
    filters: FilterTrace,
) -> None:
    """Puts what decided a pick on its span: e.g. pointsman.scores 'triton-0=5.80,...'."""
    span.set_attribute("pointsman.candidates", filters.considered)
    if not ordered:
        span.set_attribute("pointsman.filter_trace", filters.summary())
        return
    chosen = ordered[0]
    span.set_attribute("pointsman.target", chosen.candidate.instance_id)
    span.set_attribute("pointsman.target_address", chosen.candidate.instance.grpc_address)
    span.set_attribute("pointsman.fallbacks", len(ordered) - 1)
    span.set_attribute(
        "pointsman.scores",
        ",".join(f"{s.candidate.instance_id}={s.total:.2f}" for s in ranked[:_TRACED_SCORES]),
    )
    span.set_attribute(
        "pointsman.target_scores",
        ",".join(f"{name}={score:.2f}" for name, score in chosen.scores.items()),
    )


def priority_policy_to_proto(policy: Policy) -> pb.PriorityPolicy:
    """The policy's priority classes as sidecars receive them on WatchRoutes."""
    return pb.PriorityPolicy(
        classes=[
            pb.PriorityClass(
                name=pc.name, triton_priority=pc.triton_priority, sheddable=pc.sheddable
            )
            for _, pc in sorted(policy.priority_classes.items())
        ],
        default_class=policy.default_priority_class,
    )


def table_to_proto(table: ModelRoutes, ttl_ms: int) -> pb.RouteTable:
    rules = table.version_rules
    return pb.RouteTable(
        model_name=table.model_name,
        candidates=[
            pb.RouteCandidate(target=_target(e), weight=e.weight) for e in table.candidates
        ],
        ttl_ms=ttl_ms,
        generation=table.generation,
        default_version=table.default_version,
        version_policy=None if rules.is_empty else rules_to_proto(rules),
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
        headers = {k.lower(): v for k, v in request.headers.items()}
        version = request.model_version or self._choose_version(
            snapshot, request.model_name, headers
        )
        cycle = SchedulingCycle(
            request=RoutingRequest(
                model_name=request.model_name, model_version=version, headers=headers
            ),
            now=now,
        )
        scheduler = self._book.scheduler
        candidates = candidates_for(
            snapshot,
            request.model_name,
            self._assumed,
            now,
            self._book.draining,
            only_holders=scheduler.only_model_holders,
        )
        ranked, filter_trace = scheduler.rank_with_trace(cycle, candidates)
        if not ranked and scheduler.only_model_holders:
            # The slow path, for a message: every instance, so the trace says why each failed.
            everyone = candidates_for(
                snapshot, request.model_name, self._assumed, now, self._book.draining
            )
            filter_trace = scheduler.rank_with_trace(cycle, everyone)[1]
        ordered = self._book.scheduler.profile.picker.pick(ranked, self._rng) if ranked else []
        self._metrics.observe_pick(self._metrics.timer() - started)
        if span is not None:
            _describe_decision(span, ranked, ordered, filter_trace)
        if not ordered:
            raise errors.NoReadyInstanceError(request.model_name, version, filter_trace.summary())
        targets = []
        for scored in ordered:
            inst = scored.candidate.instance
            model = inst.model(request.model_name)
            targets.append(
                pb.Target(
                    instance_id=inst.instance_id,
                    grpc_address=inst.grpc_address,
                    ready_versions=sorted(model.ready_versions) if model else [],
                )
            )
        self._assumed.add(targets[0].instance_id, request.model_name, now)
        return pb.PickTargetResponse(
            target=targets[0],
            fallbacks=targets[1:],
            generation=self._book.generation,
            model_version=version,
        )

    def _choose_version(self, snapshot: FleetSnapshot, model: str, headers: dict[str, str]) -> str:
        """The version an unpinned request gets: the x-model-version header, else the policy's
        header rules and split over the versions ready somewhere, else "" (the highest)."""
        pinned = headers.get(PIN_HEADER)
        if pinned:
            return pinned
        rules = self._book.rules_for(model)
        if rules.is_empty:
            return ""
        available = {
            v for inst in snapshot.instances if (m := inst.model(model)) for v in m.ready_versions
        }
        return select_version(rules, headers, self._rng, available) or ""

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        policy = self._policy.current
        return pb.GetPolicyResponse(
            policy_version=policy.version,
            source=policy.source,
            policy_yaml=policy.yaml_text or policy.effective_yaml(),
            loaded_unix_ms=self._policy.activated_unix_ms,
        )

    async def ReloadPolicy(
        self, request: pb.ReloadPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadPolicyResponse:
        try:
            changed, version = self._policy.reload()
        except Exception as exc:  # an invalid file: INVALID_ARGUMENT naming the field
            await errors.abort(context, exc)
        return pb.ReloadPolicyResponse(policy_version=version, changed=changed)

    def _message(self, update: RouteUpdate, models: frozenset[str]) -> pb.WatchRoutesResponse:
        ttl = self._book.ttl_ms
        return pb.WatchRoutesResponse(
            full_snapshot=update.full,
            tables=[
                table_to_proto(t, ttl)
                for t in update.tables
                if not models or t.model_name in models
            ],
            removed_models=[m for m in update.removed if not models or m in models],
            generation=update.generation,
            router_id=self._router_id,
        )

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        models = frozenset(request.model_names)
        # A fresh router's first snapshot would name only the instances read so far.
        await self._first_view.wait(self._stopping)
        queue = self._book.watch()
        # Priority classes go with the full snapshot and again whenever a reload changes them;
        # a policy change wakes the stream with an empty update so they go out at once.
        sent_priorities: pb.PriorityPolicy | None = None

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
                    message = self._message(update, models)
                priorities = priority_policy_to_proto(self._policy.current)
                if message.full_snapshot or priorities != sent_priorities:
                    message.priority_policy.CopyFrom(priorities)
                    sent_priorities = priorities
                yield message
        finally:
            unsubscribe()
            self._book.unwatch(queue)

    async def ListInstances(
        self, request: pb.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListInstancesResponse:
        now = self._clock()
        instances = []
        for inst in self._snapshot().instances:
            models = [
                pb.LoadedModel(
                    model_name=m.name,
                    model_version=version,
                    state=state,
                    pending_requests=m.pending_requests,
                    declared_memory_bytes=m.declared_memory_bytes,
                )
                for m in inst.models.values()
                for versions, state in (
                    (m.ready_versions, pb.MODEL_STATE_READY),
                    (m.loading_versions, pb.MODEL_STATE_LOADING),
                )
                for version in sorted(versions)
            ]
            age_ms = int((now - inst.refreshed_at) * 1000) if inst.refreshed_at else 2**32 - 1
            instances.append(
                pb.Instance(
                    instance_id=inst.instance_id,
                    grpc_address=inst.grpc_address,
                    metrics_url=inst.metrics_url,
                    healthy=inst.healthy,
                    data_age_ms=min(age_ms, 2**32 - 1),
                    models=models,
                    memory_used_bytes=inst.memory_used_bytes,
                    memory_budget_bytes=inst.memory_budget_bytes,
                    pending_requests=inst.pending_requests,
                    inferences_per_second=inst.inferences_per_second,
                    memory_source=_MEMORY_SOURCE[inst.memory_source],
                    last_error=inst.last_error,
                )
            )
        return pb.ListInstancesResponse(instances=instances)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        snapshot = self._snapshot()
        summaries = []
        for name in sorted(snapshot.known_models):
            on = [(i.instance_id, i.model(name)) for i in snapshot.instances]
            table = self._book.tables.get(name)
            ready = [i for i, m in on if m and m.is_ready]
            summary = pb.ModelSummary(
                model_name=name,
                ready_instances=ready,
                loading_instances=[i for i, m in on if m and m.is_loading],
                ready_versions=sorted({v for _, m in on if m for v in m.ready_versions}),
                route_table=table_to_proto(table, self._book.ttl_ms) if table else None,
                copies=len(ready),
            )
            if self._placement is not None:
                placed = self._placement.model_placement(name)
                summary.target_copies = placed.target_copies
                summary.demand_rps = placed.demand_rps
                summary.forecast_rps = placed.forecast_rps
                if placed.last_decision is not None:
                    d = placed.last_decision
                    summary.last_decision.CopyFrom(
                        pb.PlacementDecision(
                            action=d.action,
                            instance_id=d.instance_id,
                            reason=d.reason,
                            decided_unix_ms=d.decided_unix_ms,
                        )
                    )
            summaries.append(summary)
        return pb.ListModelsResponse(models=summaries)
