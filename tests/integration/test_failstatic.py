"""Fail-static: stale route tables lose the router's weights, fallback instances serve any model
before a router has been heard from, and a fresh router holds its routes until it has read the
fleet once. Pure logic in tables; one test against the session fleet's real Tritons."""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from app.fleet import Fleet
from app.processes import free_port
from pointsman.errors import ConfigError
from pointsman.router.v1 import router_pb2, router_pb2_grpc
from router.config import parse_router_config
from router.contracts import FleetSnapshot, InstanceSnapshot
from router.first_view import FirstView, has_first_view
from sidecar.balancer import pick
from sidecar.config import SidecarConfig, load_config
from sidecar.main import add_arguments, build_config
from sidecar.router_picker import RouterPicker, RouterUnreachableError
from sidecar.routes import RouteCache
from sidecar.server import start_sidecar
from sidecar.upstream import UpstreamPool
from tests.support.loop_thread import LoopThread


def _table(model: str, *candidates: tuple[str, float]) -> router_pb2.RouteTable:
    return router_pb2.RouteTable(
        model_name=model,
        candidates=[
            router_pb2.RouteCandidate(
                target=router_pb2.Target(
                    instance_id=address, grpc_address=address, ready_versions=["1"]
                ),
                weight=weight,
            )
            for address, weight in candidates
        ],
    )


def _snapshot(
    *tables: router_pb2.RouteTable, generation: int = 1
) -> router_pb2.WatchRoutesResponse:
    return router_pb2.WatchRoutesResponse(
        full_snapshot=True, tables=tables, generation=generation, router_id="r1"
    )


def _pool() -> UpstreamPool:
    return UpstreamPool(max_message_bytes=1024, idle_close_s=60)


def _weights(cache: RouteCache, model: str) -> dict[str, float]:
    candidates = cache.routes[model].by_version[""]
    return {u.address: w for u, w in zip(candidates.upstreams, candidates.weights, strict=True)}


# -- stale tables ---------------------------------------------------------------------------


def test_stale_tables_drop_the_routers_weights_and_get_them_back() -> None:
    cache = RouteCache(_pool())
    cache.apply(_snapshot(_table("m", ("a:1", 1.0), ("b:1", 0.05))))
    cache.set_connected(True)
    assert not cache.stale
    assert _weights(cache, "m") == {"a:1": 1.0, "b:1": 0.05}

    cache.set_connected(False)  # the stream broke
    assert cache.stale and cache.ready
    assert _weights(cache, "m") == {"a:1": 1.0, "b:1": 1.0}
    assert cache.routes["m"].by_version[""].uniform

    # A new router's snapshot arrives (apply, then connected): its weights count again.
    cache.apply(_snapshot(_table("m", ("a:1", 0.5), ("b:1", 1.0)), generation=7))
    cache.set_connected(True)
    assert _weights(cache, "m") == {"a:1": 0.5, "b:1": 1.0}
    assert cache.generation == 7


def test_stale_picks_balance_by_own_in_flight_counts() -> None:
    """The router said 'a' is twenty times better; while stale, the less busy one wins."""
    cache = RouteCache(_pool())
    cache.apply(_snapshot(_table("m", ("a:1", 1.0), ("b:1", 0.05))))
    cache.set_connected(False)
    candidates = cache.routes["m"].by_version[""]
    busy, idle = candidates.upstreams
    busy.in_flight = 5
    rng = random.Random(3)
    assert {pick(candidates, rng).address for _ in range(50)} == {idle.address}


def test_stale_tables_keep_version_rules_and_pinned_versions() -> None:
    cache = RouteCache(_pool())
    table = _table("m", ("a:1", 1.0))
    table.candidates[0].target.ready_versions[:] = ["1", "2"]
    cache.apply(_snapshot(table))
    cache.set_connected(False)
    route = cache.routes["m"]
    assert set(route.by_version) == {"", "1", "2"}
    assert route.candidates("3") is None


# -- fallback instances ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expects_router", "static", "model", "expected"),
    [
        pytest.param(True, {}, "anything", {"f:1", "g:1"}, id="no-table-yet"),
        pytest.param(False, {}, "anything", {"f:1", "g:1"}, id="no-router-at-all"),
        pytest.param(True, {"s": ["s:1"]}, "s", {"s:1"}, id="static-route-wins"),
    ],
)
def test_fallback_instances_serve_any_model_before_tables(
    expects_router: bool, static: dict[str, list[str]], model: str, expected: set[str]
) -> None:
    cache = RouteCache(
        _pool(), static_routes=static, fallback_instances=("f:1", "g:1"),
        expects_router=expects_router,
    )  # fmt: skip
    assert cache.using_fallback and cache.ready
    route = cache.routes.get(model)
    assert route is not None
    assert {u.address for u in route.by_version[""].upstreams} == expected
    assert route.candidates("9") is not None  # fallback instances are assumed to serve any
    assert {"f:1", "g:1"} <= cache.addresses()
    assert model not in cache.routes or model in static  # metrics keep unknown names bounded


def test_fallback_ends_with_the_first_router_table() -> None:
    cache = RouteCache(_pool(), fallback_instances=("f:1",))
    cache.apply(_snapshot(_table("m", ("a:1", 1.0))))
    assert not cache.using_fallback
    assert cache.routes.get("other") is None
    assert type(cache.missing("other")).__name__ == "ModelNotFoundError"
    # The router going away leaves stale tables, not the fallback list.
    cache.set_connected(False)
    assert cache.routes.get("other") is None
    assert cache.addresses() == {"a:1"}


def test_without_fallback_nothing_routes_before_tables() -> None:
    cache = RouteCache(_pool())
    assert not cache.ready and cache.routes.get("m") is None
    assert type(cache.missing("m")).__name__ == "NoRouteTablesError"


def test_fallback_instances_config_file_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("routers: [r:1]\nfallback_instances: [t1:8001, t2:8001]\n")
    assert load_config(path).fallback_instances == ("t1:8001", "t2:8001")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--fallback-instance", "t3:8001"])
    assert build_config(args).fallback_instances == ("t3:8001",)
    path.write_text("fallback_instances: [t1:8001, nohost]\n")
    with pytest.raises(ConfigError, match="fallback_instances"):
        load_config(path)
    with pytest.raises(ConfigError, match="fallback_instances"):
        SidecarConfig(fallback_instances=("x:0",))


# -- active-active: one placement writer ------------------------------------------------------


def test_placement_writer_config_and_flag() -> None:
    from router.main import add_arguments as router_arguments
    from router.main import config_from_args

    assert parse_router_config({}).placement_writer
    assert not parse_router_config({"placement_writer": False}).placement_writer
    with pytest.raises(ConfigError, match="placement_writer"):
        parse_router_config({"placement_writer": "no"})
    parser = argparse.ArgumentParser()
    router_arguments(parser)
    assert not config_from_args(parser.parse_args(["--no-placement"])).placement_writer
    assert config_from_args(parser.parse_args([])).placement_writer


# -- a fresh router's first view -------------------------------------------------------------


def _inst(name: str, refreshed_at: float = 0.0, last_error: str = "") -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=name, grpc_address=f"{name}:1", refreshed_at=refreshed_at,
        last_error=last_error,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("instances", "expected"),
    [
        pytest.param((), False, id="none-discovered"),
        pytest.param((_inst("a", 5.0), _inst("b")), False, id="one-not-read"),
        pytest.param((_inst("a", 5.0), _inst("b", 6.0)), True, id="all-read"),
        pytest.param((_inst("a", 5.0), _inst("b", last_error="down")), True, id="one-failed"),
    ],
)
def test_has_first_view(instances: tuple[InstanceSnapshot, ...], expected: bool) -> None:
    assert has_first_view(FleetSnapshot(taken_at=1.0, instances=instances)) is expected


def test_first_view_latches_on_a_read_fleet_or_after_the_limit() -> None:
    now = [100.0]
    current = [FleetSnapshot(taken_at=0.0)]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    view = FirstView(lambda: current[0], limit_s=5.0, clock=clock)
    assert not view.seen
    current[0] = FleetSnapshot(taken_at=0.0, instances=(_inst("a", 1.0),))
    assert view.seen
    current[0] = FleetSnapshot(taken_at=0.0, instances=(_inst("a"),))
    assert view.seen  # latched: a later unhealthy instance does not hold routes again

    empty = FirstView(lambda: FleetSnapshot(taken_at=0.0), limit_s=5.0, clock=clock)
    now[0] += 4.9
    assert not empty.seen
    now[0] += 0.2
    assert empty.seen


# -- on real Tritons --------------------------------------------------------------------------


@pytest.mark.triton
def test_sidecar_started_while_every_router_is_down_serves_from_fallback(fleet: Fleet) -> None:
    """No router answers (nothing listens on its port): the fallback list still serves, and the
    sidecar says it is ready; a model the fallback instance lacks gets Triton's own NOT_FOUND."""
    codegen_holder = next(t for t in fleet.tritons if "codegen" in t.load_models)
    loop = LoopThread()
    try:
        config = SidecarConfig(
            listen="127.0.0.1:0",
            routers=(f"127.0.0.1:{free_port()}",),
            fallback_instances=(codegen_holder.grpc_address,),
            cold_start_wait_s=0,
            reconnect_max_s=0.5,
        )
        sidecar = loop.run(start_sidecar(config))
        try:
            assert sidecar.cache.stale and sidecar.cache.using_fallback
            with grpcclient.InferenceServerClient(sidecar.address) as via:
                assert via.is_server_ready()
                text = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
                text.set_data_from_numpy(np.array([[b"def f():"]], dtype=np.object_))
                result = via.infer("codegen", [text], client_timeout=30)
                assert result.as_numpy("TEXT") is not None
                with pytest.raises(Exception, match="unknown model"):
                    via.infer("no_such_model", [text], client_timeout=30)
        finally:
            loop.run(sidecar.stop(0))
    finally:
        loop.close()


# -- per-request picks while a router replica is down ---------------------------------------


class _AnsweringRouter(router_pb2_grpc.RouterServiceServicer):
    """A live replica that answers every PickTarget with UNAVAILABLE (nothing can serve)."""

    def __init__(self) -> None:
        self.calls = 0

    async def PickTarget(
        self, request: router_pb2.PickTargetRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PickTargetResponse:
        self.calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no ready Triton instance")
        raise AssertionError("unreachable")


@pytest.mark.asyncio
async def test_picker_skips_a_replica_that_is_down_but_not_one_that_answers() -> None:
    now = [0.0]
    live = _AnsweringRouter()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(live, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    dead = f"127.0.0.1:{free_port()}"
    picker = RouterPicker(
        [dead, f"127.0.0.1:{port}"], timeout_s=2.0, skip_unreachable_s=1.0, clock=lambda: now[0]
    )
    asked: list[str] = []
    stub_of = picker._stub

    def counting_stub(address: str) -> router_pb2_grpc.RouterServiceStub:
        asked.append(address)
        return stub_of(address)

    picker._stub = counting_stub  # type: ignore[method-assign]
    try:
        for _ in range(2):
            with pytest.raises(RouterUnreachableError):
                await picker.pick("m", "", {})
        # The dead replica was asked once, then skipped; the live one both times.
        assert asked == [dead, f"127.0.0.1:{port}", f"127.0.0.1:{port}"]
        assert live.calls == 2
        now[0] += 1.5  # the skip ends: the dead one is asked again
        with pytest.raises(RouterUnreachableError):
            await picker.pick("m", "", {})
        assert asked[-2:] == [dead, f"127.0.0.1:{port}"]
    finally:
        await picker.close()
        await server.stop(0)
