"""Overload on a real Triton: offered load at about three times what one instance serves.

A module fleet (one Triton with `codegen`, router, sidecar) runs a policy with two classes,
`high` (Triton priority 1) and `low` (priority 2, sheddable, the default), and a sidecar
bounded to 8 requests in flight and 32 queued. Low priority is shed with RESOURCE_EXHAUSTED and
a retry hint; high priority never is; the sidecar's memory stays bounded. The high-priority p99
loaded and unloaded is printed, not asserted (timing on a shared machine is noise; see
`pointsman bench --scenario overload` for the figures). A second test finds Triton's own
queue-full answer and checks that the sidecar counts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from app.fleet import Fleet, FleetConfig
from bench.calls import INFER_METHOD, codegen_request
from bench.procstats import ProcessSampler
from bench.scenarios.overload import PRIORITY_POLICY as POLICY
from bench.scenarios.overload import (
    class_figures,
    closed_priority_load,
    measure_capacity,
    open_priority_load,
)
from pointsman.router.v1 import router_pb2, router_pb2_grpc
from sidecar.config import SidecarConfig
from sidecar.server import start_sidecar

pytestmark = pytest.mark.triton


BULK = """\
  bulk: {triton_priority: 2, sheddable: true}
default_priority_class: bulk
"""
MAX_IN_FLIGHT, MAX_QUEUED = 8, 32
REQUEST = codegen_request("def quicksort(items):", 16)


@pytest.fixture(scope="module")
def overload_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir: Path = tmp_path_factory.mktemp("overload-fleet")
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY)
    fleet = Fleet(
        FleetConfig(
            instances=1,
            placement={"triton-0": ("codegen",)},
            sidecar_port=0,
            router_port=0,
            run_dir=run_dir,
            policy_file=policy,
            sidecar_args=(
                "--cold-start-wait",
                "0",
                "--max-in-flight",
                str(MAX_IN_FLIGHT),
                "--max-queued",
                str(MAX_QUEUED),
            ),
        )
    )
    with fleet:
        yield fleet


def _sidecar_pid(fleet: Fleet) -> int:
    pid = next(p.pid for p in fleet.processes if p.name == "sidecar")
    assert pid is not None
    return pid


@pytest.mark.timeout(180)
def test_three_times_capacity_sheds_low_priority_only(overload_fleet: Fleet) -> None:
    address = overload_fleet.sidecar_address
    # Warm up, then the unloaded high-priority latency.
    asyncio.run(
        closed_priority_load(address, REQUEST, priority="high", concurrency=1, duration_s=1.0)
    )
    unloaded = class_figures(
        asyncio.run(
            closed_priority_load(address, REQUEST, priority="high", concurrency=1, duration_s=3.0)
        ),
        "high",
    )
    assert unloaded.ok == unloaded.sent > 0
    capacity = asyncio.run(
        measure_capacity(address, REQUEST, concurrency=MAX_IN_FLIGHT, duration_s=3.0)
    )
    assert capacity > 0
    pid = _sidecar_pid(overload_fleet)
    with ProcessSampler([pid]) as rss:
        run = asyncio.run(
            open_priority_load(
                address,
                REQUEST,
                rate_rps=3 * capacity,
                duration_s=8.0,
                classes=(("high", 0.1), ("low", 0.9)),
                seed=7,
            )
        )
    high, low = class_figures(run, "high"), class_figures(run, "low")
    print(
        f"\ncapacity {capacity:.1f} rps, offered {3 * capacity:.1f} rps for 8 s; "
        f"high p50/p99 unloaded {unloaded.p50_ms:.1f}/{unloaded.p99_ms:.1f} ms, "
        f"loaded {high.p50_ms:.1f}/{high.p99_ms:.1f} ms "
        f"(p99 ratio {high.p99_ms / unloaded.p99_ms:.2f}); high {high}; low {low}; "
        f"sidecar RSS {rss.start_rss / 2**20:.1f} -> peak {rss.peak_rss / 2**20:.1f} MiB"
    )
    assert high.sent > 0 and low.sent > 0
    # High priority is never shed and every high request is answered.
    assert high.shed == 0 and high.other_errors == 0 and high.ok == high.sent
    # Low priority is shed, with RESOURCE_EXHAUSTED and a retry hint, and never UNAVAILABLE.
    assert low.shed > 0
    shed = [r for r in run.records if r.status == "RESOURCE_EXHAUSTED"]
    assert all(r.tag == "low" and (r.retry_after_ms or 0) > 0 for r in shed)
    assert low.other_errors == 0
    # Memory stays bounded: the queue is bounded and shed requests cost nothing after.
    assert rss.peak_rss - rss.start_rss < 64 * 2**20


@pytest.mark.timeout(120)
def test_triton_queue_full_is_counted(overload_fleet: Fleet) -> None:
    """Triton answers a full queue (codegen's max_queue_size: 64) with UNAVAILABLE "Exceeds
    maximum queue size" and counts it nowhere; a sidecar that lets more through (flow control
    off: it would hold and resend them, tests/integration/test_flow_control.py) counts it."""
    triton = overload_fleet.tritons[0].grpc_address

    async def flood() -> tuple[list[grpc.StatusCode], str, float]:
        sidecar = await start_sidecar(
            SidecarConfig(
                listen="127.0.0.1:0",
                static_routes={"codegen": (triton,)},
                max_in_flight=400,
                max_queued=0,
                flow_control=False,
            ),
            registry=CollectorRegistry(),
        )
        try:
            async with grpc.aio.insecure_channel(sidecar.address) as channel:
                infer = channel.unary_unary(
                    INFER_METHOD, request_serializer=None, response_deserializer=None
                )
                results = await asyncio.gather(
                    *(infer(REQUEST, timeout=60) for _ in range(300)), return_exceptions=True
                )
            codes = [
                r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK
                for r in results
            ]
            message = next(
                (r.details() for r in results if isinstance(r, grpc.aio.AioRpcError)), ""
            )
            counted = sidecar.metrics.registry.get_sample_value(
                "pointsman_sidecar_triton_queue_full_total", {"model": "codegen"}
            )
            return codes, message, counted or 0.0
        finally:
            await sidecar.stop(1.0)

    codes, message, counted = asyncio.run(flood())
    rejected = codes.count(grpc.StatusCode.UNAVAILABLE)
    assert rejected > 0, "300 concurrent requests should overflow a queue of 64"
    assert "Exceeds maximum queue size" in message
    assert codes.count(grpc.StatusCode.OK) + rejected == len(codes)
    assert counted == rejected


@pytest.mark.timeout(60)
def test_watch_routes_carries_priority_classes_and_resends_on_reload(
    overload_fleet: Fleet,
) -> None:
    policy_file = overload_fleet.run_dir / "policy.yaml"

    async def watch() -> tuple[router_pb2.PriorityPolicy, router_pb2.PriorityPolicy]:
        async with grpc.aio.insecure_channel(overload_fleet.router_address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            stream = stub.WatchRoutes(router_pb2.WatchRoutesRequest(client_id="test"))
            first = await stream.read()
            assert first.full_snapshot and first.HasField("priority_policy")
            policy_file.write_text(POLICY.replace("default_priority_class: low", "") + BULK)
            await stub.ReloadPolicy(router_pb2.ReloadPolicyRequest())
            # The next message carrying classes must be the reloaded ones, well before a
            # heartbeat would have been due.
            while True:
                message = await asyncio.wait_for(stream.read(), 5)
                if message.HasField("priority_policy"):
                    stream.cancel()
                    return first.priority_policy, message.priority_policy

    try:
        before, after = asyncio.run(watch())
    finally:
        policy_file.write_text(POLICY)
    assert {(c.name, c.triton_priority, c.sheddable) for c in before.classes} == {
        ("high", 1, False),
        ("low", 2, True),
    }
    assert before.default_class == "low"
    assert {c.name for c in after.classes} == {"high", "low", "bulk"}
    assert after.default_class == "bulk"
