"""More models than fit on one instance, the same traffic two ways, on real Tritons.

Baseline: what a plain Kubernetes Service in front of Tritons with load-on-miss does. Requests
go round robin over the instances; a model missing where a request lands is loaded there
(evicting least recently used models to stay within the memory budget): a cold start.
Pointsman: the same requests through the sidecar; the router places each model where it
fits. After one warm-up pass, the baseline keeps cold-starting and Pointsman never does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from app.fleet import Fleet, FleetConfig
from app.processes import stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from bench.calls import codegen_inputs
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from tests.support.fleet_metrics import sidecar_cold_starts

pytestmark = pytest.mark.triton


MiB = 1024**2
BUDGET = 200 * MiB
# Footprints (the models' declared pointsman.memory_bytes; codegen serves two versions).
FOOTPRINT = {"codegen": 144 * MiB, "codegen_stream": 72 * MiB, "echo": 46 * MiB}
MODELS = ("codegen", "codegen_stream", "echo")  # 262 MiB together: more than one budget
POLICY = f"""\
placement:
  churn_guard_s: 0
models:
  codegen: {{min_copies: 1, per_copy_capacity_rps: 1000, memory_bytes: {FOOTPRINT["codegen"]}}}
  codegen_stream: {{per_copy_capacity_rps: 1000, memory_bytes: {FOOTPRINT["codegen_stream"]}}}
  echo: {{per_copy_capacity_rps: 1000, memory_bytes: {FOOTPRINT["echo"]}}}
"""
ROUNDS = 4


def send(address: str, model: str) -> None:
    """One request of `model`, as its clients send it (the stream model streams)."""
    with grpcclient.InferenceServerClient(address) as client:
        if model == "codegen":
            client.infer(model, codegen_inputs("def f():", 4), client_timeout=60)
        elif model == "echo":
            tensor = grpcclient.InferInput("INPUT0", [2], "FP32")
            tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
            client.infer(model, [tensor], client_timeout=60)
        else:
            done, got = threading.Event(), []

            def callback(result: object, error: object) -> None:
                got.append(error or result)
                if error is not None or len(got) == 3:
                    done.set()

            client.start_stream(callback=callback)
            client.async_stream_infer(model, codegen_inputs("def g():", 3))
            assert done.wait(60), "stream did not finish"
            client.stop_stream()
            assert not [g for g in got if isinstance(g, Exception)], got


class RoundRobinWithLoadOnMiss:
    """The baseline: round robin, and a load (evicting LRU models) wherever a model misses."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.loaded: dict[str, OrderedDict[str, None]] = {a: OrderedDict() for a in addresses}
        self.cold_starts = 0
        self.peak_bytes = 0
        self._next = 0

    def __call__(self, model: str) -> None:
        address = self.addresses[self._next % len(self.addresses)]
        self._next += 1
        loaded = self.loaded[address]
        if model in loaded:
            loaded.move_to_end(model)
        else:
            with grpcclient.InferenceServerClient(address) as client:
                while sum(FOOTPRINT[m] for m in loaded) + FOOTPRINT[model] > BUDGET:
                    victim, _ = loaded.popitem(last=False)
                    client.unload_model(victim)
                client.load_model(model)
            loaded[model] = None
            self.cold_starts += 1
        self.peak_bytes = max(self.peak_bytes, sum(FOOTPRINT[m] for m in loaded))
        send(address, model)


def drive(send_one: Callable[[str], None], rounds: int) -> None:
    for _ in range(rounds):
        for model in MODELS:
            send_one(model)


def test_round_robin_with_load_on_miss_keeps_cold_starting(tmp_path: Path) -> None:
    installation = prepare_installation()
    specs = [
        TritonSpec.on_free_ports(f"rr-{i}", log_path=tmp_path / f"rr-{i}.log") for i in range(2)
    ]
    processes = [triton_process(s, installation) for s in specs]
    for process in processes:
        process.start()
    try:
        for spec, process in zip(specs, processes, strict=True):
            wait_until_ready(spec.grpc_address, [], 60, process)
        baseline = RoundRobinWithLoadOnMiss([s.grpc_address for s in specs])
        drive(baseline, 1)  # warm-up
        warm = baseline.cold_starts
        drive(baseline, ROUNDS)
    finally:
        stop_all(processes)
    after_warm_up = baseline.cold_starts - warm
    print(f"round robin + load-on-miss: {warm} warm-up, {after_warm_up} later cold starts")
    assert after_warm_up >= ROUNDS  # it thrashes: every round evicts and reloads
    assert baseline.peak_bytes <= BUDGET


@pytest.fixture(scope="module")
def hot_pool_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir = tmp_path_factory.mktemp("hot-pool")
    policy = run_dir / "hot-pool-policy.yaml"
    policy.write_text(POLICY)
    fleet = Fleet(
        FleetConfig(
            instances=2,
            placement={"triton-0": ("codegen",), "triton-1": ()},
            sidecar_port=0,
            router_port=0,
            memory_budget_bytes=BUDGET,
            policy_file=policy,
            run_dir=run_dir,
        )
    )
    with fleet:
        yield fleet


def test_pointsman_has_no_cold_start_after_warm_up(hot_pool_fleet: Fleet) -> None:
    fleet = hot_pool_fleet
    router = pb_grpc.RouterServiceStub(grpc.insecure_channel(fleet.router_address))
    peak: dict[str, int] = {}

    def through_sidecar(model: str) -> None:
        send(fleet.sidecar_address, model)
        for inst in router.ListInstances(pb.ListInstancesRequest(), timeout=5).instances:
            peak[inst.instance_id] = max(peak.get(inst.instance_id, 0), inst.memory_used_bytes)

    drive(through_sidecar, 1)  # warm-up: the models nobody had loaded are cold once
    warm = sidecar_cold_starts(fleet)
    drive(through_sidecar, ROUNDS)
    after_warm_up = sidecar_cold_starts(fleet) - warm
    print(f"pointsman: {warm:.0f} warm-up, {after_warm_up:.0f} later cold starts; peak {peak}")
    assert warm == 2  # codegen_stream and echo were loaded nowhere
    assert after_warm_up == 0
    assert all(used <= BUDGET for used in peak.values()), peak
    models = {m.model_name: m for m in router.ListModels(pb.ListModelsRequest()).models}
    assert all(models[m].copies >= 1 for m in MODELS)
