"""The placement controller and its executor.

First, pure tests with a fake model control and a fake fleet: counter deltas, backoffs, the
unload protocol's order, queue order, the planner's inputs. Then the controller against two
real Triton servers (explicit model control) with a real FleetCollector and RouteBook, on a
copy of triton_models/ with a `broken` model added, and 240 MiB budgets so not everything fits:
a cold request loads on the best instance; a failed load is retried elsewhere with backoff;
demand grows copies and, once it falls and the cool-down passes, an unload drains first; LRU
eviction makes room once the churn guard lets it. A watchdog reads both Tritons' repository
indexes every 50 ms throughout and checks that the declared bytes of every version READY,
LOADING or UNLOADING never exceed an instance's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from app.processes import ManagedProcess, stop_all
from app.triton import (
    DEFAULT_MODEL_REPOSITORY,
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)
from pointsman.clock import monotonic
from router.config import InstanceConfig, RouterConfig
from router.contracts import FleetSnapshot, InstanceSnapshot, MemorySource, ModelOnInstance
from router.datalayer.collector import (
    FleetCollector,
    GpuMemoryReading,
    RequestDelta,
    request_increases,
)
from router.datalayer.triton_metrics import parse_triton_metrics
from router.decision import DecisionPolicy
from router.demand import DemandTracker
from router.discovery import StaticDiscovery
from router.metrics import RouterMetrics
from router.placement import Load, LoadPriority, ModelSpec, PlacementPolicy, Unload
from router.placement.control import ModelControlError, TritonModelControl
from router.placement.controller import (
    ControllerSettings,
    PlacementController,
)
from router.placement.executor import PlacementExecutor
from router.placement.jobs import ExecutorSettings, JobState, LoadFailures
from router.plugins.registry import default_profile
from router.routes import RouteBook
from tests.support.fakes import FakeClock

MiB = 1 << 20


# --- fakes ------------------------------------------------------------------------------------


def _instance(
    iid: str,
    models: dict[str, int] | None = None,
    *,
    now: float = 1000.0,
    budget: int = 200 * MiB,
    pending: dict[str, int] | None = None,
    loading: tuple[str, ...] = (),
    gpu_used: int | None = None,
    ips: float = 0.0,
) -> InstanceSnapshot:
    """An instance listing `models` (name -> declared bytes) ready, plus `loading` ones."""
    listed = {
        name: ModelOnInstance(
            name,
            ready_versions=frozenset({"1"}),
            declared_memory_bytes=declared,
            pending_requests=(pending or {}).get(name, 0),
        )
        for name, declared in (models or {}).items()
    }
    for name in loading:
        listed[name] = ModelOnInstance(name, loading_versions=frozenset({"1"}))
    return InstanceSnapshot(
        instance_id=iid,
        grpc_address=f"10.0.0.{iid[-1]}:8001",
        healthy=True,
        refreshed_at=now,
        models=listed,
        memory_used_bytes=gpu_used if gpu_used is not None else sum((models or {}).values()),
        memory_budget_bytes=budget,
        memory_source=MemorySource.GPU_METRICS if gpu_used is not None else MemorySource.DECLARED,
        inferences_per_second=ips,
    )


def _fleet(*instances: InstanceSnapshot, known: tuple[str, ...] = ()) -> FleetSnapshot:
    names = {m for i in instances for m in i.models} | set(known)
    return FleetSnapshot(
        taken_at=instances[0].refreshed_at if instances else 0.0,
        instances=instances,
        known_models=frozenset(names),
    )


@dataclass
class FakeSource:
    fleet: FleetSnapshot
    deltas: list[RequestDelta] = field(default_factory=list)
    gpu: dict[str, GpuMemoryReading] = field(default_factory=dict)

    def snapshot(self) -> FleetSnapshot:
        return self.fleet

    def take_request_deltas(self) -> list[RequestDelta]:
        deltas, self.deltas = self.deltas, []
        return deltas

    def gpu_memory(self, instance_id: str) -> GpuMemoryReading | None:
        return self.gpu.get(instance_id)


@dataclass
class FakeControl:
    """Records calls with what the route book showed at that moment; can fail or block."""

    book: RouteBook
    fail_loads: dict[str, str] = field(default_factory=dict)
    fail_unloads: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = None
    on_unloaded: Callable[[str, str], None] = lambda address, model: None
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    # At each unload: (routed there, draining there).
    unload_views: list[tuple[bool, bool]] = field(default_factory=list)
    # model -> max_sequence_idle in seconds, for models with a sequence batcher.
    sequence_idle: dict[str, float] = field(default_factory=dict)

    async def load(self, address: str, model: str) -> None:
        self.calls.append(("load", address, model))
        if self.gate is not None:
            await self.gate.wait()
        if model in self.fail_loads:
            raise ModelControlError(self.fail_loads[model])

    async def unload(self, address: str, model: str) -> None:
        self.calls.append(("unload", address, model))
        iid = "i" + address.split(":")[0][-1]
        table = self.book.tables.get(model)
        routed = table is not None and any(c.instance_id == iid for c in table.candidates)
        self.unload_views.append((routed, (model, iid) in self.book.draining))
        if model in self.fail_unloads:
            raise ModelControlError(f"unload {model} refused")

    async def wait_unloaded(self, address: str, model: str, timeout_s: float) -> None:
        self.on_unloaded(address, model)

    async def sequence_idle_s(self, address: str, model: str) -> float | None:
        return self.sequence_idle.get(model)


def _book() -> RouteBook:
    return RouteBook(DecisionPolicy(default_profile()), ttl_ms=1000)


async def _until(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    detail: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s: {what} {detail()}")
        await asyncio.sleep(0.02)


# --- counters ---------------------------------------------------------------------------------


def test_request_increases_follow_prometheus_increase() -> None:
    before = {("codegen", "1"): 10.0, ("codegen", "2"): 7.0, ("echo", "1"): 3.0}
    after = {
        ("codegen", "1"): 14.0,  # +4
        ("codegen", "2"): 2.0,  # went down: reset (Triton restarted), 2 since
        ("echo", "1"): 3.0,  # unchanged: left out
        ("codegen_stream", "1"): 5.0,  # new series: a version just loaded, from zero
    }
    assert request_increases(before, after) == {
        ("codegen", "1"): 4,
        ("codegen", "2"): 2,
        ("codegen_stream", "1"): 5,
    }
    assert request_increases(after, after) == {}


def test_requests_by_version_add_failures_of_every_reason() -> None:
    text = """\
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="codegen",version="1"} 10
nv_inference_request_success{model="codegen",version="2"} 5
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="codegen",reason="REJECTED",version="1"} 2
nv_inference_request_failure{model="codegen",reason="BACKEND",version="1"} 1
nv_inference_request_failure{model="echo",reason="OTHER",version="1"} 0
"""
    metrics = parse_triton_metrics(text)
    # Failure lines at 0 are not read: echo, with no success line, has no entry (= 0).
    assert metrics.requests_by_version == {("codegen", "1"): 13.0, ("codegen", "2"): 5.0}
    assert metrics.success_by_model == {"codegen": 15.0}


# --- backoff ----------------------------------------------------------------------------------


def test_load_failures_back_off_exponentially_and_are_forgotten_after_the_memory() -> None:
    failures = LoadFailures(base_s=1.0, max_s=4.0, memory_s=100.0)
    assert [failures.record("m", "i1", t) for t in (0.0, 1.0, 3.0, 7.0)] == [1.0, 2.0, 4.0, 4.0]
    assert failures.failures("m", "i1") == 4
    (backoff,) = failures.backoffs(8.0)
    assert (backoff.model, backoff.instance_id, backoff.until) == ("m", "i1", 11.0)
    assert failures.backoffs(11.0) == ()  # expired, still remembered
    assert failures.record("m", "i1", 50.0) == 4.0  # fifth in a row
    failures.backoffs(200.0)  # 150 s without a failure: forgotten
    assert failures.failures("m", "i1") == 0
    assert failures.record("m", "i1", 201.0) == 1.0
    failures.succeeded("m", "i1")
    assert failures.failures("m", "i1") == 0


# --- executor ---------------------------------------------------------------------------------


def _executor(
    source: FakeSource, control: FakeControl, book: RouteBook, clock: FakeClock
) -> PlacementExecutor:
    def rebuild() -> None:
        book.rebuild(source.snapshot(), clock())

    return PlacementExecutor(
        control,
        book=book,
        clock=clock,
        snapshot=source.snapshot,
        gpu_memory=source.gpu_memory,
        on_routes_changed=rebuild,
        settings=ExecutorSettings(drain_grace_s=0.05, backoff_base_s=1.0),
    )


@pytest.mark.asyncio
async def test_unload_leaves_the_routes_and_drains_before_triton_unloads() -> None:
    clock = FakeClock()
    book = _book()
    source = FakeSource(
        _fleet(_instance("i1", {"m": 10 * MiB}, pending={"m": 3}), _instance("i2", {"m": 10}))
    )
    book.rebuild(source.fleet, clock())
    control = FakeControl(book)
    executor = _executor(source, control, book, clock)
    (job,) = executor.submit([Unload("m", "i1", "scale down", 10 * MiB)], source.fleet)
    await asyncio.sleep(0.2)
    # Routes left i1 at once, but Triton still holds 3 queued requests there: no unload yet.
    assert [c.instance_id for c in book.tables["m"].candidates] == ["i2"]
    assert control.calls == [] and job.state is JobState.RUNNING
    source.fleet = _fleet(_instance("i1", {"m": 10 * MiB}), _instance("i2", {"m": 10}))
    await _until(lambda: job.state is JobState.SETTLING, 2, "unload done")
    assert control.calls == [("unload", "10.0.0.1:8001", "m")]
    assert control.unload_views == [(False, True)]  # not routed, still draining
    assert executor.in_progress() == (job.action,)  # until the snapshot shows it gone
    source.fleet = _fleet(_instance("i1"), _instance("i2", {"m": 10}))
    assert executor.reconcile(source.fleet) == [job]
    assert book.draining == set() and executor.in_progress() == ()


@pytest.mark.parametrize("max_drain_s", [30.0, 0.3])
@pytest.mark.asyncio
async def test_unloading_a_sequence_model_waits_for_its_live_sequences(max_drain_s: float) -> None:
    """Sidecars keep a live sequence's steps on its instance after the routes drop it: the
    unload waits until no request reached it for the model's idle time, at most max_drain_s."""
    clock = FakeClock()
    book = _book()
    source = FakeSource(_fleet(_instance("i1", {"seq": 10 * MiB}), _instance("i2", {"seq": 10})))
    book.rebuild(source.fleet, clock())
    control = FakeControl(book, sequence_idle={"seq": 2.0})
    last: dict[tuple[str, str], float] = {("seq", "i1"): clock()}
    executor = PlacementExecutor(
        control,
        book=book,
        clock=clock,
        snapshot=source.snapshot,
        last_request_at=lambda model, iid: last.get((model, iid)),
        on_routes_changed=lambda: book.rebuild(source.snapshot(), clock()),
        settings=ExecutorSettings(
            drain_grace_s=0.0, max_drain_s=max_drain_s, sequence_idle_margin_s=1.0
        ),
    )
    (job,) = executor.submit([Unload("seq", "i1", "scale down", 10 * MiB)], source.fleet)
    await asyncio.sleep(0.1)
    assert [c.instance_id for c in book.tables["seq"].candidates] == ["i2"]
    clock.advance(2.5)  # idle 2.5 s: not yet idle + margin (3 s)
    await asyncio.sleep(0.1)
    if max_drain_s < 1:  # the bound: the unload goes ahead although steps still arrive
        await _until(lambda: job.state is JobState.SETTLING, 2, "unload after the bound")
        return
    assert control.calls == [] and job.state is JobState.RUNNING
    last[("seq", "i1")] = clock()  # a step of a live sequence reached i1
    clock.advance(2.9)
    await asyncio.sleep(0.1)
    assert control.calls == []
    clock.advance(0.2)  # 3.1 s since the last request
    await _until(lambda: job.state is JobState.SETTLING, 2, "unload once idle")
    assert control.calls == [("unload", "10.0.0.1:8001", "seq")]


@pytest.mark.asyncio
async def test_a_load_whose_eviction_failed_is_not_started_and_not_backed_off() -> None:
    clock = FakeClock()
    book = _book()
    source = FakeSource(_fleet(_instance("i1", {"old": 150 * MiB}), known=("new",)))
    control = FakeControl(book, fail_unloads={"old"})
    executor = _executor(source, control, book, clock)
    unload, load = executor.submit(
        [
            Unload("old", "i1", "evict LRU to fit new", 150 * MiB, for_load="new"),
            Load("new", "i1", "requested", LoadPriority.REQUESTED, 100 * MiB, ("old",)),
        ],
        source.fleet,
    )
    await _until(lambda: load.state is JobState.FAILED, 2, "load skipped")
    assert unload.state is JobState.FAILED and "refused" in unload.error
    assert "not started: unloading old failed" in load.error
    assert [c[0] for c in control.calls] == ["unload"]
    assert executor.backoffs() == () and book.draining == set()


@pytest.mark.asyncio
async def test_a_requested_load_overtakes_queued_proactive_work_on_its_instance() -> None:
    clock = FakeClock()
    book = _book()
    source = FakeSource(_fleet(_instance("i1"), known=("a", "b", "c")))
    control = FakeControl(book, gate=asyncio.Event())
    executor = _executor(source, control, book, clock)
    executor.submit([Load("a", "i1", "demand"), Load("b", "i1", "demand")], source.fleet)
    await _until(lambda: len(control.calls) == 1, 1, "first load started")
    executor.submit([Load("c", "i1", "requested", LoadPriority.REQUESTED)], source.fleet)
    assert control.gate is not None
    control.gate.set()
    await _until(lambda: len(control.calls) == 3, 1, "all loads")
    assert [model for _, _, model in control.calls] == ["a", "c", "b"]


@pytest.mark.asyncio
async def test_a_failed_load_backs_off_and_the_next_plan_places_it_elsewhere() -> None:
    clock = FakeClock()
    book = _book()
    source = FakeSource(_fleet(_instance("i1"), _instance("i2", {"x": 60 * MiB}), known=("m",)))
    control = FakeControl(book, fail_loads={"m": "load m: INVALID_ARGUMENT: init raised"})
    controller = PlacementController(
        source,
        book,
        control,
        clock=clock,
        spec_for=lambda name, footprint: ModelSpec(name, 50 * MiB, 10.0),
        settings=ControllerSettings(unknown_footprint_bytes=50 * MiB),
        executor_settings=ExecutorSettings(backoff_base_s=5.0),
    )
    controller.request_model("m")
    plan = await controller.tick()
    assert [(a.model, a.instance_id) for a in plan.loads] == [("m", "i1")]  # the most headroom
    assert plan.loads[0].priority is LoadPriority.REQUESTED
    await _until(lambda: controller.executor.jobs == (), 1, "load failed")
    decision = controller.decisions["m"]
    assert decision.action == "load" and decision.instance_id == "i1"
    assert "init raised" in decision.reason and "not retried on i1 for 5 s" in decision.reason
    plan = await controller.tick()
    assert [(a.model, a.instance_id) for a in plan.loads] == [("m", "i2")]
    clock.now += 5.0  # i1's backoff is over
    source.fleet = _fleet(
        _instance("i1", now=clock.now),
        _instance("i2", {"x": 60 * MiB}, now=clock.now),
        known=("m",),
    )
    await _until(lambda: controller.executor.jobs == (), 1, "second load failed")
    plan = await controller.tick()
    assert [(a.model, a.instance_id) for a in plan.loads] == [("m", "i1")]
    await _until(lambda: controller.executor.jobs == (), 1, "third load failed")
    assert controller.executor.failures.failures("m", "i1") == 2
    assert "(2 in a row)" in controller.decisions["m"].reason
    assert "for 10 s" in controller.decisions["m"].reason


# --- controller inputs ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_plan_inputs_from_the_snapshot() -> None:
    clock = FakeClock(1000.0)
    book = _book()
    source = FakeSource(
        _fleet(
            _instance("i1", {"codegen": 128 * MiB}, ips=12.5, pending={"codegen": 6}),
            _instance("i2", {"echo": 40 * MiB}, gpu_used=900 * MiB, loading=("codegen",)),
            _instance("i3", {"echo": 40 * MiB}, now=990.0, pending={"echo": 3}),  # stale
            _instance("i4", budget=0),
            known=("cold",),
        )
    )
    source.deltas = [RequestDelta("i1", "codegen", "2", 30, 998.0)]
    controller = PlacementController(
        source,
        book,
        FakeControl(book),
        clock=clock,
        settings=ControllerSettings(unknown_footprint_bytes=64 * MiB),
    )
    controller._feed_demand(source.take_request_deltas())
    inputs = controller.build_inputs(source.fleet)
    by_id = {i.instance_id: i for i in inputs.instances}
    i1, i2, i3, i4 = by_id["i1"], by_id["i2"], by_id["i3"], by_id["i4"]
    assert (i1.memory_used_bytes, i1.load, i1.healthy) == (0, 12.5, True)
    codegen = i1.model("codegen")
    assert codegen is not None and codegen.memory_bytes == 128 * MiB
    assert codegen.loaded_at == 1000.0 and codegen.last_used == 1000.0  # first seen now
    assert i2.memory_used_bytes == 900 * MiB  # measured: GPU metrics
    loading = i2.model("codegen")
    assert loading is not None and loading.memory_bytes == 128 * MiB  # declared, seen on i1
    assert not i3.healthy and i4.memory_budget_bytes == 0
    specs = {s.name: s for s in inputs.specs}
    assert specs["codegen"].footprint_bytes == 128 * MiB
    assert specs["cold"].footprint_bytes == 64 * MiB  # never seen loaded
    assert inputs.demand.of("codegen").last_seen == 998.0
    # Requests waiting in Triton's queues are demand the answered ones do not show.
    assert (inputs.demand.of("codegen").queued, inputs.demand.of("echo").queued) == (6, 3)
    recent_s = inputs.demand.recent_window_s
    assert inputs.demand.of("codegen").recent_rps == pytest.approx(
        controller.tracker.rate("codegen", recent_s) + 6 / recent_s
    )
    assert inputs.requested_while_absent == frozenset()
    controller.request_model("cold")
    controller.request_model("echo")  # ready on i2: not absent
    assert controller.build_inputs(source.fleet).requested_while_absent == {"cold"}
    clock.now += 31.0  # past the cold request's TTL
    assert controller.build_inputs(source.fleet).requested_while_absent == frozenset()


@pytest.mark.asyncio
async def test_a_load_measured_on_gpu_sets_the_footprint() -> None:
    clock = FakeClock(1000.0)
    book = _book()
    source = FakeSource(_fleet(_instance("i1", gpu_used=100 * MiB), known=("m",)))
    source.gpu["i1"] = GpuMemoryReading(1000.0, 100 * MiB)

    class Control(FakeControl):
        async def load(self, address: str, model: str) -> None:
            await super().load(address, model)
            clock.now += 1.0
            source.gpu["i1"] = GpuMemoryReading(clock.now + 0.5, 400 * MiB)

    controller = PlacementController(
        source,
        book,
        Control(book),
        clock=clock,
        metrics=RouterMetrics(registry := CollectorRegistry()),
        settings=ControllerSettings(unknown_footprint_bytes=50 * MiB),
        executor_settings=ExecutorSettings(gpu_settle_s=0.5),
        spec_for=lambda name, footprint: ModelSpec(name, footprint, 1.0, min_copies=1),
    )
    plan = await controller.tick()
    assert [a.model for a in plan.loads] == ["m"]
    await _until(lambda: controller.executor.jobs[0].state is JobState.SETTLING, 2, "loaded")
    assert controller.footprint("m") == 300 * MiB
    count = registry.get_sample_value(
        "pointsman_router_model_load_duration_seconds_count", {"model": "m"}
    )
    assert count == 1.0
    # The collector's own sighting of the same load is not counted twice.
    controller.on_model_seen_loaded("m", 1.2)
    assert (
        registry.get_sample_value(
            "pointsman_router_model_load_duration_seconds_count", {"model": "m"}
        )
        == 1.0
    )


# --- against real Triton ----------------------------------------------------------------------

BUDGET = 240 * MiB  # codegen's two versions (2 x 72 MiB) with echo (46) or codegen_stream (72)
IDS = ("triton-0", "triton-1")

BROKEN_CONFIG = """\
name: "broken"
backend: "python"
max_batch_size: 0
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [-1] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [-1] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
parameters [{ key: "pointsman.memory_bytes" value: { string_value: "16777216" } }]
"""
BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken on purpose: cannot initialise")
"""


class Watchdog:
    """Reads every Triton's repository index every 50 ms; sums declared bytes per version
    that is READY, LOADING or UNLOADING; remembers every sum over the budget."""

    def __init__(self, addresses: dict[str, str], declared: dict[str, int]) -> None:
        self._addresses = addresses
        self._declared = declared
        self.peak = dict.fromkeys(addresses, 0)
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        clients = {iid: grpcclient.InferenceServerClient(a) for iid, a in self._addresses.items()}
        while not self._stop.wait(0.05):
            for iid, client in clients.items():
                try:
                    index = client.get_model_repository_index(as_json=False)
                except Exception:
                    continue
                held = [
                    (e.name, e.version, e.state)
                    for e in index.models
                    if e.state in ("READY", "LOADING", "UNLOADING")
                ]
                used = sum(self._declared[name] for name, _, _ in held)
                self.peak[iid] = max(self.peak[iid], used)
                self.samples += 1
                if used > BUDGET:
                    self.violations.append(f"{iid}: {used / MiB:.0f} MiB in {held}")
        for client in clients.values():
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Tritons:
    specs: dict[str, TritonSpec]
    watchdog: Watchdog

    def address(self, iid: str) -> str:
        return self.specs[iid].grpc_address

    def check_budget(self) -> None:
        assert self.watchdog.samples > 0
        assert self.watchdog.violations == [], self.watchdog.violations[:5]


def _declared_per_version(repository: Path) -> dict[str, int]:
    declared = {}
    for config in repository.glob("*/config.pbtxt"):
        found = re.search(
            r'"pointsman\.memory_bytes"[^}]*string_value:\s*"(\d+)"', config.read_text()
        )
        declared[config.parent.name] = int(found.group(1)) if found else 0
    return declared


@pytest.fixture(scope="module")
def tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tritons]:
    base = tmp_path_factory.mktemp("placement")
    repository = base / "models"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, repository, symlinks=True)
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text(BROKEN_CONFIG)
    (repository / "broken" / "1" / "model.py").write_text(BROKEN_MODEL)
    installation = prepare_installation()
    specs = {
        iid: TritonSpec.on_free_ports(
            iid,
            model_repository=repository,
            load_models=("codegen",) if iid == IDS[0] else (),
            log_path=base / f"{iid}.log",
        )
        for iid in IDS
    }
    processes: list[ManagedProcess] = [triton_process(s, installation) for s in specs.values()]
    watchdog: Watchdog | None = None
    try:
        for process in processes:
            process.start()
        for spec, process in zip(specs.values(), processes, strict=True):
            wait_until_ready(spec.grpc_address, spec.load_models, 90, process)
        watchdog = Watchdog(
            {iid: s.grpc_address for iid, s in specs.items()}, _declared_per_version(repository)
        )
        yield Tritons(specs, watchdog)
    finally:
        if watchdog is not None:
            watchdog.stop()
        stop_all(processes, grace_s=8)


class RecordingControl(TritonModelControl):
    """The real model control, noting each call and, at each unload, whether the route table
    still listed the instance and whether the pair was draining."""

    def __init__(self, book: RouteBook, ids_by_address: dict[str, str]) -> None:
        super().__init__(load_timeout_s=60.0)
        self._book = book
        self._ids = ids_by_address
        self.calls: list[tuple[float, str, str, str]] = []  # (time, op, model, instance)
        self.failed_loads: list[tuple[float, str, str]] = []
        self.unload_views: list[tuple[str, str, bool, bool]] = []

    async def load(self, address: str, model: str) -> None:
        self.calls.append((time.monotonic(), "load", model, self._ids[address]))
        try:
            await super().load(address, model)
        except ModelControlError:
            self.failed_loads.append((time.monotonic(), model, self._ids[address]))
            raise

    async def unload(self, address: str, model: str) -> None:
        iid = self._ids[address]
        table = self._book.tables.get(model)
        routed = table is not None and any(c.instance_id == iid for c in table.candidates)
        self.unload_views.append((model, iid, routed, (model, iid) in self._book.draining))
        self.calls.append((time.monotonic(), "unload", model, iid))
        await super().unload(address, model)


async def _arrange(tritons: Tritons, wanted: dict[str, set[str]]) -> None:
    """Loads and unloads directly (not through the controller) until each instance holds
    exactly `wanted`; unloads first, so that budgets hold throughout."""
    control = TritonModelControl()
    try:

        async def one(iid: str) -> None:
            address = tritons.address(iid)
            present = {
                e.name
                for e in await _index(address)
                if e.state in ("READY", "LOADING", "UNLOADING")
            }
            for model in sorted(present - wanted[iid]):
                await control.unload(address, model)
                await control.wait_unloaded(address, model, 30)
            for model in sorted(wanted[iid] - present):
                await control.load(address, model)

        await asyncio.gather(*(one(iid) for iid in IDS))
    finally:
        await control.close()


async def _index(address: str) -> list[grpcclient.service_pb2.RepositoryIndexResponse.ModelIndex]:
    client = grpcclient.InferenceServerClient(address)
    try:
        return list(client.get_model_repository_index(as_json=False).models)
    finally:
        client.close()


@dataclass
class Harness:
    collector: FleetCollector
    book: RouteBook
    control: RecordingControl
    controller: PlacementController
    registry: CollectorRegistry

    def holders(self, model: str) -> set[str]:
        return {
            i.instance_id
            for i in self.collector.snapshot().instances
            if (m := i.model(model)) is not None and m.is_ready
        }


@contextlib.asynccontextmanager
async def _harness(
    tritons: Tritons,
    policy: PlacementPolicy,
    *,
    capacity: dict[str, float] | None = None,
    forecast_horizon_s: float = 1.0,
    tick_s: float = 0.25,
) -> AsyncIterator[Harness]:
    config = RouterConfig(
        instances=tuple(
            InstanceConfig(iid, s.grpc_address, s.metrics_url, BUDGET)
            for iid, s in tritons.specs.items()
        ),
        refresh_interval_s=0.1,
        metrics_interval_s=0.25,
    )
    collector = FleetCollector(config, StaticDiscovery(config.instances), clock=monotonic)
    book = RouteBook(DecisionPolicy(default_profile()), ttl_ms=1000)
    control = RecordingControl(book, {s.grpc_address: iid for iid, s in tritons.specs.items()})
    registry = CollectorRegistry()
    controller = PlacementController(
        collector,
        book,
        control,
        clock=monotonic,
        tracker=DemandTracker(
            monotonic,
            bucket_s=0.5,
            span_s=60.0,
            short_window_s=3.0,
            fit_window_s=3.0,
            long_window_s=10.0,
        ),
        metrics=RouterMetrics(registry),
        spec_for=lambda name, footprint: ModelSpec(
            name, footprint, (capacity or {}).get(name, 50.0)
        ),
        placement_policy=lambda: policy,
        on_routes_changed=collector.changed.set,
        settings=ControllerSettings(
            unknown_footprint_bytes=64 * MiB, forecast_horizon_s=forecast_horizon_s
        ),
        executor_settings=ExecutorSettings(
            drain_grace_s=0.5, max_drain_s=10.0, backoff_base_s=1.0, gpu_settle_s=0.5
        ),
    )

    async def keep_routes() -> None:  # as the router's route loop does
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await collector.changed.wait()
            collector.changed.clear()
            book.rebuild(collector.snapshot(), monotonic())
            await asyncio.sleep(0.02)

    await collector.start()
    routes = asyncio.create_task(keep_routes())
    runner: asyncio.Task[None] | None = None
    try:
        await _until(
            lambda: (
                all(i.healthy for i in collector.snapshot().instances)
                and len(collector.snapshot().instances) == 2
            ),
            10,
            "collector sees both Tritons",
        )
        await asyncio.sleep(0.6)  # a metrics baseline for the request counters
        runner = asyncio.create_task(controller.run(tick_s))
        yield Harness(collector, book, control, controller, registry)
    finally:
        for task in (runner, routes):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await _bounded(task, "a cancelled loop")
        await _bounded(controller.stop(), "controller.stop")
        await _bounded(collector.stop(), "collector.stop")
        await _bounded(control.close(), "control.close")
        tritons.check_budget()


async def _bounded(step: Awaitable[object], what: str, timeout_s: float = 30.0) -> None:
    """A teardown step that must end: a hang fails with every task's stack, not a bare
    pytest timeout that hides the test's own error."""
    try:
        async with asyncio.timeout(timeout_s):
            await step
    except TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=stacks)
        message = f"{what} did not end in {timeout_s} s; tasks:\n{stacks.getvalue()}"
        raise AssertionError(message) from None


class Traffic:
    """Requests at about `rate_rps`, each to an instance drawn from the model's route table
    (as a sidecar routes); `address_of` maps instance ids to addresses. Failures are kept."""

    def __init__(
        self,
        book: RouteBook,
        model: str,
        address_of: Callable[[str], str],
        rate_rps: float,
        *,
        pinned: str = "",
    ) -> None:
        self.rate_rps = rate_rps
        self.sent = 0
        self.failures: list[str] = []
        self._book = book
        self._model = model
        self._address_of = address_of
        self._pinned = pinned
        self._stop = threading.Event()
        # One schedule for all threads, so requests stay evenly spaced (no bursts).
        self._slot_lock = threading.Lock()
        self._next_slot = time.monotonic()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(3)]
        for thread in self._threads:
            thread.start()

    def _inputs(self) -> list[grpcclient.InferInput]:
        if self._model == "echo":
            data = grpcclient.InferInput("INPUT0", [4], "FP32")
            data.set_data_from_numpy(np.ones(4, np.float32))
            return [data]
        prompt = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[b"def f(x):"]], dtype=np.object_))
        tokens = grpcclient.InferInput("MAX_TOKENS", [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))
        return [prompt, tokens]

    def _send(self) -> None:
        clients: dict[str, grpcclient.InferenceServerClient] = {}
        rng = random.Random()
        while not self._stop.is_set():
            with self._slot_lock:
                slot = self._next_slot = max(self._next_slot, time.monotonic())
                self._next_slot += 1.0 / self.rate_rps
            if self._stop.wait(max(0.0, slot - time.monotonic())):
                break
            iid = self._pinned or self._pick(rng)
            if not iid:
                self.failures.append("no route")
                continue
            client = clients.get(iid)
            if client is None:
                client = clients[iid] = grpcclient.InferenceServerClient(self._address_of(iid))
            try:
                client.infer(self._model, self._inputs(), client_timeout=10)
                self.sent += 1
            except Exception as exc:
                self.failures.append(f"{iid}: {exc}")
        for client in clients.values():
            client.close()

    def _pick(self, rng: random.Random) -> str:
        table = self._book.tables.get(self._model)
        if table is None or not table.candidates:
            return ""
        weights = [c.weight for c in table.candidates]
        return rng.choices(table.candidates, weights)[0].instance_id

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@pytest.mark.triton
@pytest.mark.asyncio
async def test_a_cold_request_loads_on_the_best_instance_and_the_wait_resolves(
    tritons: Tritons,
) -> None:
    await _arrange(tritons, {IDS[0]: {"codegen"}, IDS[1]: set()})
    async with _harness(tritons, PlacementPolicy(churn_guard_s=60.0)) as h:
        started = time.monotonic()
        snapshot = await h.controller.request_and_wait("echo", 15.0)
        waited = time.monotonic() - started
        assert snapshot is not None, h.controller.model_placement("echo")
        # triton-1 is empty: the most headroom after the load, and the shortlist's only one.
        assert h.holders("echo") == {IDS[1]}
        assert waited < 10.0
        assert [(op, m, i) for _, op, m, i in h.control.calls] == [("load", "echo", IDS[1])]
        decision = h.controller.decisions["echo"]
        assert (decision.action, decision.instance_id) == ("load", IDS[1])
        assert "requested while loaded nowhere" in decision.reason
        assert "loaded in" in decision.reason
        count = h.registry.get_sample_value(
            "pointsman_router_model_load_duration_seconds_count", {"model": "echo"}
        )
        assert count == 1.0
        placement = h.controller.model_placement("echo")
        assert placement.copies == 1 and placement.target_copies == 1


@pytest.mark.triton
@pytest.mark.asyncio
async def test_a_failed_load_is_retried_elsewhere_with_growing_backoff(tritons: Tritons) -> None:
    await _arrange(tritons, {IDS[0]: {"codegen"}, IDS[1]: {"echo"}})
    async with _harness(tritons, PlacementPolicy(churn_guard_s=60.0)) as h:
        assert await h.controller.request_and_wait("broken", 0.1) is None
        await _until(lambda: len(h.control.failed_loads) >= 3, 30, "three failed loads")
        t1 = h.control.failed_loads[0][0]
        # triton-1 has more headroom (46 MiB used against 144): tried first, then the other,
        # then triton-1 again once its 1 s backoff has passed. In the order the loads
        # started: on a busy machine the third can fail before the second does.
        starts = [(t, iid) for t, op, m, iid in h.control.calls if op == "load" and m == "broken"]
        assert [iid for _, iid in starts[:3]] == [IDS[1], IDS[0], IDS[1]], starts
        assert starts[2][0] >= t1 + 1.0 - 0.05
        assert h.controller.executor.failures.failures("broken", IDS[1]) == 2
        decision = h.controller.decisions["broken"]
        assert decision.action == "load"
        assert "broken on purpose: cannot initialise" in decision.reason
        backoffs = {(b.model, b.instance_id) for b in h.controller.executor.backoffs()}
        assert ("broken", IDS[1]) in backoffs  # 2 s now: 2 failures in a row
        assert h.holders("broken") == set()
        assert h.holders("echo") == {IDS[1]} and h.holders("codegen") == {IDS[0]}


@pytest.mark.triton
@pytest.mark.asyncio
async def test_demand_grows_copies_then_a_drained_unload_shrinks_them(tritons: Tritons) -> None:
    await _arrange(tritons, {IDS[0]: {"codegen"}, IDS[1]: {"echo"}})
    policy = PlacementPolicy(
        keep_warm_s=30.0, churn_guard_s=2.0, scale_down_cooldown_s=2.0, scale_down_utilisation=0.8
    )
    async with _harness(tritons, policy, capacity={"codegen": 4.0}, forecast_horizon_s=0.5) as h:
        traffic = Traffic(h.book, "codegen", tritons.address, rate_rps=10.0)
        try:
            # 10 rps from Triton's counters > 1 copy x 4 rps: a second copy, on triton-1.
            await _until(lambda: h.holders("codegen") == set(IDS), 30, "a second copy")
            await _until(lambda: len(h.book.tables["codegen"].candidates) == 2, 5, "routes to both")
            grown = h.controller.decisions["codegen"]
            assert (grown.action, grown.instance_id) == ("load", IDS[1])
            assert "> 1 copy x 4 rps" in grown.reason  # "demand 9.8 rps > ..." or forecast
            assert h.controller.model_placement("codegen").demand_rps > 4.0
            # Demand falls to 0.5 rps <= 80% of 1 copy x 4 rps: after the 2 s cool-down one
            # copy goes, drained first, while requests keep flowing.
            traffic.rate_rps = 0.5
            await _until(
                lambda: len(h.holders("codegen")) == 1,
                30,
                "back to one copy",
                lambda: (
                    h.controller.last_plan and h.controller.last_plan.decision("codegen"),
                    h.controller.executor.jobs,
                ),
            )
            # Triton shows it UNLOADING for a second or so; then the unload settles.
            await _until(lambda: not h.book.draining, 10, "drained pair released")
            await asyncio.sleep(0.5)
        finally:
            traffic.stop()
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.sent > 30
        unloads = [v for v in h.control.unload_views if v[0] == "codegen"]
        assert len(unloads) == 1
        _, iid, routed, draining = unloads[0]
        assert not routed and draining  # out of the route table before Triton unloads
        assert h.book.draining == set()
        assert [c.instance_id for c in h.book.tables["codegen"].candidates] == list(
            h.holders("codegen")
        )
        shrunk = h.controller.decisions["codegen"]
        assert (shrunk.action, shrunk.instance_id) == ("unload", iid), (shrunk, h.control.calls)
        assert "2 -> 1" in shrunk.reason


@pytest.mark.triton
@pytest.mark.asyncio
async def test_lru_eviction_makes_room_once_the_churn_guard_allows(tritons: Tritons) -> None:
    # 144 + 46 MiB on each: codegen_stream (72 MiB) fits nowhere without an eviction.
    await _arrange(tritons, {IDS[0]: {"codegen", "echo"}, IDS[1]: {"codegen", "echo"}})
    policy = PlacementPolicy(keep_warm_s=30.0, churn_guard_s=4.0, scale_down_cooldown_s=60.0)
    async with _harness(tritons, policy) as h:
        # echo is used on triton-0 only and codegen on both: echo on triton-1 is the LRU copy.
        flows = [
            Traffic(h.book, "echo", tritons.address, 3.0, pinned=IDS[0]),
            Traffic(h.book, "codegen", tritons.address, 3.0, pinned=IDS[0]),
            Traffic(h.book, "codegen", tritons.address, 3.0, pinned=IDS[1]),
        ]
        try:
            await asyncio.sleep(1.0)
            started = time.monotonic()
            h.controller.request_model("codegen_stream")
            await asyncio.sleep(1.5)
            # Every copy was first seen under 4 s ago: the churn guard protects them all.
            assert h.control.calls == []
            reason = h.controller.model_placement("codegen_stream").last_decision.reason
            assert "cannot place" in reason and "churn guard" in reason
            snapshot = await h.controller.wait_for_model("codegen_stream", 20.0)
            assert snapshot is not None
            assert time.monotonic() - started >= 4.0 - 0.3
        finally:
            for flow in flows:
                flow.stop()
        assert all(f.failures == [] for f in flows), [f.failures[:3] for f in flows]
        assert [(op, m, i) for _, op, m, i in h.control.calls] == [
            ("unload", "echo", IDS[1]),
            ("load", "codegen_stream", IDS[1]),
        ]
        assert h.control.unload_views == [("echo", IDS[1], False, True)]
        assert h.holders("codegen_stream") == {IDS[1]}
        assert h.holders("echo") == {IDS[0]} and h.holders("codegen") == set(IDS)
        decision = h.controller.decisions["codegen_stream"]
        assert decision.action == "load" and "after evicting echo" in decision.reason
        assert h.controller.decisions["echo"].reason == "evict LRU to fit codegen_stream"
        assert tritons.watchdog.peak[IDS[1]] <= BUDGET
