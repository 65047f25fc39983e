"""Conversions between the router's own types and the protos of `pointsman.router.v1`.

The one module that reads or builds RouterService messages: router/service.py handles the
RPCs and calls these; the core (decisions, route tables, policy, snapshots) speaks the
router's types only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from pointsman.router.v1 import router_pb2 as pb
from pointsman.versions import rules_to_proto
from router.contracts import FleetSnapshot, InstanceSnapshot, MemorySource, RoutingRequest
from router.decision import Decision
from router.placement.controller import ModelPlacement
from router.policy import Policy
from router.routes import ModelRoutes, RouteUpdate, version_order

__all__ = [
    "instances_to_proto",
    "models_to_proto",
    "pick_to_proto",
    "policy_to_proto",
    "priority_policy_to_proto",
    "request_from_proto",
    "session_policy_to_proto",
    "table_to_proto",
    "update_to_proto",
]

_MEMORY_SOURCE = {
    MemorySource.UNKNOWN: pb.MEMORY_SOURCE_UNSPECIFIED,
    MemorySource.GPU_METRICS: pb.MEMORY_SOURCE_GPU_METRICS,
    MemorySource.DECLARED: pb.MEMORY_SOURCE_DECLARED,
}
# data_age_ms of an instance never refreshed, and the most any age shows (a uint32).
_AGE_UNKNOWN_MS = 2**32 - 1


def request_from_proto(request: pb.PickTargetRequest) -> RoutingRequest:
    """The request as scheduling sees it; header names are lower-cased as gRPC metadata is."""
    return RoutingRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        headers={name.lower(): value for name, value in request.headers.items()},
    )


def pick_to_proto(decision: Decision, generation: int) -> pb.PickTargetResponse:
    """A decision with targets: the pick, then the fallbacks in order."""
    model_name = decision.request.model_name
    targets = [_target(scored.candidate.instance, model_name) for scored in decision.targets]
    return pb.PickTargetResponse(
        target=targets[0],
        fallbacks=targets[1:],
        generation=generation,
        model_version=decision.request.model_version,
    )


def _target(instance: InstanceSnapshot, model_name: str) -> pb.Target:
    model = instance.model(model_name)
    versions = sorted(model.ready_versions, key=version_order) if model else []
    return pb.Target(
        instance_id=instance.instance_id,
        grpc_address=instance.grpc_address,
        ready_versions=versions,
    )


def table_to_proto(table: ModelRoutes, ttl_ms: int) -> pb.RouteTable:
    rules = table.version_rules
    return pb.RouteTable(
        model_name=table.model_name,
        candidates=[
            pb.RouteCandidate(
                target=pb.Target(
                    instance_id=entry.instance_id,
                    grpc_address=entry.grpc_address,
                    ready_versions=list(entry.ready_versions),
                ),
                weight=entry.weight,
            )
            for entry in table.candidates
        ],
        ttl_ms=ttl_ms,
        generation=table.generation,
        default_version=table.default_version,
        version_policy=None if rules.is_empty else rules_to_proto(rules),
    )


def update_to_proto(
    update: RouteUpdate, models: Collection[str], *, ttl_ms: int, router_id: str
) -> pb.WatchRoutesResponse:
    """A route update for a watcher of `models` (empty: every model)."""
    return pb.WatchRoutesResponse(
        full_snapshot=update.full,
        tables=[
            table_to_proto(table, ttl_ms)
            for table in update.tables
            if not models or table.model_name in models
        ],
        removed_models=[m for m in update.removed if not models or m in models],
        generation=update.generation,
        router_id=router_id,
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


def session_policy_to_proto(policy: Policy) -> pb.SessionPolicy:
    """The policy's session affinity as sidecars receive it on WatchRoutes."""
    sessions = policy.sessions
    return pb.SessionPolicy(
        header=sessions.header,
        max_in_flight=sessions.max_in_flight,
        move_ttl_s=sessions.move_ttl_s,
    )


def policy_to_proto(policy: Policy, loaded_unix_ms: int) -> pb.GetPolicyResponse:
    return pb.GetPolicyResponse(
        policy_version=policy.version,
        source=policy.source,
        policy_yaml=policy.yaml_text or policy.effective_yaml(),
        loaded_unix_ms=loaded_unix_ms,
    )


def instances_to_proto(snapshot: FleetSnapshot, now: float) -> pb.ListInstancesResponse:
    return pb.ListInstancesResponse(instances=[_instance(inst, now) for inst in snapshot.instances])


def _instance(inst: InstanceSnapshot, now: float) -> pb.Instance:
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
    age_ms = int((now - inst.refreshed_at) * 1000) if inst.refreshed_at else _AGE_UNKNOWN_MS
    return pb.Instance(
        instance_id=inst.instance_id,
        grpc_address=inst.grpc_address,
        metrics_url=inst.metrics_url,
        healthy=inst.healthy,
        data_age_ms=min(age_ms, _AGE_UNKNOWN_MS),
        models=models,
        memory_used_bytes=inst.memory_used_bytes,
        memory_budget_bytes=inst.memory_budget_bytes,
        pending_requests=inst.pending_requests,
        inferences_per_second=inst.inferences_per_second,
        memory_source=_MEMORY_SOURCE[inst.memory_source],
        last_error=inst.last_error,
    )


def models_to_proto(
    snapshot: FleetSnapshot,
    tables: Mapping[str, ModelRoutes],
    ttl_ms: int,
    placement: Callable[[str], ModelPlacement] | None,
) -> pb.ListModelsResponse:
    """Every known model: where it is, its route table, and (with `placement`, the
    controller's `model_placement`) its copies, demand and last placement decision."""
    summaries = []
    for name in sorted(snapshot.known_models):
        on = [(i.instance_id, i.model(name)) for i in snapshot.instances]
        table = tables.get(name)
        ready = [i for i, m in on if m and m.is_ready]
        summary = pb.ModelSummary(
            model_name=name,
            ready_instances=ready,
            loading_instances=[i for i, m in on if m and m.is_loading],
            ready_versions=sorted({v for _, m in on if m for v in m.ready_versions}),
            route_table=table_to_proto(table, ttl_ms) if table else None,
            copies=len(ready),
        )
        if placement is not None:
            _add_placement(summary, placement(name))
        summaries.append(summary)
    return pb.ListModelsResponse(models=summaries)


def _add_placement(summary: pb.ModelSummary, placed: ModelPlacement) -> None:
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
