"""Scenario `route-propagation`: how fast a change reaches routing.

A local fleet (3 Tritons, router, sidecar, each its own process; in quick mode the quick run's
shared one-Triton fleet) with a policy file that splits `codegen` between its versions 1 and 2.

1. Fleet change: `echo` is loaded and unloaded on one instance directly through Triton's API,
   behind the router's back; timed from Triton's answer until the sidecar routes accordingly
   (the first successful echo after a load, the first UNAVAILABLE after an unload). That covers
   the router's repository poll, the route rebuild, the WatchRoutes push and the sidecar's
   update.
2. Policy change: the policy file is rewritten (all traffic to version 2, then the split back),
   timed from the write until PickTarget answers only (or again not only) version 2; meanwhile
   closed-loop clients send `codegen` through the sidecar, and every failure is counted.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from app.fleet import Fleet, FleetConfig
from bench.calls import INFER_METHOD, PROMPTS, TritonCalls, codegen_request
from bench.loadgen import LoadRun, Request, run_closed_loop
from bench.report import ScenarioResult, Table, TargetCheck
from bench.scenarios import Options, Say
from bench.scenarios.quick_fleet import SharedFleet, fleet_for
from bench.stats import summarize
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc

__all__ = ["PropagationSettings", "run_route_propagation", "scenario"]

TARGET_MS = 250.0
# Placement is off: the controller would otherwise load `echo` back (it was used within
# keep_warm_s), and the changes measured here are the ones made behind the router's back.
SPLIT = """\
placement: {enabled: false}
models:
  codegen:
    versions:
      split: {"1": 80, "2": 20}
"""
ALL_ON_TWO = SPLIT.replace('{"1": 80, "2": 20}', '{"2": 1}')


@dataclass(frozen=True, slots=True)
class PropagationSettings:
    rounds: int = 10
    policy_rounds: int = 6
    clients: int = 4
    policy_period_s: float = 2.5  # from one policy change to the next


def _echo_request() -> bytes:
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    data: bytes = request.SerializeToString()
    return data


def _until(infer: grpc.UnaryUnaryMultiCallable, want_ok: bool, limit_s: float = 10.0) -> float:
    started = time.perf_counter()
    request = _echo_request()
    while time.perf_counter() - started < limit_s:
        try:
            infer(request, timeout=2)
            if want_ok:
                return time.perf_counter() - started
        except grpc.RpcError as exc:
            if not want_ok and exc.code() == grpc.StatusCode.UNAVAILABLE:
                return time.perf_counter() - started
        time.sleep(0.002)
    raise TimeoutError("the sidecar's routes never changed")


def _fleet_changes(fleet: Fleet, rounds: int, say: Say) -> tuple[list[float], list[float]]:
    target = fleet.tritons[-1]
    load_ms: list[float] = []
    unload_ms: list[float] = []
    with (
        grpcclient.InferenceServerClient(target.grpc_address) as direct,
        grpc.insecure_channel(fleet.sidecar_address) as channel,
    ):
        infer = channel.unary_unary(
            INFER_METHOD, request_serializer=None, response_deserializer=None
        )
        for index in range(rounds):
            say(f"route-propagation: fleet change {index + 1}/{rounds}")
            direct.load_model("echo")
            load_ms.append(_until(infer, want_ok=True) * 1000)
            direct.unload_model("echo")
            unload_ms.append(_until(infer, want_ok=False) * 1000)
            if index + 1 < rounds:
                time.sleep(1.5)  # let Triton finish UNLOADING before the next load
    return load_ms, unload_ms


def _picked_versions(stub: pb_grpc.RouterServiceStub, picks: int = 30) -> set[str]:
    request = pb.PickTargetRequest(model_name="codegen")
    return {stub.PickTarget(request, timeout=5).model_version for _ in range(picks)}


def _policy_changes(
    fleet: Fleet, write_policy: Callable[[str], object], settings: PropagationSettings, say: Say
) -> tuple[list[float], LoadRun]:
    """Milliseconds from each file write to routing by it, and the traffic sent through the
    sidecar meanwhile (on a thread, for the whole series of changes)."""
    bodies = [codegen_request(p, 4) for p in PROMPTS]

    async def traffic(seconds: float) -> LoadRun:
        async with grpc.aio.insecure_channel(fleet.sidecar_address) as channel:
            calls = TritonCalls(channel, timeout_s=30)
            return await run_closed_loop(
                lambda w, _at: Request(calls.unary(bodies[w % len(bodies)])),
                concurrency=settings.clients,
                duration_s=seconds,
            )

    runs: list[LoadRun] = []
    period_s = settings.policy_period_s
    sender = threading.Thread(
        target=lambda: runs.append(asyncio.run(traffic(1.0 + period_s * settings.policy_rounds)))
    )
    sender.start()
    applied_ms: list[float] = []
    try:
        with grpc.insecure_channel(fleet.router_address) as channel:
            stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
            time.sleep(0.5)
            for index in range(settings.policy_rounds):
                text = ALL_ON_TWO if index % 2 == 0 else SPLIT
                say(f"route-propagation: policy change {index + 1}/{settings.policy_rounds}")
                write_policy(text)
                written = time.perf_counter()
                while (_picked_versions(stub) == {"2"}) != (text == ALL_ON_TWO):
                    if time.perf_counter() - written > 10:
                        raise TimeoutError("the policy change never applied")
                applied_ms.append((time.perf_counter() - written) * 1000)
                time.sleep(max(0.0, period_s - (time.perf_counter() - written)))
    finally:
        sender.join()
    return applied_ms, runs[0]


def _row(label: str, values: list[float]) -> tuple[object, ...]:
    return (label, len(values), statistics.median(values), max(values), TARGET_MS)


def run_route_propagation(
    settings: PropagationSettings, say: Say = lambda _line: None, shared: SharedFleet | None = None
) -> ScenarioResult:
    """On `shared`'s fleet when given (it writes the policy through it), else on its own."""
    run_dir = Path(tempfile.mkdtemp(prefix="pointsman-bench-propagation-"))
    policy = run_dir / "policy-file.yaml"
    policy.write_text(SPLIT)
    # No cold path in the sidecar: a model with no route is UNAVAILABLE at once, rather than
    # loaded on demand, so the first UNAVAILABLE marks the route's removal.
    config = FleetConfig(
        instances=3,
        sidecar_port=0,
        router_port=0,
        run_dir=run_dir,
        policy_file=policy,
        sidecar_args=("--cold-start-wait", "0"),
    )
    write_policy = shared.write_policy if shared is not None else policy.write_text
    with fleet_for(shared, config) as fleet:
        instances = len(fleet.tritons)
        load_ms, unload_ms = _fleet_changes(fleet, settings.rounds, say)
        policy_ms, traffic = _policy_changes(fleet, write_policy, settings, say)
    sent = summarize(traffic.records, traffic.elapsed_s)
    rows = (
        _row("model loaded on an instance -> sidecar routes to it", load_ms),
        _row("model unloaded -> sidecar stops routing to it", unload_ms),
        _row("policy file written -> PickTarget follows it", policy_ms),
    )
    worst_fleet = max(max(load_ms), max(unload_ms))
    return ScenarioResult(
        name="route-propagation",
        title="Route propagation: fleet and policy changes to routing",
        tables=(
            Table(
                f"{instances} Triton(s), router, sidecar (own processes); milliseconds",
                ("change", "rounds", "p50 ms", "max ms", "target ms"),
                rows,
            ),
            Table(
                f"codegen through the sidecar during the {settings.policy_rounds} policy changes "
                f"({settings.clients} closed-loop clients)",
                ("requests", "ok", "failed", "timed out", "errors by status", "p99 ms"),
                (
                    (
                        sent.requests,
                        sent.ok,
                        sent.failed,
                        sent.timed_out,
                        ", ".join(f"{k} {v}" for k, v in sent.errors_by_status.items()) or "-",
                        sent.p99_ms,
                    ),
                ),
            ),
        ),
        targets=(
            TargetCheck(
                "fleet change to the sidecar's routes, max",
                f"<= {TARGET_MS:g} ms",
                f"{worst_fleet:.0f} ms",
                worst_fleet <= TARGET_MS,
            ),
            TargetCheck(
                "requests lost during policy reloads", "0", str(sent.errors), sent.errors == 0
            ),
        ),
        notes=(
            *(("quick mode: on the quick run's shared fleet",) if shared else ()),
            f"logs: {run_dir}",
        ),
        data={
            "load_ms": load_ms,
            "unload_ms": unload_ms,
            "policy_applied_ms": policy_ms,
            "traffic_during_reloads": sent.to_dict(),
        },
    )


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = PropagationSettings()
    if options.quick:
        settings = replace(settings, rounds=1, policy_rounds=2, clients=2, policy_period_s=1.0)
    if options.repetitions:
        settings = replace(settings, rounds=options.repetitions, policy_rounds=options.repetitions)
    return run_route_propagation(settings, say, options.shared)
