"""Fail-static on real processes: the router killed with -9 under steady load and restarted,
and two router replicas (active-active) with one of them killed.

Two real Tritons serve `echo`; each router is its own `pointsman router` process; the sidecar
runs in this process (its route cache is read directly) and load goes through it from client
threads. Every request must succeed: while the router is away the sidecar routes on its stale
tables, and it finds the router (or the other replica) again on its own.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from app.fleet import wait_for_health
from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from sidecar.config import PickMode, SidecarConfig
from sidecar.server import SidecarServer, start_sidecar
from tests.support.loop_thread import LoopThread

# How long the router stays dead under load. The proof is 30 s; the test keeps CI
# lean with a window a few times the sidecar's reconnect ceiling (RECONNECT_MAX_S), so the
# sidecar is deep in its backoff when the router returns. POINTSMAN_ROUTER_DOWN_S=30 runs the
# issue's full proof; the test prints its figures either way (pytest -s).
ROUTER_DOWN_S = float(os.environ.get("POINTSMAN_ROUTER_DOWN_S", "6"))
RECONNECT_MAX_S = 1.0
# After a restart the routes must be fresh again within this (the issue: "in seconds").
FRESH_AGAIN_WITHIN_S = 10.0
LOAD_THREADS = 3
INFER = "/inference.GRPCInferenceService/ModelInfer"
# Both routers keep echo where it is: placement has nothing to do, so two replicas cannot
# disagree about it during the test (see the report on active-active placement).
POLICY = "models:\n  echo: {min_copies: 2, max_copies: 2}\n"

pytestmark = [pytest.mark.triton, pytest.mark.timeout(240)]


@dataclass
class Routers:
    """Router processes over the same Tritons, each on a fixed port so a restart keeps it."""

    run_dir: Path
    config_text: str
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str, *flags: str) -> None:
        port = self.ports.setdefault(name, free_port())
        config = self.run_dir / f"{name}.yaml"
        config.write_text(self.config_text.replace("LISTEN", f"127.0.0.1:{port}"))
        proc = ManagedProcess(
            ProcessSpec(
                name=name,
                argv=[sys.executable, "-m", "app", "router", "--config", str(config), *flags],
                env={"PYTHONUNBUFFERED": "1"},
                log_path=self.run_dir / f"{name}.log",
            )
        )
        proc.start()
        self.processes[name] = proc
        wait_for_health(self.address(name), proc)

    def kill(self, name: str) -> None:
        proc = self.processes.pop(name)
        proc.kill()  # SIGKILL: no drain, no goodbye to the watchers
        proc.wait(10)
        proc.close()

    def stop(self) -> None:
        stop_all(list(self.processes.values()), grace_s=5)
        self.processes.clear()


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routers]:
    run_dir = tmp_path_factory.mktemp("router-restart")
    installation = prepare_installation()
    specs = [
        TritonSpec.on_free_ports(name, load_models=("echo",), log_path=run_dir / f"{name}.log")
        for name in ("triton-0", "triton-1")
    ]
    tritons = [triton_process(s, installation) for s in specs]
    (run_dir / "policy.yaml").write_text(POLICY)
    routers = Routers(
        run_dir,
        yaml.safe_dump(
            {
                "listen": "LISTEN",
                "instances": [
                    {"id": s.instance_id, "grpc": s.grpc_address, "metrics_url": s.metrics_url}
                    for s in specs
                ],
                "policy_file": str(run_dir / "policy.yaml"),
            }
        ),
    )
    try:
        for proc in tritons:
            proc.start()
        for spec, proc in zip(specs, tritons, strict=True):
            wait_until_ready(spec.grpc_address, ["echo"], 90, proc)
        yield routers
    finally:
        routers.stop()
        stop_all(tritons, grace_s=8)


@dataclass
class Load:
    """Client threads sending echo through the sidecar until stopped; every outcome counted."""

    address: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        request = pb.ModelInferRequest(
            model_name="echo",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[4])
            ],
            raw_input_contents=[np.arange(4, dtype=np.float32).tobytes()],
        ).SerializeToString()
        for _ in range(LOAD_THREADS):
            thread = threading.Thread(target=self._run, args=(request,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, request: bytes) -> None:
        with grpc.insecure_channel(self.address) as channel:
            call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            while not self._stop.is_set():
                try:
                    call(request, timeout=10)
                except grpc.RpcError as error:
                    with self._lock:
                        self.failures.append(f"{error.code()}: {error.details()}")
                else:
                    with self._lock:
                        self.ok += 1
                time.sleep(0.01)  # steady, not saturating: two CPUs are shared with Triton

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def _sidecar(
    loop: LoopThread, routers: tuple[str, ...], pick_mode: PickMode = "table"
) -> SidecarServer:
    config = SidecarConfig(
        listen="127.0.0.1:0",
        routers=routers,
        pick_mode=pick_mode,
        reconnect_initial_s=0.1,
        reconnect_max_s=RECONNECT_MAX_S,
        router_idle_timeout_s=5,
        cold_start_wait_s=0,
    )
    return loop.run(start_sidecar(config, registry=CollectorRegistry()))


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `condition` held; AssertionError naming `what` after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.02)
    return time.monotonic() - started


def _gauge(sidecar: SidecarServer, name: str) -> float | None:
    return sidecar.metrics.registry.get_sample_value(name)


def _routes_echo_on_both(sidecar: SidecarServer) -> bool:
    route = sidecar.cache.routes.get("echo")
    return route is not None and len(route.by_version.get("", ())) == 2


@pytest.mark.parametrize("pick_mode", ["table", "per-request"])
def test_router_killed_and_restarted_under_load_loses_no_request(
    routers: Routers, loop: LoopThread, pick_mode: PickMode
) -> None:
    if "router-a" not in routers.processes:
        routers.start("router-a")
    sidecar = _sidecar(loop, (routers.address("router-a"),), pick_mode)
    try:
        cache = sidecar.cache
        _wait(lambda: cache.connected and _routes_echo_on_both(sidecar), 20, "no routes at first")
        first_router = cache.router_id
        with Load(sidecar.address) as load:
            time.sleep(1.0)
            routers.kill("router-a")
            _wait(lambda: cache.stale, 5, "the sidecar did not notice the router's death")
            assert _gauge(sidecar, "pointsman_sidecar_route_tables_stale") == 1.0
            assert _gauge(sidecar, "pointsman_sidecar_router_connected") == 0.0
            served_before = load.ok
            time.sleep(ROUTER_DOWN_S)
            served_while_down = load.ok - served_before
            age = _gauge(sidecar, "pointsman_sidecar_route_table_age_seconds")
            assert age is not None and age >= ROUTER_DOWN_S
            assert _routes_echo_on_both(sidecar)  # the last tables, still both instances

            restarted = time.monotonic()
            routers.start("router-a")
            started_s = time.monotonic() - restarted
            _wait(
                lambda: not cache.stale and cache.router_id != first_router,
                FRESH_AGAIN_WITHIN_S,
                "routes not fresh again after the restart",
            )
            fresh_s = time.monotonic() - restarted
            assert _routes_echo_on_both(sidecar)
            assert _gauge(sidecar, "pointsman_sidecar_route_tables_stale") == 0.0
            assert (_gauge(sidecar, "pointsman_sidecar_route_table_age_seconds") or 99) < 5
            time.sleep(1.0)  # load on the fresh tables too
        print(
            f"\n{pick_mode}: router down {ROUTER_DOWN_S:.0f}s under load: {load.ok} requests ok "
            f"({served_while_down} while down), {len(load.failures)} failed; restarted router "
            f"serving after {started_s:.2f}s, routes fresh {fresh_s:.2f}s after the restart began"
        )
        assert load.failures == [], load.failures[:5]
        assert served_while_down > 0
    finally:
        loop.run(sidecar.stop(0))


def test_active_active_sidecar_fails_over_to_the_other_router(
    routers: Routers, loop: LoopThread
) -> None:
    if "router-a" not in routers.processes:
        routers.start("router-a")
    # One placement writer per fleet: the second replica only routes.
    routers.start("router-b", "--no-placement")
    sidecar = _sidecar(loop, (routers.address("router-a"), routers.address("router-b")))
    try:
        cache = sidecar.cache
        _wait(lambda: cache.connected and _routes_echo_on_both(sidecar), 20, "no routes at first")
        watched = cache.router_id  # the first address: router-a
        with Load(sidecar.address) as load:
            time.sleep(0.5)
            killed = time.monotonic()
            routers.kill("router-a")
            _wait(lambda: cache.stale or cache.router_id != watched, 5, "death not noticed")
            failover_s = _wait(
                lambda: cache.connected and cache.router_id != watched,
                5,
                "the sidecar did not fail over to router-b",
            )
            failover_s = time.monotonic() - killed
            time.sleep(1.0)
        print(
            f"\nactive-active: router-a killed, sidecar on router-b after {failover_s:.2f}s; "
            f"{load.ok} requests ok, {len(load.failures)} failed"
        )
        assert load.failures == [], load.failures[:5]
        assert _routes_echo_on_both(sidecar)
    finally:
        loop.run(sidecar.stop(0))


def test_fresh_router_holds_routes_until_it_has_read_the_fleet(routers: Routers) -> None:
    """A router whose second instance never answers (a socket that accepts and stays silent)
    must not send a first snapshot from half a fleet: a sidecar would drop every model it
    does not list. Its first message already names echo; picks meanwhile are never NOT_FOUND."""
    from pointsman.router.v1 import router_pb2, router_pb2_grpc
    from router.config import parse_router_config
    from router.server import start_router

    triton = yaml.safe_load(routers.config_text)["instances"][0]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    loop = LoopThread()
    router = None
    try:
        config = parse_router_config(
            {
                "listen": "127.0.0.1:0",
                "instances": [
                    triton,
                    {"id": "silent", "grpc": f"127.0.0.1:{silent.getsockname()[1]}"},
                ],
                "policy_file": yaml.safe_load(routers.config_text)["policy_file"],
            }
        )
        router = loop.run(start_router(config, registry=CollectorRegistry()))
        with grpc.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
            try:
                stub.PickTarget(router_pb2.PickTargetRequest(model_name="echo"), timeout=5)
            except grpc.RpcError as error:  # before the first view: UNAVAILABLE, not NOT_FOUND
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            first = next(iter(stub.WatchRoutes(router_pb2.WatchRoutesRequest(), timeout=10)))
        assert first.full_snapshot
        assert "echo" in [t.model_name for t in first.tables], first
    finally:
        if router is not None:
            loop.run(router.stop(0))
        loop.close()
        silent.close()


def _loaded_anywhere(routers: Routers, model: str) -> bool:
    for instance in yaml.safe_load(routers.config_text)["instances"]:
        with grpc.insecure_channel(instance["grpc"]) as channel:
            index = channel.unary_unary(
                "/inference.GRPCInferenceService/RepositoryIndex",
                request_serializer=pb.RepositoryIndexRequest.SerializeToString,
                response_deserializer=pb.RepositoryIndexResponse.FromString,
            )(pb.RepositoryIndexRequest(), timeout=5)
        if any(m.name == model and m.state in ("READY", "LOADING") for m in index.models):
            return True
    return False


def test_only_the_placement_writer_loads_models(routers: Routers, tmp_path: Path) -> None:
    """A policy asks for a copy of codegen, loaded nowhere: a replica with placement_writer
    false leaves it alone for several placement intervals; the writer loads it."""
    from router.config import parse_router_config
    from router.server import start_router

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY + "  codegen: {min_copies: 1}\nplacement: {interval_s: 0.2, churn_guard_s: 0}\n"
    )
    instances = [
        {**i, "memory_budget_bytes": 2 * 1024**3}
        for i in yaml.safe_load(routers.config_text)["instances"]
    ]
    assert not _loaded_anywhere(routers, "codegen")
    loop = LoopThread()
    try:
        for writer in (False, True):
            config = parse_router_config(
                {
                    "listen": "127.0.0.1:0",
                    "instances": instances,
                    "policy_file": str(policy),
                    "placement_writer": writer,
                }
            )
            router = loop.run(start_router(config, registry=CollectorRegistry()))
            try:
                if writer:
                    _wait(lambda: _loaded_anywhere(routers, "codegen"), 30, "writer loaded none")
                else:
                    time.sleep(2.0)  # ten placement intervals
                    assert not _loaded_anywhere(routers, "codegen")
            finally:
                loop.run(router.stop(0))
    finally:
        loop.close()
