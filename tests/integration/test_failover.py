"""Failover and deadlines through the sidecar, on a fleet of its own: three real Tritons, the
router and a sidecar (`app.fleet`). This module kills one of its Tritons, so it never
uses the shared session fleet.

- A hung model (`slow`) on an instance does not stall another model on the same instance.
- A request whose deadline passes while queued in Triton is dropped by Triton's queue timeout
  (the sidecar passes the remaining time), not run.
- A model unloading on one instance (Triton answers NOT_FOUND) is retried on another.
- `kill -9` of one of three Tritons under steady load fails no request, and the dead instance
  leaves the routes.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from app.fleet import Fleet, FleetConfig
from pointsman.router.v1 import router_pb2, router_pb2_grpc
from sidecar.config import SidecarConfig
from sidecar.server import start_sidecar
from tests.support.loop_thread import LoopThread

pytestmark = [pytest.mark.triton, pytest.mark.timeout(240)]

# `codegen` on triton-0 alone, with `slow` (so a hung `slow` and `codegen` share an instance
# and a sidecar channel); `slow` also on triton-2, so the kill catches requests in flight;
# `echo` on all three. The placement never changes.
PLACEMENT = {
    "triton-0": ("echo", "slow", "codegen"),
    "triton-1": ("echo",),
    "triton-2": ("echo", "slow"),
}
SLOW_INSTANCES = ("triton-0", "triton-2")
POLICY = """\
models:
  echo: {min_copies: 3, max_copies: 3}
  slow: {min_copies: 2, max_copies: 2}
  codegen: {min_copies: 1, max_copies: 1}
  codegen_stream: {max_copies: 0}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir: Path = tmp_path_factory.mktemp("failover-fleet")
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY)
    fleet = Fleet(
        FleetConfig(
            instances=3,
            placement=PLACEMENT,
            sidecar_port=0,
            router_port=0,
            run_dir=run_dir,
            policy_file=policy,
            sidecar_args=("--cold-start-wait", "0"),
        )
    )
    with fleet:
        yield fleet


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def echo_inputs(n: int = 4) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [n], "FP32")
    tensor.set_data_from_numpy(np.arange(n, dtype=np.float32))
    return [tensor]


def slow_inputs(sleep_ms: int) -> list[grpcclient.InferInput]:
    values = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    values.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    sleep = grpcclient.InferInput("SLEEP_MS", [1, 1], "INT32")
    sleep.set_data_from_numpy(np.array([[sleep_ms]], dtype=np.int32))
    return [values, sleep]


def codegen_inputs(prompt: str) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    tokens = grpcclient.InferInput("MAX_TOKENS", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    return [tensor, tokens]


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def in_background(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def triton(fleet: Fleet, instance_id: str) -> tuple[str, str]:
    """(grpc address, metrics url) of one of the fleet's Tritons."""
    spec = next(s for s in fleet.tritons if s.instance_id == instance_id)
    return spec.grpc_address, spec.metrics_url


def test_hung_model_does_not_stall_another_model_on_the_same_instance(fleet: Fleet) -> None:
    hang_s = 8.0
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        baseline = [
            timed(lambda: client.infer("codegen", codegen_inputs("warm"))) for _ in range(5)
        ]
        # Four hung calls, two per `slow` instance: one runs, one waits in Triton's queue.
        hung = [
            in_background(
                lambda: grpcclient.InferenceServerClient(fleet.sidecar_address).infer(
                    "slow", slow_inputs(int(hang_s * 1000)), client_timeout=30
                )
            )
            for _ in range(4)
        ]
        time.sleep(0.5)
        # The same instance and the same sidecar channel, another model: not held up.
        during = [
            timed(lambda k=k: client.infer("codegen", codegen_inputs(f"p{k}")))  # type: ignore[misc]
            for k in range(20)
        ]
        during += [timed(lambda: client.infer("echo", echo_inputs())) for _ in range(20)]
        still_hung = sum(thread.is_alive() for thread, _ in hung)
        for thread, errors in hung:
            thread.join(30)
            assert not errors, errors
    print(
        f"codegen latency before the hang: max {max(baseline) * 1000:.0f} ms; "
        f"codegen+echo during it: median {sorted(during)[len(during) // 2] * 1000:.1f} ms, "
        f"max {max(during) * 1000:.0f} ms"
    )
    assert still_hung == 4, "the hung calls ended before the other traffic was measured"
    # Head-of-line blocking would hold a call for seconds (the hang lasts 8 s); this bound
    # is far above normal latency, so it is not a timing target.
    assert max(during) < 2.0, during


def test_deadline_passing_in_the_queue_is_not_run(fleet: Fleet) -> None:
    address, _ = triton(fleet, "triton-0")
    metrics_urls = [triton(fleet, i)[1] for i in SLOW_INSTANCES]

    def counts() -> tuple[float, float]:
        """`slow`'s executions and queue-timeout rejections, over its instances."""
        executed = rejected = 0.0
        for url in metrics_urls:
            samples = scrape(url)
            executed += total(samples, "nv_inference_exec_count_total", model="slow")
            rejected += total(
                samples, "nv_inference_request_failure_total", model="slow", reason="REJECTED"
            )
        return executed, rejected

    def queue_behind_busy_instances(target: str) -> grpc.StatusCode | None:
        """Occupies both `slow` instances for 1.5 s (with two candidates the sidecar sends the
        second call to the idle one), sends a call with a 0.4 s deadline to `target` meanwhile;
        the status that call ended with."""
        busy = []
        for _ in SLOW_INSTANCES:
            busy.append(
                in_background(
                    lambda: grpcclient.InferenceServerClient(fleet.sidecar_address).infer(
                        "slow", slow_inputs(1500)
                    )
                )
            )
            time.sleep(0.15)
        code = None
        with grpcclient.InferenceServerClient(target) as client:
            try:
                client.infer("slow", slow_inputs(0), client_timeout=0.4)
            except InferenceServerException as error:
                code = grpc.StatusCode[str(error.status()).removeprefix("StatusCode.")]
        for thread, errors in busy:
            thread.join(10)
            assert not errors, errors
        return code

    def moved_once_settled(before: tuple[float, float], expected: int) -> tuple[float, float]:
        deadline = time.monotonic() + 5
        while True:
            moved = tuple(a - b for a, b in zip(counts(), before, strict=True))
            if sum(moved) >= expected or time.monotonic() > deadline:
                time.sleep(0.3)  # nothing more may arrive
                return tuple(a - b for a, b in zip(counts(), before, strict=True))  # type: ignore[return-value]
            time.sleep(0.1)

    before = counts()
    assert queue_behind_busy_instances(fleet.sidecar_address) is grpc.StatusCode.DEADLINE_EXCEEDED
    # Only the two busy calls ran; the late one was rejected by the queue timeout that the
    # sidecar passed on (Triton counts those as REJECTED).
    assert moved_once_settled(before, 3) == (2, 1)

    # The same call sent straight to Triton carries no queue timeout: not REJECTED.
    before = counts()
    assert queue_behind_busy_instances(address) is grpc.StatusCode.DEADLINE_EXCEEDED
    executed, rejected = moved_once_settled(before, 2)
    print(f"straight to Triton with a client deadline only: {executed:.0f} executed, "
          f"{rejected:.0f} rejected by a queue timeout")  # fmt: skip
    assert rejected == 0


def test_model_unloading_on_one_instance_is_retried_elsewhere(fleet: Fleet) -> None:
    """Static routes (no router to update them) keep naming the instance where `echo` is
    unloaded: every call sent there gets Triton's NOT_FOUND and is retried elsewhere."""
    echo_addresses = tuple(s.grpc_address for s in fleet.tritons if "echo" in s.load_models)
    unloaded, _ = triton(fleet, "triton-1")
    loop = LoopThread()
    config = SidecarConfig(
        listen="127.0.0.1:0",
        static_routes={"echo": echo_addresses},
        cold_start_wait_s=0,
        retry_budget_min=100,  # this test is about NOT_FOUND, not the budget
    )
    sidecar = loop.run(start_sidecar(config, rng=random.Random(11)))
    registry = sidecar.metrics.registry

    def attempts(code: str, instance: str = unloaded) -> float:
        value = registry.get_sample_value(
            "pointsman_sidecar_upstream_attempts_total", {"instance": instance, "code": code}
        )
        return value or 0.0

    try:
        with grpcclient.InferenceServerClient(unloaded) as direct:
            direct.unload_model("echo")
            try:
                with grpcclient.InferenceServerClient(sidecar.address) as client:
                    for _ in range(20):
                        result = client.infer("echo", echo_inputs(), client_timeout=10)
                        assert result.as_numpy("OUTPUT0").tolist() == [0.0, 1.0, 2.0, 3.0]
                not_found = attempts("NOT_FOUND")
                retries = registry.get_sample_value(
                    "pointsman_sidecar_retries_total", {"model": "echo"}
                )
            finally:
                direct.load_model("echo")  # as the fleet was (the router may do it too)
    finally:
        loop.run(sidecar.stop(0))
        loop.close()
    print(f"20 calls, {not_found:.0f} answered NOT_FOUND by the unloading instance, retried")
    assert not_found >= 1
    assert retries == not_found


def python_stubs_of(server_pid: int) -> list[int]:
    """Pids of the Python backend stubs that the Triton server `server_pid` started (a stub's
    argv names its server's pid after the two shared-memory sizes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        stub = argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 5
        if stub and argv[5] == str(server_pid).encode():
            pids.append(int(entry.name))
    return pids


def test_kill_9_under_load_fails_no_request(fleet: Fleet) -> None:
    dead_address, _ = triton(fleet, "triton-2")
    dead = next(p for p in fleet.processes if p.name == "triton-2")
    assert dead.pid is not None
    # A server killed with -9 cannot stop its model stubs; the test stops them itself.
    stubs = python_stubs_of(dead.pid)
    assert stubs, "no Python backend stub found for triton-2"
    stop = threading.Event()
    failures: list[str] = []
    sent = [0]
    lock = threading.Lock()

    def load(model: str, inputs: Callable[[], list[grpcclient.InferInput]]) -> None:
        with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
            while not stop.is_set():
                try:
                    client.infer(model, inputs(), client_timeout=10)
                except InferenceServerException as error:
                    with lock:
                        failures.append(f"{model}: {error.status()}: {error.message()}")
                with lock:
                    sent[0] += 1
                time.sleep(0.04)

    before = scrape(fleet.sidecar_metrics_url)
    # About 25 echo calls/s per thread, and two threads of 0.2 s `slow` calls: with two
    # candidates the sidecar keeps one in flight on each, so the kill cuts one off mid-call.
    threads = [
        threading.Thread(target=load, args=("echo", echo_inputs), daemon=True) for _ in range(4)
    ] + [
        threading.Thread(target=load, args=("slow", lambda: slow_inputs(200)), daemon=True)
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        dead.kill()  # SIGKILL
        killed_at = sent[0]
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    after = scrape(fleet.sidecar_metrics_url)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    attempts = "pointsman_sidecar_upstream_attempts_total"
    failed_on_dead = moved(attempts, instance=dead_address) - moved(
        attempts, instance=dead_address, code="OK"
    )
    retries = moved("pointsman_sidecar_retries_total")
    print(
        f"{sent[0]} requests ({killed_at} before the kill), {len(failures)} failed; "
        f"{failed_on_dead:.0f} attempts failed on the killed instance, {retries:.0f} retries, "
        f"{moved('pointsman_sidecar_outlier_ejections_total', instance=dead_address):.0f} "
        f"ejections, {moved('pointsman_sidecar_retry_budget_exhausted_total'):.0f} budget refusals"
    )
    assert failures == []
    assert sent[0] > 150
    assert moved("pointsman_sidecar_requests_total", code="OK") == sent[0]
    # The kill was felt: calls in flight on it or sent before the router noticed.
    assert failed_on_dead >= 1
    # Every failed attempt was retried (none ran out of attempts or budget).
    assert retries == moved(attempts) - moved(attempts, code="OK")

    # The router's health checks drop the dead instance, and so do the sidecar's routes.
    with grpc.insecure_channel(fleet.router_address) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        instances = router.ListInstances(router_pb2.ListInstancesRequest(), timeout=5).instances
    assert {i.instance_id: i.healthy for i in instances} == {
        "triton-0": True,
        "triton-1": True,
        "triton-2": False,
    }
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        for _ in range(10):
            client.infer("echo", echo_inputs(), client_timeout=10)
    latest = scrape(fleet.sidecar_metrics_url)
    assert total(latest, attempts, instance=dead_address) == total(
        after, attempts, instance=dead_address
    )
