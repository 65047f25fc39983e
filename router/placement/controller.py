"""The placement controller: each tick, the planner's inputs from the fleet and its demand, one
plan, and its actions handed to the executor. The router's only writer of model placement.

A tick (`tick`, every `interval_s` in `run`, and at once on a cold request or a failed load):
 1. Demand: the requests Triton answered since the last tick (the collector's counter deltas,
    each at its scrape time) go into the `DemandTracker`, per model and served version; a
    delta also marks that copy used at that time (the LRU order).
 2. The executor retires jobs whose effect the snapshot shows.
 3. `PlanInputs`, from the snapshot:
      instance    budget as configured (0: never a target); measured use only from GPU metrics
                  (else 0: the models' own bytes count); load = inferences/s; healthy = healthy
                  and refreshed within `stale_after_s`
      copy        memory = footprint measured by the executor's GPU reading around its load,
                  else the declared bytes of its loaded versions, else the spec's footprint;
                  loaded_at = when our load started, else when first seen; last_used = the
                  latest scrape where its request counters moved, else loaded_at
      spec        `spec_for(model, footprint)` for every known model (the policy file), where
                  footprint = measured > declared (pointsman.memory_bytes x versions, as seen
                  when fully loaded anywhere) > `unknown_footprint_bytes`
      requested   models a request asked for (`request_model`) while ready nowhere, until
                  they are ready somewhere or `cold_request_ttl_s` passes
      demand      the tracker's snapshot, with each model's requests queued in Triton now
                  (pending_requests of healthy instances): the copies' backlog
      backoffs, in_progress   from the executor
 4. The plan's actions go to the executor; each model's latest acting decision is kept for
    ListModels (`model_placement`).

Load times of the loads it makes go to `RouterMetrics.observe_model_load` (exact: Triton's
RepositoryModelLoad returns when the load is done); `on_model_seen_loaded` forwards the
collector's sighted load times of loads it did not make.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping

from opentelemetry import trace

from pointsman.clock import Clock
from router.contracts import FleetSnapshot
from router.datalayer.collector import RequestDelta
from router.demand import DemandSnapshot, DemandTracker, DemandWindows, ModelDemand
from router.metrics import RouterMetrics
from router.placement.actions import Load, Unload
from router.placement.control import ModelControl
from router.placement.controller_types import (
    ControllerSettings,
    FleetSource,
    ModelPlacement,
    PlacementDecision,
    SpecProvider,
)
from router.placement.executor import PlacementExecutor
from router.placement.inputs import ModelSpec, PlacementPolicy, PlanInputs
from router.placement.jobs import ExecutorSettings, Job, JobState
from router.placement.planner import PlacementPlanner, Plan
from router.placement.records import CopyRecords, queued_requests
from router.routes import RouteBook

__all__ = [
    "ControllerSettings",
    "FleetSource",
    "ModelPlacement",
    "PlacementController",
    "PlacementDecision",
    "SpecProvider",
]

log = logging.getLogger(__name__)

# A sighted load (collector: LOADING then READY) this soon after one of our own loads of the
# same model is ours, already measured exactly.
_OWN_LOAD_WINDOW_S = 30.0


class PlacementController:
    """See the module docstring. One per router, on the router's event loop.

    `on_routes_changed` must make the router rebuild its route tables soon (the router passes
    `collector.changed.set`): an unload waits until the tables leave the instance out.
    """

    def __init__(
        self,
        source: FleetSource,
        book: RouteBook,
        control: ModelControl,
        *,
        clock: Clock,
        tracker: DemandTracker | None = None,
        planner: PlacementPlanner | None = None,
        metrics: RouterMetrics | None = None,
        spec_for: SpecProvider | None = None,
        placement_policy: Callable[[], PlacementPolicy] | None = None,
        demand_windows: Callable[[], DemandWindows] | None = None,
        on_routes_changed: Callable[[], None] = lambda: None,
        settings: ControllerSettings | None = None,
        executor_settings: ExecutorSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.settings = settings or ControllerSettings()
        self._source = source
        self._book = book
        self._clock = clock
        self._wall_clock = wall_clock
        self.tracker = tracker or DemandTracker(clock)
        # Never a shared fixed seed: two routers must not draw the same instances.
        self.planner = planner or PlacementPlanner(random.Random())
        self._metrics = metrics
        self._spec_for = spec_for or self._default_spec
        self._placement_policy = placement_policy or PlacementPolicy
        # None: the tracker keeps its windows and the settings' forecast horizon applies.
        self._demand_windows = demand_windows
        self.records = CopyRecords(self.settings.unknown_footprint_bytes)
        self.executor = PlacementExecutor(
            control,
            book=book,
            clock=clock,
            snapshot=source.snapshot,
            gpu_memory=source.gpu_memory,
            last_request_at=self.records.last_used,
            on_routes_changed=on_routes_changed,
            on_finished=self._finished,
            settings=executor_settings,
            tracer=tracer,
        )
        self._wake = asyncio.Event()
        # model -> clock time its cold request expires.
        self._cold: dict[str, float] = {}
        self._decisions: dict[str, PlacementDecision] = {}
        # model -> loop time until which a sighted load of it is ours.
        self._own_loads: dict[str, float] = {}
        self.last_plan: Plan | None = None
        self.last_demand: DemandSnapshot | None = None
        self._last_plan_unix_ms = 0

    # --- the loop --------------------------------------------------------------------------

    async def run(
        self,
        interval_s: float | Callable[[], float],
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        """Ticks every `interval_s`, and at once when woken (a cold request, a failed load).
        Both arguments may be callables, read each round, so a policy reload applies."""
        while True:
            wait_s = interval_s() if callable(interval_s) else interval_s
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # races its inner wait, and the loop would then outlive its own shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
            self._wake.clear()
            if not enabled():
                continue
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop placement; the next tick tries again
                log.exception("placement tick failed")

    def wake(self) -> None:
        """Makes `run` tick now."""
        self._wake.set()

    async def stop(self) -> None:
        await self.executor.stop()

    async def tick(self, snapshot: FleetSnapshot | None = None) -> Plan:
        """One round (module docstring); `snapshot` defaults to the source's current one."""
        if snapshot is None:
            snapshot = self._source.snapshot()
        self._feed_demand(self._source.take_request_deltas())
        self.executor.reconcile(snapshot)
        inputs = self.build_inputs(snapshot)
        plan = self.planner.plan(inputs)
        self.last_plan, self.last_demand = plan, inputs.demand
        self._last_plan_unix_ms = int(self._wall_clock() * 1000)
        for job in self.executor.submit(plan.actions, snapshot):
            kind = "load" if isinstance(job.action, Load) else "unload"
            self._decide(job.model, kind, job.instance_id, job.action.reason)
        return plan

    # --- cold requests ---------------------------------------------------------------------

    def request_model(self, model: str) -> None:
        """A request waits for `model`, which no instance has ready: plan its load first, now."""
        self._cold[model] = self._clock() + self.settings.cold_request_ttl_s
        self._wake.set()

    async def wait_for_model(self, model: str, timeout_s: float) -> FleetSnapshot | None:
        """The first snapshot (polled) where `model` is ready on a healthy instance that is not
        draining it; None when `timeout_s` passes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            snapshot = self._source.snapshot()
            if self._ready_somewhere(snapshot, model):
                return snapshot
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(self.settings.poll_interval_s, remaining))

    async def request_and_wait(self, model: str, timeout_s: float) -> FleetSnapshot | None:
        """`request_model`, then `wait_for_model`: the cold path of PickTarget."""
        snapshot = self._source.snapshot()
        if self._ready_somewhere(snapshot, model):
            return snapshot
        self.request_model(model)
        return await self.wait_for_model(model, timeout_s)

    def _ready_somewhere(self, snapshot: FleetSnapshot, model: str) -> bool:
        return any(
            inst.healthy
            and (m := inst.model(model)) is not None
            and m.is_ready
            and (model, inst.instance_id) not in self._book.draining
            for inst in snapshot.instances
        )

    # --- inputs ----------------------------------------------------------------------------

    def build_inputs(self, snapshot: FleetSnapshot) -> PlanInputs:
        """The planner's inputs from `snapshot` and what the controller remembers."""
        now = self._clock()
        self.records.remember(snapshot, {j.key for j in self.executor.jobs}, now)
        names = set(snapshot.known_models)
        for inst in snapshot.instances:
            names.update(inst.models)
        specs = {}
        for name in sorted(names):
            spec = self._spec_for(name, self.footprint(name))
            if spec is not None:
                specs[name] = spec
        for model, expires in list(self._cold.items()):
            if expires <= now or self._ready_somewhere(snapshot, model):
                del self._cold[model]
        return PlanInputs(
            now=now,
            instances=tuple(
                self.records.instance_state(inst, specs, now, self.settings.stale_after_s)
                for inst in snapshot.instances
            ),
            specs=tuple(specs.values()),
            demand=self._demand_snapshot(queued_requests(snapshot)),
            requested_while_absent=frozenset(self._cold),
            backoffs=self.executor.backoffs(),
            in_progress=self.executor.in_progress(),
            policy=self._placement_policy(),
        )

    def _demand_snapshot(self, queued: Mapping[str, int]) -> DemandSnapshot:
        if self._demand_windows is None:
            return self.tracker.snapshot(self.settings.forecast_horizon_s, queued=queued)
        # A policy reload may change the windows; the tracker keeps its history across.
        self.tracker.reconfigure(self._demand_windows())
        return self.tracker.snapshot(queued=queued)

    def footprint(self, model: str) -> int:
        """Bytes one copy takes: measured, else declared, else `unknown_footprint_bytes`."""
        return self.records.footprint(model)

    def _feed_demand(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            self.tracker.record(delta.model, delta.version, delta.count, at=delta.at)
            self.records.used(delta.model, delta.instance_id, delta.at)

    def _default_spec(self, model: str, footprint_bytes: int) -> ModelSpec:
        return ModelSpec(model, footprint_bytes, self.settings.default_capacity_rps)

    # --- outcomes --------------------------------------------------------------------------

    def _finished(self, job: Job) -> None:
        key = (job.model, job.instance_id)
        action = job.action
        if isinstance(action, Load):
            self._own_loads[job.model] = asyncio.get_running_loop().time() + _OWN_LOAD_WINDOW_S
            if job.state is JobState.FAILED:
                self._load_failed(job)
                return
            self.records.loaded(key, job.started_at, job.measured_bytes)
            if job.load_seconds is not None and self._metrics is not None:
                self._metrics.observe_model_load(job.model, job.load_seconds)
            took = f" (loaded in {job.load_seconds:.1f} s)" if job.load_seconds else ""
            self._decide(job.model, "load", job.instance_id, action.reason + took)
        elif isinstance(action, Unload) and job.state is JobState.FAILED:
            self._decide(job.model, "unload", job.instance_id, f"unload failed: {job.error}")
            self._wake.set()

    def _load_failed(self, job: Job) -> None:
        backoff = next(
            (b for b in self.executor.backoffs() if (b.model, b.instance_id) == job.key),
            None,
        )
        if backoff is None:
            reason = f"load failed: {job.error}"
        else:
            wait = backoff.until - self._clock()
            failures = self.executor.failures.failures(job.model, job.instance_id)
            reason = (
                f"load failed ({failures} in a row): {job.error}; "
                f"not retried on {job.instance_id} for {wait:.0f} s"
            )
        self._decide(job.model, "load", job.instance_id, reason)
        self._wake.set()  # place it elsewhere now

    def on_model_seen_loaded(self, model: str, seconds: float) -> None:
        """The collector's `on_model_loaded` hook: load times of loads the controller did not
        make go to the metrics (its own are measured exactly when they finish)."""
        if self._metrics is None:
            return
        if self._own_loads.get(model, 0.0) > asyncio.get_running_loop().time():
            return
        if any(j.model == model and isinstance(j.action, Load) for j in self.executor.jobs):
            return
        self._metrics.observe_model_load(model, seconds)

    # --- what operators see ----------------------------------------------------------------

    def _decide(self, model: str, action: str, instance_id: str, reason: str) -> None:
        self._decisions[model] = PlacementDecision(
            model, action, instance_id, reason, self._clock(), int(self._wall_clock() * 1000)
        )

    @property
    def decisions(self) -> Mapping[str, PlacementDecision]:
        """Per model, the latest decision that acted on it (a load, an unload, a failure)."""
        return self._decisions

    def model_placement(self, model: str) -> ModelPlacement:
        """ListModels' figures for `model`, from the latest tick."""
        plan = self.last_plan
        decision = plan.decision(model) if plan is not None else None
        demand = self.last_demand.of(model) if self.last_demand else ModelDemand(model)
        last = self._decisions.get(model)
        if last is None:
            copies = decision.copies if decision else 0
            last = PlacementDecision(
                model,
                "keep" if copies else "none",
                "",
                decision.reason if decision else "not planned yet",
                plan.now if plan else self._clock(),
                self._last_plan_unix_ms,
            )
        return ModelPlacement(
            model=model,
            copies=decision.copies if decision else 0,
            target_copies=decision.target if decision else 0,
            demand_rps=demand.rate_rps,
            forecast_rps=demand.forecast_rps,
            last_decision=last,
        )
