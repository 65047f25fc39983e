"""Proxyless routing on real Tritons: a `pointsman up`-style fleet, then a stock
`tritonclient.grpc.InferenceServerClient("xds:///echo")` with GRPC_XDS_BOOTSTRAP set to the
fleet's bootstrap (in a subprocess: gRPC reads the variable once per process).

- requests succeed, Triton's own counters rise and the sidecar's do not; the split follows
  the router's route weights;
- a route change (the router's placement unloads a copy: it drains it from the routes first)
  moves traffic off that instance within 250 ms, with no failed request;
- a killed instance is avoided, with no failed request (retries on UNAVAILABLE).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient

from app.fleet import Fleet, FleetConfig
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from tests.support.fleet_metrics import sidecar_counter
from tests.support.proxyless_client import records, spawn, wait_for

pytestmark = pytest.mark.triton

MODEL = "echo"
INSTANCES = ("triton-0", "triton-1", "triton-2")
# Placement keeps the three start-up copies until a test lowers max_copies; a shrink then
# happens at the next controller tick, with no cool-down.
POLICY = """\
placement:
  interval_s: 0.5
  churn_guard_s: 0
  scale_down_cooldown_s: 0
models:
  echo: {{min_copies: {copies}, max_copies: {copies}}}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir = tmp_path_factory.mktemp("proxyless")
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY.format(copies=3))
    config = FleetConfig(
        instances=3,
        models=(MODEL,),
        placement={name: (MODEL,) for name in INSTANCES},
        sidecar_port=0,
        router_port=0,
        run_dir=run_dir,
        policy_file=policy,
    )
    with Fleet(config) as running:
        yield running


def client(fleet: Fleet, seconds: float, ready: Path | None = None) -> subprocess.Popen[str]:
    assert fleet.xds_bootstrap is not None and fleet.xds_bootstrap.exists()
    args = ["--mode", "triton", "--model", MODEL, "--seconds", str(seconds)]
    if ready is not None:
        args += ["--ready-file", str(ready)]
    return spawn(fleet.xds_bootstrap, f"xds:///{MODEL}", *args)


def served(address: str) -> int:
    """Requests of MODEL this Triton answered successfully (its own statistics)."""
    with grpcclient.InferenceServerClient(address) as direct:
        stats = direct.get_inference_statistics(MODEL, as_json=True)
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats["model_stats"])


def route_weights(fleet: Fleet) -> dict[str, float]:
    """MODEL's route table as sidecars get it: instance id -> weight."""
    with grpc.insecure_channel(fleet.router_address) as channel:
        stream = pb_grpc.RouterServiceStub(channel).WatchRoutes(
            pb.WatchRoutesRequest(client_id="test", model_names=[MODEL]), timeout=10
        )
        first = next(iter(stream))
        stream.cancel()
    (table,) = [t for t in first.tables if t.model_name == MODEL]
    return {c.target.instance_id: c.weight for c in table.candidates}


class RouteWatch:
    """Follows MODEL's route table in a thread: when each instance left it."""

    def __init__(self, fleet: Fleet) -> None:
        self.left_at: dict[str, float] = {}
        self._channel = grpc.insecure_channel(fleet.router_address)
        self._stream = pb_grpc.RouterServiceStub(self._channel).WatchRoutes(
            pb.WatchRoutesRequest(client_id="test", model_names=[MODEL])
        )
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        listed: set[str] | None = None
        try:
            for update in self._stream:
                for table in update.tables:
                    now = {c.target.instance_id for c in table.candidates}
                    for gone in (listed or set()) - now:
                        self.left_at.setdefault(gone, time.monotonic())
                    listed = now
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()


def holders(fleet: Fleet) -> list[str]:
    return sorted(route_weights(fleet))


def test_a_stock_client_routes_itself_straight_to_triton(fleet: Fleet) -> None:
    addresses = {s.instance_id: s.grpc_address for s in fleet.tritons}
    weights = route_weights(fleet)
    before = {i: served(a) for i, a in addresses.items()}
    sidecar_before = sidecar_counter(fleet, "pointsman_sidecar_requests")
    done = records(client(fleet, seconds=4))
    assert done and all(r["code"] == "OK" for r in done), done[:1]
    grown = {i: served(a) - before[i] for i, a in addresses.items()}
    total = sum(grown.values())
    print(f"{len(done)} requests; Triton counted {grown}; route weights {weights}")
    assert total >= len(done)  # every request reached a Triton ...
    assert (
        sidecar_counter(fleet, "pointsman_sidecar_requests") == sidecar_before
    )  # ... and none went through the sidecar
    weight_sum = sum(weights.values())
    for instance, weight in weights.items():
        assert grown[instance] / total == pytest.approx(weight / weight_sum, abs=0.15)


def test_a_route_change_moves_traffic_within_250_ms_without_a_failure(
    fleet: Fleet, tmp_path: Path
) -> None:
    copies = holders(fleet)
    assert len(copies) >= 2, "needs a copy to spare"
    addresses = {s.instance_id: s.grpc_address for s in fleet.tritons}
    watch = RouteWatch(fleet)
    ready = tmp_path / "ready"
    proc = client(fleet, seconds=8, ready=ready)
    wait_for(ready)
    # Poll every copy's own success counter to see when each one last took a request.
    last_served: dict[str, float] = {}
    polling = threading.Event()

    def poll() -> None:
        counts = {i: served(addresses[i]) for i in copies}
        while not polling.is_set():
            for instance in copies:
                try:
                    count = served(addresses[instance])
                except Exception:  # unloaded: no statistics any more
                    continue
                if count > counts[instance]:
                    counts[instance], last_served[instance] = count, time.monotonic()
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    assert fleet.config.policy_file is not None
    fleet.config.policy_file.write_text(POLICY.format(copies=len(copies) - 1))
    done = records(proc)
    polling.set()
    poller.join(5)
    watch.close()
    assert len(watch.left_at) == 1, f"the router should drain one copy: {watch.left_at}"
    ((drained, left_at),) = watch.left_at.items()
    moved_after = last_served.get(drained, 0.0) - left_at
    failed = [r for r in done if r["code"] != "OK"]
    print(
        f"{drained} left the routes; its last request {moved_after * 1000:.0f} ms later; "
        f"{len(done)} requests, {len(failed)} failed"
    )
    assert not failed, failed[:3]
    assert moved_after < 0.25 + 0.05  # 50 ms: the statistics poll's own latency
    assert drained not in holders(fleet)


def test_a_killed_instance_is_avoided_without_a_failure(fleet: Fleet, tmp_path: Path) -> None:
    copies = holders(fleet)
    assert len(copies) >= 2, "needs a copy to spare"
    victim = copies[0]
    ready = tmp_path / "ready"
    proc = client(fleet, seconds=5, ready=ready)
    wait_for(ready)
    time.sleep(0.5)
    (process,) = [p for p in fleet.processes if p.name == victim]
    killed_at = time.monotonic()
    process.kill()
    done = records(proc)
    failed = [r for r in done if r["code"] != "OK"]
    after = sum(1 for r in done if float(r["t"]) > killed_at + 0.5)  # type: ignore[arg-type]
    print(f"{victim} killed; {len(done)} requests, {after} after, {len(failed)} failed")
    assert not failed, failed[:3]
    assert after > 20
