"""The sidecar against two real Triton servers, with an in-test router serving route tables.

A module fixture starts two tritonservers (codegen v1+v2, codegen_stream, echo on each), a
small RouterService whose WatchRoutes serves tables pointing at them, and the sidecar, all on
one uvloop thread; the tests use stock tritonclient clients from the test thread. Which
instance served a request is read from each Triton's own statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from app.processes import ManagedProcess, free_port, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from pointsman.errors import ConfigError
from pointsman.router.v1 import router_pb2, router_pb2_grpc
from sidecar.balancer import CandidateSet, pick
from sidecar.config import DEFAULT_MAX_MESSAGE_BYTES, SidecarConfig, load_config
from sidecar.head import forward_metadata
from sidecar.main import add_arguments, build_config
from sidecar.routes import RouteCache
from sidecar.server import SidecarServer, start_sidecar
from sidecar.upstream import GrpcUpstream, UpstreamPool
from tests.support.loop_thread import LoopThread

MODELS = ("codegen", "codegen_stream", "echo")
MAX_MESSAGE = 4 * 1024 * 1024
INFER = "/inference.GRPCInferenceService/ModelInfer"


# -- plumbing: one event loop thread for the servers, a small router --


def table(model: str, *candidates: tuple[str, Sequence[str], float]) -> router_pb2.RouteTable:
    return router_pb2.RouteTable(
        model_name=model,
        candidates=[
            router_pb2.RouteCandidate(
                target=router_pb2.Target(
                    instance_id=address, grpc_address=address, ready_versions=list(versions)
                ),
                weight=weight,
            )
            for address, versions, weight in candidates
        ],
        ttl_ms=5000,
    )


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """WatchRoutes: the current snapshot, then whatever is published, heartbeats between.
    PickTarget: a fixed answer per model (per-request pick mode)."""

    def __init__(self, snapshot: list[router_pb2.RouteTable]) -> None:
        self.generation = 1
        self.snapshot = router_pb2.WatchRoutesResponse(
            full_snapshot=True, tables=snapshot, generation=1, router_id="fake-router"
        )
        self.watchers: set[asyncio.Queue[router_pb2.WatchRoutesResponse]] = set()
        self.picks: dict[str, router_pb2.PickTargetResponse] = {}
        self.pick_calls = 0

    async def WatchRoutes(
        self, request: router_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.WatchRoutesResponse]:
        updates: asyncio.Queue[router_pb2.WatchRoutesResponse] = asyncio.Queue()
        self.watchers.add(updates)
        try:
            yield self.snapshot
            while True:
                try:
                    yield await asyncio.wait_for(updates.get(), 0.3)
                except TimeoutError:
                    yield router_pb2.WatchRoutesResponse(
                        generation=self.generation, router_id="fake-router"
                    )
        finally:
            self.watchers.discard(updates)

    async def PickTarget(
        self, request: router_pb2.PickTargetRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PickTargetResponse:
        self.pick_calls += 1
        answer = self.picks.get(request.model_name)
        if answer is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"router: no model {request.model_name}")
            raise AssertionError("unreachable: abort raises")
        return answer

    def publish(
        self,
        tables: Sequence[router_pb2.RouteTable] = (),
        *,
        full: bool = False,
        removed: Sequence[str] = (),
    ) -> int:
        self.generation += 1
        message = router_pb2.WatchRoutesResponse(
            full_snapshot=full,
            tables=tables,
            removed_models=removed,
            generation=self.generation,
            router_id="fake-router",
        )
        if full:
            self.snapshot = message
        for watcher in self.watchers:
            watcher.put_nowait(message)
        return self.generation


async def serve_router(router: FakeRouter, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(router, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@dataclass
class Fleet:
    loop: LoopThread
    a: TritonSpec
    b: TritonSpec
    router: FakeRouter
    router_port: int
    router_server: grpc.aio.Server
    sidecar: SidecarServer
    probe: ProbeTriton

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sidecar.port}"

    def snapshot_tables(self) -> list[router_pb2.RouteTable]:
        both = [(self.a.grpc_address, ["1", "2"], 1.0), (self.b.grpc_address, ["1", "2"], 1.0)]
        return [
            table("codegen", *both),
            table(
                "codegen_stream",
                (self.a.grpc_address, ["1"], 1.0),
                (self.b.grpc_address, ["1"], 1.0),
            ),
            table("echo", (self.a.grpc_address, ["1"], 1.0), (self.b.grpc_address, ["1"], 1.0)),
            table("ghost"),  # known to the fleet, nowhere ready
        ]

    def wait_generation(self, generation: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sidecar.cache.generation < generation:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sidecar did not reach generation {generation}")
            time.sleep(0.02)

    def restore(self) -> None:
        self.wait_generation(self.router.publish(self.snapshot_tables(), full=True))


class ProbeTriton:
    """A stand-in Triton that records what reaches it (metadata, deadline) for the `probe` model."""

    def __init__(self) -> None:
        self.seen: queue.Queue[tuple[dict[str, Any], float | None]] = queue.Queue()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = {k: v for k, v in context.invocation_metadata()}
            self.seen.put((metadata, context.time_remaining()))
            if "x-probe-sleep" in metadata:  # to let a caller's deadline pass
                await asyncio.sleep(float(metadata["x-probe-sleep"]))
            answer: bytes = pb.ModelInferResponse(
                model_name="probe", id="probed"
            ).SerializeToString()
            return answer

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "inference.GRPCInferenceService",
                    {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
                ),
            )
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)


@pytest.fixture(scope="module")
def tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonSpec, TritonSpec]]:
    installation = prepare_installation()
    logs = tmp_path_factory.mktemp("tritons")
    specs = [
        TritonSpec.on_free_ports(name, load_models=MODELS, log_path=logs / f"{name}.log")
        for name in ("triton-a", "triton-b")
    ]
    processes: list[ManagedProcess] = [triton_process(s, installation) for s in specs]
    try:
        for process in processes:
            process.start()
        for spec, process in zip(specs, processes, strict=True):
            wait_until_ready(spec.grpc_address, MODELS, 90, process)
        yield specs[0], specs[1]
    finally:
        stop_all(processes, grace_s=8)


@pytest.fixture(scope="module")
def fleet(tritons: tuple[TritonSpec, TritonSpec]) -> Iterator[Fleet]:
    loop = LoopThread()
    router = FakeRouter([])
    router_port = free_port()
    probe = ProbeTriton()
    loop.run(probe.start())
    # The first router address is dead: the sidecar must move on to the next.
    config = SidecarConfig(
        listen="127.0.0.1:0",
        routers=(f"127.0.0.1:{free_port()}", f"127.0.0.1:{router_port}"),
        max_message_bytes=MAX_MESSAGE,
        # The stand-in router places nothing: the cold path is off here.
        cold_start_wait_s=0,
        static_routes={"probe": (f"127.0.0.1:{probe.port}",)},
        reconnect_initial_s=0.05,
        reconnect_max_s=0.3,
        router_idle_timeout_s=3.0,
    )
    router_server = loop.run(serve_router(router, router_port))
    sidecar = loop.run(start_sidecar(config, rng=random.Random(7)))
    fleet = Fleet(loop, tritons[0], tritons[1], router, router_port, router_server, sidecar, probe)
    try:
        fleet.restore()
        yield fleet
    finally:
        loop.run(sidecar.stop(0))
        loop.run(fleet.router_server.stop(0))
        loop.run(probe.stop())
        loop.close()


# -- helpers --


def client(address: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(address)


def codegen_inputs(prompt: str, max_tokens: int = 8) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    tokens = grpcclient.InferInput("MAX_TOKENS", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [text, tokens]


def echo_inputs(values: np.ndarray[Any, Any]) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    return [tensor]


def successes(address: str, model: str) -> int:
    """Requests the Triton at `address` has answered successfully for `model`, all versions."""
    with client(address) as c:
        stats = c.get_inference_statistics(model_name=model, as_json=True)
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats["model_stats"])


def codes_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except InferenceServerException as error:
        status = error.status()
        return getattr(grpc.StatusCode, status.split(".")[-1]), error.message()
    except grpc.RpcError as error:
        return error.code(), error.details()
    raise AssertionError("the call succeeded")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what or "condition not met")
        time.sleep(0.02)


# -- unit tests: balancing, metadata, config --


def _upstreams(*loads: int) -> list[GrpcUpstream]:
    ups = []
    for k, load in enumerate(loads):
        upstream = GrpcUpstream(f"10.0.0.{k}:8001", ())
        upstream.in_flight = load
        ups.append(upstream)
    return ups


@pytest.mark.parametrize(
    ("name", "loads", "weights", "expected_share"),
    [
        ("single candidate", [5], [1.0], [1.0]),
        ("idle, equal weights: even split", [0, 0], [1.0, 1.0], [0.5, 0.5]),
        ("idle, weights 3:1: split by weight", [0, 0], [0.75, 0.25], [0.75, 0.25]),
        ("one busy of two: the idle one always", [4, 0], [1.0, 1.0], [0.0, 1.0]),
        ("in-flight per weight decides: 4/1.0 vs 1/0.2", [4, 1], [1.0, 0.2], [1.0, 0.0]),
        ("unset weights (0) count as 1", [0, 0], [0.0, 0.0], [0.5, 0.5]),
        ("three, one busy: it only wins no pair", [0, 0, 9], [1.0, 1.0, 1.0], [0.5, 0.5, 0.0]),
    ],
)
def test_pick_power_of_two_choices(
    name: str, loads: list[int], weights: list[float], expected_share: list[float]
) -> None:
    ups = _upstreams(*loads)
    candidates = CandidateSet(ups, weights)
    rng = random.Random(11)
    rounds = 4000
    counts = {u.address: 0 for u in ups}
    for _ in range(rounds):
        counts[pick(candidates, rng).address] += 1
    for upstream, share in zip(ups, expected_share, strict=True):
        assert counts[upstream.address] / rounds == pytest.approx(share, abs=0.03), name


def test_pick_is_deterministic_with_a_seeded_rng() -> None:
    candidates = CandidateSet(_upstreams(0, 0, 0), [1, 2, 3])
    runs = []
    for _ in range(2):
        rng = random.Random(5)
        runs.append([pick(candidates, rng).address for _ in range(50)])
    assert runs[0] == runs[1] and len(set(runs[0])) == 3


def test_forward_metadata_drops_hop_by_hop_and_reserved_keys() -> None:
    metadata = (
        ("user-agent", "grpc-python/1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        (":authority", "x"),
        ("grpc-timeout", "1S"),
        ("grpc-accept-encoding", "gzip"),
        ("traceparent", "00-abc-def-01"),
        ("x-priority", "1"),
        ("x-request-id", "r1"),
        ("blob-bin", b"\x00\x01"),
    )
    assert forward_metadata(metadata) == (
        ("traceparent", "00-abc-def-01"),
        ("x-priority", "1"),
        ("x-request-id", "r1"),
        ("blob-bin", b"\x00\x01"),
    )
    assert forward_metadata(()) == ()
    assert forward_metadata(None) == ()


def test_route_cache_snapshot_update_remove_heartbeat() -> None:
    pool = UpstreamPool(max_message_bytes=1024, idle_close_s=60)
    cache = RouteCache(pool, static_routes={"static": ["10.9.9.9:8001"]})
    assert cache.ready  # static routes count from the start
    assert cache.missing("m").__class__.__name__ == "NoRouteTablesError"
    snapshot = router_pb2.WatchRoutesResponse(
        full_snapshot=True,
        tables=[
            table("m", ("10.0.0.1:8001", ["1"], 1.0), ("10.0.0.2:8001", ["1", "2"], 1.0)),
            table("static", ("10.0.0.3:8001", ["1"], 1.0)),
        ],
        generation=3,
    )
    cache.apply(snapshot)
    assert cache.has_router_tables and cache.ready
    route = cache.routes["m"]
    assert {u.address for u in route.by_version[""].upstreams} == {"10.0.0.1:8001", "10.0.0.2:8001"}
    assert [u.address for u in route.by_version["2"].upstreams] == ["10.0.0.2:8001"]
    assert route.candidates("3") is None
    # The router's table wins over the static list for the same model.
    assert [u.address for u in cache.routes["static"].by_version[""].upstreams] == ["10.0.0.3:8001"]
    assert cache.missing("nope").__class__.__name__ == "ModelNotFoundError"
    # A heartbeat changes nothing but the generation.
    before = cache.routes
    cache.apply(router_pb2.WatchRoutesResponse(generation=4))
    assert cache.routes is before and cache.generation == 4
    # An incremental update: one table changed, one model removed.
    cache.apply(
        router_pb2.WatchRoutesResponse(
            tables=[table("n", ("10.0.0.4:8001", ["1"], 1.0))], removed_models=["m"], generation=5
        )
    )
    assert set(cache.routes) == {"n", "static"}
    # Instances no table names any more start ageing towards having their channels closed.
    assert pool.unreferenced_since("10.0.0.1:8001") is not None
    assert pool.unreferenced_since("10.0.0.4:8001") is None
    # A new full snapshot replaces everything: the static list shows through again.
    cache.apply(router_pb2.WatchRoutesResponse(full_snapshot=True, generation=6))
    assert set(cache.routes) == {"static"}
    assert [u.address for u in cache.routes["static"].by_version[""].upstreams] == ["10.9.9.9:8001"]


def test_upstream_pool_reaps_unreferenced_idle_channels() -> None:
    now = [100.0]
    pool = UpstreamPool(max_message_bytes=1024, idle_close_s=10, clock=lambda: now[0])
    kept = pool.get("10.0.0.1:8001")
    gone = pool.get("10.0.0.2:8001")
    busy = pool.get("10.0.0.3:8001")
    pool.retain(["10.0.0.1:8001"])
    busy.in_flight = 1
    now[0] += 11
    assert asyncio.run(pool.reap()) == ["10.0.0.2:8001"]
    assert "10.0.0.2:8001" not in pool and "10.0.0.1:8001" in pool and "10.0.0.3:8001" in pool
    assert pool.unreferenced_since(kept.address) is None and gone is not pool.get("10.0.0.2:8001")


def test_config_defaults_yaml_and_flag_overrides(tmp_path: Path) -> None:
    assert SidecarConfig().max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert SidecarConfig().listen == "127.0.0.1:8001"
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "listen: 127.0.0.1:9001\nrouters: [r1:50051, r2:50051]\npick_mode: per-request\n"
        "max_message_bytes: 1048576\nstatic_routes:\n  echo: [t1:8001]\n"
    )
    config = load_config(path)
    assert config.routers == ("r1:50051", "r2:50051")
    assert config.static_routes["echo"] == ("t1:8001",)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--config", str(path), "--router", "r3:1", "--router", "r4:1"),
            *("--max-message-bytes", "7", "--cpus", "0"),
        ]
    )
    merged = build_config(args)
    assert merged.routers == ("r3:1", "r4:1")
    assert merged.max_message_bytes == 7 and merged.cpus == (0,)
    assert merged.listen == "127.0.0.1:9001" and merged.pick_mode == "per-request"
    with pytest.raises(Exception):  # noqa: B017 - frozen
        merged.listen = "x:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("max_message_bytes: -1\n", "max_message_bytes"),
        ("max_message_bytes: lots\n", "max_message_bytes"),
        ("pick_mode: sometimes\n", "pick_mode"),
        ("pick_mode: per-request\n", "pick_mode"),  # needs routers
        ("listen: nowhere\n", "listen"),
        ("routers: [ok:1, bad]\n", "routers"),
        ("routers: 5\n", "routers"),
        ("static_routes: {echo: []}\n", "static_routes"),
        ("static_routes: {echo: [nohost]}\n", "static_routes.echo"),
        ("reconnect_max_s: 0\n", "reconnect_max_s"),
        ("cpus: [-1]\n", "cpus"),
        ("cpus: one\n", "cpus"),
        ("colour: blue\n", "colour"),
        ("[1, 2]\n", "mapping"),
        ("listen: [unclosed\n", "YAML"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field):
        load_config(path)


# -- against the real fleet --


@pytest.mark.triton
def test_sync_client_gets_what_triton_gives(fleet: Fleet) -> None:
    with client(fleet.address) as via, client(fleet.a.grpc_address) as direct:
        for prompt in ("def add(a, b):", "class Tree:"):
            got = via.infer("codegen", codegen_inputs(prompt))
            want = direct.infer("codegen", codegen_inputs(prompt))
            assert got.as_numpy("TEXT").tolist() == want.as_numpy("TEXT").tolist()
            assert np.array_equal(got.as_numpy("TOKEN_IDS"), want.as_numpy("TOKEN_IDS"))
            assert got.get_response().model_name == "codegen"
        values = np.linspace(-1, 1, 1000, dtype=np.float32)
        got = via.infer("echo", echo_inputs(values), request_id="req-7")
        assert np.array_equal(got.as_numpy("OUTPUT0"), values)
        assert got.get_response().id == "req-7"
        # A big tensor (3 MiB each way) within the 4 MiB limit.
        big = np.arange(3 * 1024 * 1024 // 4, dtype=np.float32)
        assert np.array_equal(via.infer("echo", echo_inputs(big)).as_numpy("OUTPUT0"), big)


@pytest.mark.triton
def test_aio_client_gets_what_triton_gives(fleet: Fleet) -> None:
    async def run() -> None:
        via = aioclient.InferenceServerClient(fleet.address)
        direct = aioclient.InferenceServerClient(fleet.b.grpc_address)
        try:
            prompts = [f"def f{k}(x):" for k in range(6)]
            got = await asyncio.gather(*(via.infer("codegen", codegen_inputs(p)) for p in prompts))
            for prompt, result in zip(prompts, got, strict=True):
                want = await direct.infer("codegen", codegen_inputs(prompt))
                assert result.as_numpy("TEXT").tolist() == want.as_numpy("TEXT").tolist()
            assert await via.is_server_live() and await via.is_server_ready()
            assert await via.is_model_ready("codegen") and await via.is_model_ready("echo", "1")
            assert not await via.is_model_ready("nope")
            assert not await via.is_model_ready("codegen", "9")
            metadata = await via.get_model_metadata("codegen", "2")
            assert metadata.name == "codegen" and list(metadata.versions) == ["2"]
            config = await via.get_model_config("codegen")
            assert config.config.max_batch_size == 8
        finally:
            await via.close()
            await direct.close()

    asyncio.run(run())


def _stream(
    address: str, prompt: str, max_tokens: int, model_version: str = ""
) -> list[tuple[int, str]]:
    """Every (TOKEN_ID, TEXT) of one streamed generation, with the sync streaming client."""
    responses: queue.Queue[Any] = queue.Queue()
    with client(address) as c:
        c.start_stream(callback=lambda result, error: responses.put(error or result))
        c.async_stream_infer(
            "codegen_stream",
            codegen_inputs(prompt, max_tokens),
            model_version=model_version,
            enable_empty_final_response=True,
        )
        tokens: list[tuple[int, str]] = []
        while True:
            item = responses.get(timeout=20)
            if isinstance(item, Exception):
                raise item
            response = item.get_response()
            if response.outputs:
                tokens.append(
                    (
                        int(item.as_numpy("TOKEN_ID").reshape(-1)[0]),
                        item.as_numpy("TEXT").reshape(-1)[0].decode(),
                    )
                )
            if response.parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
    return tokens


@pytest.mark.triton
def test_streaming_client_gets_what_triton_gives(fleet: Fleet) -> None:
    via = _stream(fleet.address, "def stream():", 12)
    direct = _stream(fleet.a.grpc_address, "def stream():", 12)
    assert len(via) == 12 and via == direct


@pytest.mark.triton
def test_aio_streaming_half_close_cancel_and_errors(fleet: Fleet) -> None:
    async def run() -> None:
        via = aioclient.InferenceServerClient(fleet.address)
        try:
            # The caller half-closes right after its request: Triton still sends every token,
            # then ends the stream, and so does the sidecar.
            async def one_request() -> AsyncIterator[dict[str, Any]]:
                yield {"model_name": "codegen_stream", "inputs": codegen_inputs("half", 5)}

            results = [(r, e) async for r, e in via.stream_infer(one_request())]
            assert [e for _, e in results] == [None] * 5

            # Bad first messages end the stream with the same statuses as unary calls.
            async with grpc.aio.insecure_channel(fleet.address) as channel:
                stream = channel.stream_stream(
                    "/inference.GRPCInferenceService/ModelStreamInfer",
                    request_serializer=None,
                    response_deserializer=None,
                )
                unknown = pb.ModelInferRequest(model_name="nope").SerializeToString()
                for first, code in (
                    (b"\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),
                    (unknown, grpc.StatusCode.NOT_FOUND),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        async for _ in stream(iter([first]), timeout=10):
                            pass
                    assert caught.value.code() == code

            async def requests() -> AsyncIterator[dict[str, Any]]:
                yield {"model_name": "codegen_stream", "inputs": codegen_inputs("x", 200)}
                await asyncio.sleep(30)  # keep our side open: the cancel ends the stream

            responses = via.stream_infer(requests())
            seen = 0
            async for _, error in responses:
                assert error is None, error
                seen += 1
                if seen == 3:
                    responses.cancel()  # mid-generation, with our side still open
                    break
        finally:
            await via.close()

    asyncio.run(run())
    pool = fleet.sidecar.pool
    wait_for(
        lambda: all(pool.get(s.grpc_address).in_flight == 0 for s in (fleet.a, fleet.b)),
        what="the cancelled stream still counts as in flight",
    )
    assert _stream(fleet.address, "after cancel", 3)  # and the sidecar still streams


@pytest.mark.triton
def test_version_pinning(fleet: Fleet) -> None:
    with client(fleet.address) as via, client(fleet.a.grpc_address) as direct:
        for version in ("1", "2"):
            got = via.infer("codegen", codegen_inputs("pin"), model_version=version)
            want = direct.infer("codegen", codegen_inputs("pin"), model_version=version)
            assert got.get_response().model_version == version
            assert np.array_equal(got.as_numpy("TOKEN_IDS"), want.as_numpy("TOKEN_IDS"))
        v1 = via.infer("codegen", codegen_inputs("pin"), model_version="1").as_numpy("TOKEN_IDS")
        v2 = via.infer("codegen", codegen_inputs("pin"), model_version="2").as_numpy("TOKEN_IDS")
        assert not np.array_equal(v1, v2)  # the versions really differ
    # Only B has version 2 ready: pinned requests go there, unpinned ones anywhere.
    generation = fleet.router.publish(
        [
            table(
                "codegen",
                (fleet.a.grpc_address, ["1"], 1.0),
                (fleet.b.grpc_address, ["1", "2"], 1.0),
            )
        ]
    )
    fleet.wait_generation(generation)
    try:
        before_a = successes(fleet.a.grpc_address, "codegen")
        before_b = successes(fleet.b.grpc_address, "codegen")
        with client(fleet.address) as via:
            for _ in range(6):
                via.infer("codegen", codegen_inputs("v2 only"), model_version="2")
            code, message = codes_of(
                lambda: via.infer("codegen", codegen_inputs("x"), model_version="3")
            )
        assert successes(fleet.a.grpc_address, "codegen") == before_a
        assert successes(fleet.b.grpc_address, "codegen") == before_b + 6
        assert code == grpc.StatusCode.UNAVAILABLE and "codegen" in message and "'3'" in message
    finally:
        fleet.restore()


@pytest.mark.triton
def test_error_statuses_and_the_sidecar_keeps_serving(fleet: Fleet) -> None:
    values = np.ones(4, dtype=np.float32)
    with client(fleet.address) as via:
        code, message = codes_of(lambda: via.infer("nope", echo_inputs(values)))
        assert code == grpc.StatusCode.NOT_FOUND
        assert "not known to any Triton instance in the fleet" in message
        code, message = codes_of(lambda: via.infer("ghost", echo_inputs(values)))
        assert code == grpc.StatusCode.UNAVAILABLE and "ghost" in message
        too_big = np.zeros(MAX_MESSAGE // 4 + 1024, dtype=np.float32)
        code, _ = codes_of(lambda: via.infer("echo", echo_inputs(too_big)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, message = codes_of(lambda: via.load_model("echo"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "router" in message
        code, _ = codes_of(lambda: via.unload_model("echo"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        code, message = codes_of(lambda: via.get_system_shared_memory_status())
        assert code == grpc.StatusCode.UNIMPLEMENTED and "shared memory" in message
        code, _ = codes_of(lambda: via.get_cuda_shared_memory_status())
        assert code == grpc.StatusCode.UNIMPLEMENTED
        code, message = codes_of(lambda: via.get_trace_settings())
        assert code == grpc.StatusCode.UNIMPLEMENTED and "directly" in message
        code, _ = codes_of(lambda: via.get_log_settings())
        assert code == grpc.StatusCode.UNIMPLEMENTED

    with grpc.insecure_channel(fleet.address) as channel:
        raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        # An instance slower than the caller's deadline: DEADLINE_EXCEEDED.
        slow = pb.ModelInferRequest(model_name="probe").SerializeToString()
        code, _ = codes_of(lambda: raw(slow, timeout=0.05, metadata=(("x-probe-sleep", "0.3"),)))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        fleet.probe.seen.get(timeout=5)
        for malformed in (b"\xff\xff\xff", b"\x0a\x10short", b"", b"\x12\x011"):
            code, message = codes_of(lambda m=malformed: raw(m, timeout=5))  # type: ignore[misc]
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (malformed, message)

    with client(fleet.address) as via:
        # After all of that, still serving.
        assert np.array_equal(via.infer("echo", echo_inputs(values)).as_numpy("OUTPUT0"), values)


@pytest.mark.triton
def test_upstream_errors_pass_through(fleet: Fleet) -> None:
    wrong = grpcclient.InferInput("INPUT0", [4], "INT32")
    wrong.set_data_from_numpy(np.arange(4, dtype=np.int32))
    missing = grpcclient.InferInput("NOT_AN_INPUT", [4], "FP32")
    missing.set_data_from_numpy(np.arange(4, dtype=np.float32))
    with client(fleet.address) as via, client(fleet.a.grpc_address) as direct:
        for inputs in ([wrong], [missing]):
            got = codes_of(lambda i=inputs: via.infer("echo", i))  # type: ignore[misc]
            want = codes_of(lambda i=inputs: direct.infer("echo", i))  # type: ignore[misc]
            assert got == want and got[0] == grpc.StatusCode.INVALID_ARGUMENT
        # Unary ModelInfer on a decoupled model: Triton's UNIMPLEMENTED, as it is.
        got = codes_of(lambda: via.infer("codegen_stream", codegen_inputs("x")))
        want = codes_of(lambda: direct.infer("codegen_stream", codegen_inputs("x")))
        assert got == want and got[0] == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.triton
def test_requests_spread_over_both_instances(fleet: Fleet) -> None:
    before = {s.grpc_address: successes(s.grpc_address, "codegen") for s in (fleet.a, fleet.b)}

    async def burst() -> None:
        via = aioclient.InferenceServerClient(fleet.address)
        try:
            await asyncio.gather(
                *(via.infer("codegen", codegen_inputs(f"p{k}", 16)) for k in range(24))
            )
        finally:
            await via.close()

    asyncio.run(burst())
    served = {a: successes(a, "codegen") - n for a, n in before.items()}
    assert sum(served.values()) == 24
    # In-flight balancing keeps a concurrent burst close to even.
    assert min(served.values()) >= 6, served


@pytest.mark.triton
def test_route_update_takes_effect(fleet: Fleet) -> None:
    values = np.ones(8, dtype=np.float32)
    generation = fleet.router.publish(
        [table("echo", (fleet.b.grpc_address, ["1"], 1.0)), *fleet.snapshot_tables()[:2]],
        full=True,
    )
    fleet.wait_generation(generation)
    try:
        before_a = successes(fleet.a.grpc_address, "echo")
        before_b = successes(fleet.b.grpc_address, "echo")
        with client(fleet.address) as via:
            for _ in range(10):
                via.infer("echo", echo_inputs(values))
            # The full snapshot dropped "ghost": now it is unknown.
            code, _ = codes_of(lambda: via.infer("ghost", echo_inputs(values)))
            assert code == grpc.StatusCode.NOT_FOUND
            # A removal, then the table back again.
            fleet.wait_generation(fleet.router.publish(removed=["echo"]))
            code, _ = codes_of(lambda: via.infer("echo", echo_inputs(values)))
            assert code == grpc.StatusCode.NOT_FOUND
        assert successes(fleet.a.grpc_address, "echo") == before_a
        assert successes(fleet.b.grpc_address, "echo") == before_b + 10
    finally:
        fleet.restore()
    with client(fleet.address) as via:
        via.infer("echo", echo_inputs(values))


@pytest.mark.triton
def test_router_away_keeps_last_tables_then_reconnects(fleet: Fleet) -> None:
    values = np.ones(4, dtype=np.float32)
    fleet.loop.run(fleet.router_server.stop(0))
    wait_for(lambda: not fleet.sidecar.cache.connected, what="sidecar still connected")
    assert fleet.sidecar.cache.stale
    with client(fleet.address) as via:  # stale tables still route
        assert np.array_equal(via.infer("echo", echo_inputs(values)).as_numpy("OUTPUT0"), values)
        assert via.is_server_ready()
    # The router comes back (a restart: same address, new state) and is found again.
    fleet.router_server = fleet.loop.run(serve_router(fleet.router, fleet.router_port))
    fleet.restore()
    wait_for(lambda: fleet.sidecar.cache.connected, what="sidecar did not reconnect")
    assert not fleet.sidecar.cache.stale


@pytest.mark.triton
def test_metadata_and_deadline_reach_triton(fleet: Fleet) -> None:
    request = pb.ModelInferRequest(model_name="probe").SerializeToString()
    options = [("grpc.primary_user_agent", "probe-client/9")]
    with grpc.insecure_channel(fleet.address, options=options) as channel:
        raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        answer = raw(
            request,
            timeout=5.0,
            metadata=(
                ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                ("x-priority", "1"),
                ("x-request-id", "abc-123"),
                ("trace-bin", b"\x00\x01\x02"),
            ),
        )
    assert pb.ModelInferResponse.FromString(answer).id == "probed"
    metadata, remaining = fleet.probe.seen.get(timeout=5)
    assert metadata["traceparent"].startswith("00-4bf92f35")
    assert metadata["x-priority"] == "1" and metadata["x-request-id"] == "abc-123"
    assert metadata["trace-bin"] == b"\x00\x01\x02"
    assert "probe-client" not in metadata.get("user-agent", "")
    # Less than the caller gave (grpc-timeout rounds up a little on the wire, hence 5.05).
    assert remaining is not None and 3.0 < remaining <= 5.05


@pytest.mark.triton
def test_fleet_wide_answers(fleet: Fleet) -> None:
    with client(fleet.address) as via:
        assert via.is_server_live() and via.is_server_ready()
        metadata = via.get_server_metadata()
        assert metadata.name == "pointsman-sidecar" and metadata.version
        assert "model_configuration" in metadata.extensions
        index = via.get_model_repository_index()
        entries = {(m.name, m.version, m.state) for m in index.models}
        assert ("codegen", "1", "READY") in entries and ("codegen", "2", "READY") in entries
        assert ("echo", "1", "READY") in entries
        assert len(index.models) == len({(m.name, m.version) for m in index.models})
        everything = via.get_inference_statistics()
        names = [s.name for s in everything.model_stats]
        assert names.count("echo") == 2  # one entry from each instance, concatenated
        one = via.get_inference_statistics("echo")
        assert [s.name for s in one.model_stats] == ["echo"]
    with grpc.insecure_channel(fleet.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.triton
def test_no_route_tables_yet_and_per_request_picks(fleet: Fleet) -> None:
    values = np.ones(4, dtype=np.float32)
    dead_router = f"127.0.0.1:{free_port()}"
    # A sidecar that never reaches its router: UNAVAILABLE "no route tables yet", not ready.
    lonely = fleet.loop.run(
        start_sidecar(SidecarConfig(listen="127.0.0.1:0", routers=(dead_router,)))
    )
    try:
        with client(f"127.0.0.1:{lonely.port}") as via:
            code, message = codes_of(lambda: via.infer("echo", echo_inputs(values)))
            assert code == grpc.StatusCode.UNAVAILABLE and "no route tables yet" in message
            assert via.is_server_live() and not via.is_server_ready()
            code, _ = codes_of(lambda: via.get_model_repository_index())
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        fleet.loop.run(lonely.stop(0))

    # Per-request mode: the router's PickTarget decides; a dead target falls back.
    fleet.router.picks["echo"] = router_pb2.PickTargetResponse(
        target=router_pb2.Target(grpc_address=dead_router, ready_versions=["1"]),
        fallbacks=[router_pb2.Target(grpc_address=fleet.b.grpc_address, ready_versions=["1"])],
    )
    config = SidecarConfig(
        listen="127.0.0.1:0",
        routers=(f"127.0.0.1:{fleet.router_port}",),
        pick_mode="per-request",
        # Generous: on a busy machine a slow pick must not become a table pick.
        pick_timeout_s=5.0,
    )
    picky = fleet.loop.run(start_sidecar(config, rng=random.Random(3)))
    try:
        wait_for(lambda: picky.cache.has_router_tables, what="no tables")
        before_a = successes(fleet.a.grpc_address, "echo")
        before_b = successes(fleet.b.grpc_address, "echo")
        calls = fleet.router.pick_calls
        with client(f"127.0.0.1:{picky.port}") as via:
            for _ in range(5):
                via.infer("echo", echo_inputs(values))
            code, message = codes_of(lambda: via.infer("codegen", codegen_inputs("x")))
            assert code == grpc.StatusCode.NOT_FOUND and "router: no model codegen" in message
        assert fleet.router.pick_calls == calls + 6
        assert successes(fleet.a.grpc_address, "echo") == before_a
        assert successes(fleet.b.grpc_address, "echo") == before_b + 5
    finally:
        fleet.loop.run(picky.stop(0))
        fleet.router.picks.clear()


@pytest.mark.triton
def test_command_exits_zero_on_sigterm(fleet: Fleet, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"static_routes:\n  echo: [{fleet.a.grpc_address}]\n")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_ready(f"127.0.0.1:{port}", ["echo"], 30)
        with client(f"127.0.0.1:{port}") as via:
            values = np.ones(2, dtype=np.float32)
            assert np.array_equal(
                via.infer("echo", echo_inputs(values)).as_numpy("OUTPUT0"), values
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
    assert "stopping" in output, output
