"""Graceful drain on SIGTERM, on real processes: a router replica, then the sidecar.

    sidecar --routes--> router A (drained first), router B
       |
       +--> Triton t0: codegen and codegen_stream, with max_tokens raised so that one
            request decodes for a few seconds (a copy of triton_models/ in the test's folder)

The router: health flips to NOT_SERVING (a Watch stream sees it, then ends), an open
WatchRoutes stream ends cleanly (OK, not an error), new calls are refused, the process exits 0
well within its grace, and the sidecar goes on routing from replica B.

The sidecar: with a long unary request and a stream in flight, health flips to NOT_SERVING,
new requests are refused, both in-flight calls complete in full, and it exits 0 within grace.
"""

from __future__ import annotations

import queue
import re
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.fleet import wait_for_health
from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import (
    DEFAULT_MODEL_REPOSITORY,
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(240)

GRACE_S = 30.0
LONG_TOKENS = 2500  # a few seconds of decoding on a small CPU
STREAM_TOKENS = 2500
MAX_TOKENS = 8192
POLICY = "placement: {enabled: false}\n"
PROMPT = b"def drain_with_secret_prompt():"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class DrainFleet:
    run_dir: Path
    router_a: ManagedProcess
    router_a_address: str
    router_b_address: str
    sidecar: ManagedProcess
    sidecar_address: str
    sidecar_metrics_url: str


def _slow_repository(target: Path) -> Path:
    """codegen and codegen_stream with max_tokens raised, so a request can run for seconds."""
    for model in ("codegen", "codegen_stream"):
        shutil.copytree(
            DEFAULT_MODEL_REPOSITORY / model,
            target / model,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        config = target / model / "config.pbtxt"
        text = config.read_text()
        raised = re.sub(
            r'key: "max_tokens" value: \{ string_value: "\d+" \}',
            f'key: "max_tokens" value: {{ string_value: "{MAX_TOKENS}" }}',
            text,
        )
        assert raised != text, f"max_tokens not found in {config}"
        config.write_text(raised)
    return target


def _python_part(name: str, argv: list[str], run_dir: Path) -> ManagedProcess:
    process = ManagedProcess(
        ProcessSpec(
            name=name,
            argv=[sys.executable, "-m", "app", *argv],
            log_path=run_dir / f"{name}.log",
        )
    )
    process.start()
    return process


@pytest.fixture(scope="module")
def drain_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DrainFleet]:
    run_dir = tmp_path_factory.mktemp("drain")
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY)
    triton = TritonSpec.on_free_ports(
        "t0",
        model_repository=_slow_repository(run_dir / "models"),
        load_models=("codegen", "codegen_stream"),
        log_path=run_dir / "t0.log",
    )
    instance = f"t0={triton.grpc_address},{triton.metrics_url}"
    router_a_address = f"127.0.0.1:{free_port()}"
    router_b_address = f"127.0.0.1:{free_port()}"
    sidecar_address = f"127.0.0.1:{free_port()}"
    sidecar_metrics = f"127.0.0.1:{free_port()}"
    processes: list[ManagedProcess] = []
    try:
        triton_proc = triton_process(triton, prepare_installation())
        triton_proc.start()
        processes.append(triton_proc)
        routers = []
        for name, address in (("router-a", router_a_address), ("router-b", router_b_address)):
            router = _python_part(
                name,
                ["router", "--listen", address, "--instance", instance, "--policy", str(policy),
                 "--grace", str(GRACE_S)],
                run_dir,
            )  # fmt: skip
            processes.append(router)
            routers.append(router)
        sidecar = _python_part(
            "sidecar",
            ["sidecar", "--listen", sidecar_address,
             "--router", router_a_address, "--router", router_b_address,
             "--cold-start-wait", "0", "--shutdown-grace", str(GRACE_S),
             "--metrics-listen", sidecar_metrics, "--log-level", "DEBUG"],
            run_dir,
        )  # fmt: skip
        processes.append(sidecar)
        wait_until_ready(triton.grpc_address, ["codegen", "codegen_stream"], 90, triton_proc)
        for router, address in zip(routers, (router_a_address, router_b_address), strict=True):
            wait_for_health(address, router)
        wait_until_ready(
            sidecar_address, ["codegen", "codegen_stream"], 60, sidecar, server_ready=True
        )
        yield DrainFleet(
            run_dir=run_dir,
            router_a=routers[0],
            router_a_address=router_a_address,
            router_b_address=router_b_address,
            sidecar=sidecar,
            sidecar_address=sidecar_address,
            sidecar_metrics_url=f"http://{sidecar_metrics}/metrics",
        )
    finally:
        stop_all(processes)


class HealthWatch:
    """A grpc.health.v1 Watch stream read on a thread: every status, and how it ended."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=GRACE_S + 30
        )
        self.statuses: queue.Queue[int] = queue.Queue()
        self.ended_with: grpc.StatusCode | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.statuses.put(response.status)
            self.ended_with = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.ended_with = error.code()
        finally:
            self.ended.set()

    def next_status(self, timeout_s: float = 10.0) -> int:
        return self.statuses.get(timeout=timeout_s)

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


def _codegen_inputs(tokens: int) -> list[grpcclient.InferInput]:
    prompt = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[PROMPT]], dtype=object))
    count = grpcclient.InferInput("MAX_TOKENS", [1, 1], "INT32")
    count.set_data_from_numpy(np.array([[tokens]], dtype=np.int32))
    return [prompt, count]


def _in_flight(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pointsman_sidecar_in_flight_requests{")
    )


def _wait_exit(proc: ManagedProcess, timeout_s: float) -> tuple[int | None, float]:
    started = time.monotonic()
    code = proc.wait(timeout_s)
    return code, time.monotonic() - started


@pytest.mark.triton
def test_router_drain_ends_route_streams_and_sidecar_moves_on(drain_fleet: DrainFleet) -> None:
    health = HealthWatch(drain_fleet.router_a_address)
    assert health.next_status() == SERVING
    with grpc.insecure_channel(drain_fleet.router_a_address) as channel:
        routes = pb_grpc.RouterServiceStub(channel).WatchRoutes(  # type: ignore[no-untyped-call]
            pb.WatchRoutesRequest(client_id="test-drain"), timeout=GRACE_S + 30
        )
        first = next(routes)
        assert first.router_id

        drain_fleet.router_a.send_stop()

        assert health.next_status() == NOT_SERVING
        assert health.ended.wait(10), "health Watch stream still open after NOT_SERVING"
        assert health.ended_with == grpc.StatusCode.OK
        # The route stream ends cleanly, so a sidecar moves to another replica at once.
        rest = list(routes)  # raises if it ended with an error status
        assert all(m.router_id == first.router_id for m in rest)
        code, waited = _wait_exit(drain_fleet.router_a, GRACE_S)
        assert code == 0, drain_fleet.router_a.log_tail()
        # Nothing was left to wait for: the open streams ended, so no wait for the grace.
        assert waited < GRACE_S
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.RouterServiceStub(channel).ListModels(  # type: ignore[no-untyped-call]
                pb.ListModelsRequest(), timeout=3
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    health.close()

    # The sidecar picked up the route stream from replica B and still serves.
    sidecar_log = drain_fleet.run_dir / "sidecar.log"
    deadline = time.monotonic() + 15
    while f"route stream from {drain_fleet.router_b_address}: router" not in (
        sidecar_log.read_text()
    ):
        assert time.monotonic() < deadline, "sidecar did not move to router B"
        time.sleep(0.2)
    client = grpcclient.InferenceServerClient(drain_fleet.sidecar_address)
    try:
        ids = client.infer("codegen", _codegen_inputs(4), client_timeout=30).as_numpy("TOKEN_IDS")
        assert ids is not None and ids.shape == (1, 4)
    finally:
        client.close()


class StreamCollector:
    """One codegen_stream request on its own stream: the tokens and errors that came back."""

    def __init__(self, address: str, tokens: int) -> None:
        self.tokens = tokens
        self.responses = 0
        self.errors: list[str] = []
        self.first = threading.Event()
        self.done = threading.Event()
        self.finished_at = 0.0
        self._client = grpcclient.InferenceServerClient(address)
        self._client.start_stream(callback=self._on_response)
        self._client.async_stream_infer("codegen_stream", _codegen_inputs(tokens))

    def _on_response(self, result: object = None, error: object = None) -> None:
        if error is not None:
            self.errors.append(str(error))
            self.done.set()
            return
        self.responses += 1
        self.first.set()
        if self.responses >= self.tokens:
            self.finished_at = time.monotonic()
            self.done.set()

    def finish(self, timeout_s: float) -> None:
        self.done.wait(timeout_s)
        self._client.stop_stream()  # half-close: the call ends once the server is done
        self._client.close()


@pytest.mark.triton
def test_sidecar_drain_finishes_in_flight_work_and_refuses_new(drain_fleet: DrainFleet) -> None:
    health = HealthWatch(drain_fleet.sidecar_address)
    assert health.next_status() == SERVING
    stream = StreamCollector(drain_fleet.sidecar_address, STREAM_TOKENS)
    assert stream.first.wait(30), f"stream never answered: {stream.errors}"

    long_result: dict[str, object] = {}

    def long_request() -> None:
        client = grpcclient.InferenceServerClient(drain_fleet.sidecar_address)
        try:
            result = client.infer("codegen", _codegen_inputs(LONG_TOKENS), client_timeout=120)
            long_result["ids"] = result.as_numpy("TOKEN_IDS")
            long_result["finished_at"] = time.monotonic()
        except InferenceServerException as error:
            long_result["error"] = error
        finally:
            client.close()

    before = _in_flight(drain_fleet.sidecar_metrics_url)
    unary = threading.Thread(target=long_request, daemon=True)
    unary.start()
    deadline = time.monotonic() + 10
    while _in_flight(drain_fleet.sidecar_metrics_url) <= before:
        assert time.monotonic() < deadline, "the long request never went in flight"
        time.sleep(0.02)

    drain_fleet.sidecar.send_stop()
    stopped_at = time.monotonic()

    assert health.next_status() == NOT_SERVING
    assert health.ended.wait(10)
    # New requests are refused (a request racing the flip may still be taken; it is short).
    refused: InferenceServerException | None = None
    while refused is None and time.monotonic() - stopped_at < 10:
        client = grpcclient.InferenceServerClient(drain_fleet.sidecar_address)
        try:
            client.infer("codegen", _codegen_inputs(1), client_timeout=5)
        except InferenceServerException as error:
            refused = error
        finally:
            client.close()
    assert refused is not None, "the draining sidecar kept taking new requests"
    assert refused.status() == "StatusCode.UNAVAILABLE"

    unary.join(GRACE_S)
    stream.finish(GRACE_S)
    assert "error" not in long_result, long_result.get("error")
    ids = long_result["ids"]
    assert isinstance(ids, np.ndarray) and ids.shape == (1, LONG_TOKENS)
    # It was still running when SIGTERM came, and finished during the drain.
    finished_at = long_result["finished_at"]
    assert isinstance(finished_at, float) and finished_at > stopped_at
    assert stream.errors == []
    assert stream.responses == STREAM_TOKENS
    assert stream.finished_at > stopped_at  # in flight at SIGTERM, completed in the drain
    code, _ = _wait_exit(drain_fleet.sidecar, GRACE_S)
    assert code == 0, drain_fleet.sidecar.log_tail()
    assert time.monotonic() - stopped_at < GRACE_S
    health.close()
    # Even at DEBUG, no request contents reach the logs.
    for log in drain_fleet.run_dir.glob("*.log"):
        if log.name != "t0.log":
            assert PROMPT.decode() not in log.read_text(errors="replace"), log.name


def test_draining_health_ends_watch_streams_after_not_serving() -> None:
    """In-process: Check and Watch see NOT_SERVING, then every Watch stream ends (OK)."""
    from pointsman.drain import DrainingHealthServicer
    from tests.support.loop_thread import LoopThread

    loop = LoopThread()
    health = DrainingHealthServicer()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health.set("svc", SERVING)
        return server, port

    server, port = loop.run(start())
    try:
        watches = [HealthWatch(f"127.0.0.1:{port}") for _ in range(2)]
        for watch in watches:
            assert watch.next_status() == SERVING
        loop.run(health.set("", NOT_SERVING))
        for watch in watches:
            assert watch.next_status() == NOT_SERVING
        loop.run(health.set("", SERVING))
        for watch in watches:
            assert watch.next_status() == SERVING
        assert not any(w.ended.is_set() for w in watches)

        loop.run(health.enter_graceful_shutdown())
        for watch in watches:
            assert watch.next_status() == NOT_SERVING
            assert watch.ended.wait(5)
            assert watch.ended_with == grpc.StatusCode.OK
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "svc"):
                checked = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert checked.status == NOT_SERVING
        # Nothing in flight any more, so the stop does not wait for its grace.
        started = time.monotonic()
        loop.run(server.stop(20))
        assert time.monotonic() - started < 10
        for watch in watches:
            watch.close()
    finally:
        loop.close()
