"""Flow control on real Tritons: bursts far above what Triton's queues hold, none lost.

Two Tritons serve `codegen` and `codegen_stream` from a test copy of the model repository
whose queues hold 4 requests (`max_queue_size: 4`, the shipped models keep 64). Straight at
Triton such a burst is mostly refused ("Exceeds maximum queue size"). Through the sidecar,
which holds what the route tables say Triton cannot take (max_batch_size 8 x 1 instance + a
queue of 4 per instance) and resends what Triton refuses all the same, 200 concurrent streams
and 500 concurrent unary calls all succeed within a 60 s deadline; then the same through two
sidecars sharing the fleet, each holding to its own limit. A third sidecar, with flow control
off, shows what the callers got before. Figures print with `pytest -s`.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb

from app.fleet import Fleet, FleetConfig, wait_for_health
from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import DEFAULT_MODEL_REPOSITORY, wait_until_ready
from pointsman.router.v1 import router_pb2, router_pb2_grpc

pytestmark = [pytest.mark.triton, pytest.mark.timeout(900)]

QUEUE_SIZE = 4
STREAMS = 200
UNARY = 500
TOKENS = 16
DEADLINE_S = 60.0
MODELS = ("codegen", "codegen_stream")
POLICY = "models:\n  codegen: {min_copies: 2}\n  codegen_stream: {min_copies: 2}\n"
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _small_queue_repository(target: Path) -> Path:
    """codegen and codegen_stream with a small `max_queue_size` (a test copy)."""
    for model in MODELS:
        shutil.copytree(
            DEFAULT_MODEL_REPOSITORY / model, target / model,
            ignore=shutil.ignore_patterns("__pycache__"),
        )  # fmt: skip
        config = target / model / "config.pbtxt"
        text = config.read_text()
        small = re.sub(r"max_queue_size: \d+", f"max_queue_size: {QUEUE_SIZE}", text)
        assert small != text, f"max_queue_size not found in {config}"
        config.write_text(small)
    return target


@dataclass
class FlowFleet:
    fleet: Fleet
    # Sidecar process name -> (address, metrics URL); all on the fleet's router.
    sidecars: dict[str, tuple[str, str]] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)

    def start_sidecar(self, name: str, *flags: str) -> None:
        address, metrics = (f"127.0.0.1:{free_port()}" for _ in range(2))
        sidecar = ManagedProcess(
            ProcessSpec(
                name=name,
                argv=[sys.executable, "-m", "app", "sidecar", "--listen", address,
                      "--router", self.fleet.router_address, "--metrics-listen", metrics,
                      "--cold-start-wait", "0", *flags],
                env={"PYTHONUNBUFFERED": "1"},
                log_path=self.fleet.run_dir / f"{name}.log",
            )
        )  # fmt: skip
        self.processes.append(sidecar)
        sidecar.start()
        wait_for_health(address, sidecar)
        wait_until_ready(address, list(MODELS), 60, sidecar, server_ready=True)
        self.sidecars[name] = (address, f"http://{metrics}/metrics")


@pytest.fixture(scope="module")
def flow_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowFleet]:
    run_dir = tmp_path_factory.mktemp("flow")
    (run_dir / "policy.yaml").write_text(POLICY)
    fleet = Fleet(
        FleetConfig(
            instances=2,
            placement={"triton-0": MODELS, "triton-1": MODELS},
            model_repository=_small_queue_repository(run_dir / "models"),
            sidecar_port=0,
            router_port=0,
            run_dir=run_dir,
            policy_file=run_dir / "policy.yaml",
            sidecar_args=("--cold-start-wait", "0"),
        )
    )
    with fleet:
        flow = FlowFleet(fleet)
        flow.sidecars["sidecar"] = (fleet.sidecar_address, fleet.sidecar_metrics_url)
        try:
            flow.start_sidecar("sidecar-2")
            flow.start_sidecar("sidecar-off", "--no-flow-control")
            yield flow
        finally:
            stop_all(flow.processes, 10)


# -- the load --------------------------------------------------------------------------------------


def _codegen_request(model: str, prompt: str) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    text = prompt.encode()
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(len(text).to_bytes(4, "little") + text)
    request.inputs.add(name="MAX_TOKENS", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.append(np.array([TOKENS], dtype=np.int32).tobytes())
    data: bytes = request.SerializeToString()
    return data


@dataclass
class Outcome:
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def line(self, what: str) -> str:
        done = sorted(self.latencies_s)
        p50, p99 = (float(np.percentile(done, q)) if done else float("nan") for q in (50, 99))
        return (f"{what}: {len(done)} ok, {len(self.failures)} failed, "
                f"p50 {p50:.2f}s p99 {p99:.2f}s")  # fmt: skip


async def _unary(channel: grpc.aio.Channel, i: int, outcome: Outcome) -> None:
    started = time.monotonic()
    try:
        await channel.unary_unary(INFER)(
            _codegen_request("codegen", f"def f{i}():"), timeout=DEADLINE_S
        )
        outcome.latencies_s.append(time.monotonic() - started)
    except grpc.aio.AioRpcError as error:
        outcome.failures.append(f"{error.code().name}: {error.details()}")


async def _stream(channel: grpc.aio.Channel, i: int, outcome: Outcome) -> None:
    """One codegen_stream request on its own stream: all TOKENS responses, no error."""
    started = time.monotonic()
    tokens = 0
    try:
        call = channel.stream_stream(STREAM)(
            iter([_codegen_request("codegen_stream", f"class C{i}:")]), timeout=DEADLINE_S
        )
        async for raw in call:
            response = pb.ModelStreamInferResponse.FromString(raw)
            if response.error_message:
                outcome.failures.append(f"in-stream error: {response.error_message}")
                return
            tokens += 1
    except grpc.aio.AioRpcError as error:
        outcome.failures.append(f"{error.code().name}: {error.details()}")
        return
    if tokens != TOKENS:
        outcome.failures.append(f"{tokens} of {TOKENS} tokens")
        return
    outcome.latencies_s.append(time.monotonic() - started)


async def _burst(addresses: list[str], count: int, stream: bool) -> Outcome:
    """`count` calls at once, spread evenly over `addresses`."""
    outcome = Outcome()
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        call = _stream if stream else _unary
        await asyncio.gather(*(call(channels[i % len(channels)], i, outcome) for i in range(count)))
    finally:
        for channel in channels:
            await channel.close()
    return outcome


def _counters(url: str) -> dict[str, float]:
    """The sidecar's flow-control counters, summed over models."""
    wanted = {
        "pointsman_sidecar_held": "held",
        "pointsman_sidecar_queue_full_retries": "resent",
        "pointsman_sidecar_triton_queue_full": "queue_full_to_caller",
    }
    totals = dict.fromkeys(wanted.values(), 0.0)
    with urllib.request.urlopen(url, timeout=5) as response:
        for family in text_string_to_metric_families(response.read().decode()):
            if family.name in wanted:
                totals[wanted[family.name]] += sum(
                    s.value for s in family.samples if s.name.endswith("_total")
                )
    return totals


def _run(urls: list[str], addresses: list[str], count: int, stream: bool) -> Outcome:
    before = [_counters(u) for u in urls]
    outcome = asyncio.run(_burst(addresses, count, stream))
    after = [_counters(u) for u in urls]
    what = f"{count} {'streams' if stream else 'unary calls'} via {len(addresses)} sidecar(s)"
    deltas = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    print(outcome.line(what), "| per sidecar:", deltas)
    if outcome.failures:
        print("first failures:", outcome.failures[:5])
    return outcome


# -- the proofs ------------------------------------------------------------------------------------


def test_the_route_tables_carry_each_instances_capacity(flow_fleet: FlowFleet) -> None:
    fleet = flow_fleet.fleet
    with grpc.insecure_channel(fleet.router_address) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        models = router.ListModels(router_pb2.ListModelsRequest(), timeout=5).models
    tables = {m.model_name: m.route_table for m in models}
    for model in MODELS:
        capacity = {(c.concurrency, c.queue_capacity) for c in tables[model].candidates}
        assert capacity == {(8, QUEUE_SIZE)}, (model, capacity)
        assert len(tables[model].candidates) == 2


def test_straight_at_triton_the_burst_is_refused(flow_fleet: FlowFleet) -> None:
    """The control: Triton's own queues refuse most of such a burst."""
    triton = flow_fleet.fleet.tritons[0].grpc_address
    outcome = asyncio.run(_burst([triton], 100, stream=False))
    print(outcome.line("100 unary calls straight at one Triton"))
    assert outcome.failures and all("Exceeds maximum queue size" in f for f in outcome.failures)


def test_without_flow_control_the_sidecar_passes_triton_s_refusals_on(
    flow_fleet: FlowFleet,
) -> None:
    """The control through a sidecar: with flow control off, the burst's refusals (beyond
    the one failover to the other holder) reach the callers, as in the issue."""
    address, url = flow_fleet.sidecars["sidecar-off"]
    streams = _run([url], [address], STREAMS, stream=True)
    assert streams.failures
    assert all("Exceeds maximum queue size" in f for f in streams.failures)


def test_one_sidecar_loses_no_stream_and_no_call(flow_fleet: FlowFleet) -> None:
    address, url = flow_fleet.sidecars["sidecar"]
    streams = _run([url], [address], STREAMS, stream=True)
    unary = _run([url], [address], UNARY, stream=False)
    assert not streams.failures and len(streams.latencies_s) == STREAMS
    assert not unary.failures and len(unary.latencies_s) == UNARY
    assert _counters(url)["held"] > 0, "flow control must have held the burst"


def test_two_sidecars_sharing_the_fleet_lose_nothing(flow_fleet: FlowFleet) -> None:
    """Each sidecar holds to the whole capacity as if alone; Triton refuses what the two
    together send beyond it, and each resends its own."""
    pairs = [flow_fleet.sidecars[name] for name in ("sidecar", "sidecar-2")]
    addresses, urls = [a for a, _ in pairs], [u for _, u in pairs]
    streams = _run(urls, addresses, STREAMS, stream=True)
    unary = _run(urls, addresses, UNARY, stream=False)
    assert not streams.failures and len(streams.latencies_s) == STREAMS
    assert not unary.failures and len(unary.latencies_s) == UNARY
