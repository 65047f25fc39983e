"""The placement executor: carries out the planner's actions against Triton, one at a time per
instance, in the order planned.

    Load    runs after the Unloads named in its `after_unloads` (they come before it in the
            instance's lane); when one of them failed it is not attempted, as the memory it was
            to fit into is still taken. Reads the instance's GPU memory, `RepositoryModelLoad`,
            then reads it again once Triton's figure has caught up (`gpu_settle_s`): the rise is
            the footprint measured. Without GPU metrics nothing is measured.
    Unload  adds the pair to `RouteBook.draining` and asks for a route rebuild; waits until
            the model's route table no longer lists the instance, then `drain_grace_s` more
            (sidecars drop the route; at least two route propagations), then until Triton
            holds no queued request of the model there. A model with a sequence batcher (its
            ModelConfig) may hold live sequences there, which sidecars keep sending to it:
            the drain then also waits until no request of the model reached the instance for
            its `max_sequence_idle_microseconds` (plus `sequence_idle_margin_s`, as the
            request counters arrive late), when Triton itself would have ended them. Every
            wait ends at `max_drain_s`. Then `RepositoryModelUnload`, and a wait until
            Triton's index shows every version gone (UNLOADING still holds memory).

A REQUESTED load (a request waits for it) goes ahead of the proactive work still queued on its
instance, together with the unloads it waits for.

A job is in progress from `submit` until the fleet snapshot shows its effect (the model ready
there, or gone from there) or `settle_timeout_s` passes: in between, the planner would see the
pair neither in progress nor in the snapshot and plan it again. A draining pair leaves
`RouteBook.draining` only when its unload has settled or failed.

A load that fails puts the pair in backoff (`LoadFailures`): base x 2^(failures - 1), at most
`backoff_max_s`; failures are remembered for `failure_memory_s`, and a success forgets them.
The planner places the copy elsewhere meanwhile.

Waits and durations use the event loop's real time; times the planner reads (backoffs, load
starts) use the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence

from opentelemetry import trace

from pointsman.clock import Clock
from router.contracts import FleetSnapshot
from router.datalayer.collector import GpuMemoryReading
from router.placement.actions import Action, Load, LoadPriority, Unload
from router.placement.control import ModelControl
from router.placement.inputs import LoadBackoff
from router.placement.jobs import ExecutorSettings, Job, JobState, LoadFailures
from router.routes import RouteBook

__all__ = ["PlacementExecutor"]

log = logging.getLogger(__name__)


class _NotStarted(Exception):
    """A load skipped because an eviction it needed failed: no backoff, the pair is fine."""


class PlacementExecutor:
    """Runs actions on per-instance lanes (module docstring).

    `snapshot` gives the current fleet view (queued requests, settling); `gpu_memory` an
    instance's latest GPU memory reading; `last_request_at` the clock time by which Triton's
    counters last showed a request of (model, instance id), None if never; `on_routes_changed`
    asks for a route rebuild (the router's route loop; a rebuild reads `book.draining`);
    `on_finished` hears of each job once Triton has done it or it failed (the controller records
    decisions and footprints there).
    """

    def __init__(
        self,
        control: ModelControl,
        *,
        book: RouteBook,
        clock: Clock,
        snapshot: Callable[[], FleetSnapshot],
        gpu_memory: Callable[[str], GpuMemoryReading | None] = lambda _: None,
        last_request_at: Callable[[str, str], float | None] = lambda _, __: None,
        on_routes_changed: Callable[[], None] = lambda: None,
        on_finished: Callable[[Job], None] = lambda _: None,
        settings: ExecutorSettings | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.settings = settings or ExecutorSettings()
        # None when tracing is off; else every action is a span (its own trace).
        self._tracer = tracer
        self._control = control
        self._book = book
        self._clock = clock
        self._snapshot = snapshot
        self._gpu_memory = gpu_memory
        self._last_request_at = last_request_at
        self._on_routes_changed = on_routes_changed
        self._on_finished = on_finished
        self.failures = LoadFailures(
            base_s=self.settings.backoff_base_s,
            max_s=self.settings.backoff_max_s,
            memory_s=self.settings.failure_memory_s,
        )
        self._jobs: list[Job] = []
        self._lanes: dict[str, deque[Job]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}

    # --- what the planner reads ------------------------------------------------------------

    @property
    def jobs(self) -> tuple[Job, ...]:
        """Jobs in progress, in submission order."""
        return tuple(j for j in self._jobs if j.in_progress)

    def in_progress(self) -> tuple[Action, ...]:
        return tuple(j.action for j in self._jobs if j.in_progress)

    def backoffs(self) -> tuple[LoadBackoff, ...]:
        return self.failures.backoffs(self._clock())

    # --- submitting ------------------------------------------------------------------------

    def submit(self, actions: Sequence[Action], snapshot: FleetSnapshot) -> list[Job]:
        """Queues `actions` in order on their instances' lanes; returns their jobs."""
        now = self._clock()
        batch: list[Job] = []
        for action in actions:
            inst = snapshot.instance(action.instance_id)
            job = Job(action, inst.grpc_address if inst else "", now)
            if isinstance(action, Load):
                job.after = tuple(
                    j
                    for j in (*batch, *self._jobs)
                    if isinstance(j.action, Unload)
                    and j.in_progress
                    and j.instance_id == action.instance_id
                    and j.model in action.after_unloads
                )
            batch.append(job)
            self._enqueue(job)
        self._jobs.extend(batch)
        return batch

    def _enqueue(self, job: Job) -> None:
        iid = job.instance_id
        lane = self._lanes.setdefault(iid, deque())
        action = job.action
        if isinstance(action, Load) and action.priority >= LoadPriority.REQUESTED:
            # Ahead of queued proactive work, with the evictions it waits for, in their order.
            group = [j for j in lane if j in job.after]
            rest = [j for j in lane if j not in job.after]
            lane.clear()
            lane.extend([*group, job, *rest])
        else:
            lane.append(job)
        worker = self._workers.get(iid)
        if worker is None or worker.done():
            self._workers[iid] = asyncio.create_task(self._work(iid), name=f"placement-{iid}")

    async def _work(self, instance_id: str) -> None:
        lane = self._lanes[instance_id]
        while lane:
            await self._run(lane.popleft())

    # --- running ---------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        if self._tracer is None:
            await self._run_job(job)
            return
        action = job.action
        kind = "load" if isinstance(action, Load) else "unload"
        with self._tracer.start_as_current_span(
            f"placement.{kind}",
            attributes={
                "pointsman.model": job.model,
                "pointsman.target": job.instance_id,
                "pointsman.reason": action.reason,
            },
        ) as span:
            await self._run_job(job)
            span.set_attribute("pointsman.outcome", job.state.value)
            if job.state is JobState.FAILED:
                span.set_status(trace.StatusCode.ERROR, job.error)

    async def _run_job(self, job: Job) -> None:
        job.state = JobState.RUNNING
        job.started_at = self._clock()
        try:
            if not job.address:
                raise _NotStarted(f"{job.instance_id} is no longer in the fleet")
            if isinstance(job.action, Load):
                await self._load(job)
            else:
                await self._unload(job, job.action)
        except asyncio.CancelledError:
            job.state, job.error = JobState.FAILED, "cancelled"
            self._book.draining.discard((job.model, job.instance_id))
            raise
        except Exception as exc:  # every failure becomes the job's outcome, never a crash
            job.state, job.error = JobState.FAILED, str(exc) or type(exc).__name__
            job.finished_at = self._clock()
            if isinstance(job.action, Load) and not isinstance(exc, _NotStarted):
                self.failures.record(job.model, job.instance_id, job.finished_at)
            if isinstance(job.action, Unload):
                self._book.draining.discard((job.model, job.instance_id))
                self._on_routes_changed()
            log.warning("placement: %s", job.error)
        else:
            job.state = JobState.SETTLING
            job.finished_at = self._clock()
            job._settling_since = asyncio.get_running_loop().time()
            if isinstance(job.action, Load):
                self.failures.succeeded(job.model, job.instance_id)
        try:
            self._on_finished(job)
        except Exception:  # a bug in the listener must not stop the lane
            log.exception("placement: on_finished failed for %s", job)

    async def _load(self, job: Job) -> None:
        failed = [j.model for j in job.after if j.state is JobState.FAILED]
        if failed:
            raise _NotStarted(
                f"load {job.model} on {job.instance_id} not started: "
                f"unloading {', '.join(failed)} failed"
            )
        loop = asyncio.get_running_loop()
        before = self._gpu_memory(job.instance_id)
        started = loop.time()
        await self._control.load(job.address, job.model)
        job.load_seconds = loop.time() - started
        if before is not None:
            job.measured_bytes = await self._measure(job.instance_id, before)

    async def _measure(self, instance_id: str, before: GpuMemoryReading) -> int | None:
        """GPU memory risen since `before`, from a reading `gpu_settle_s` after now."""
        settings = self.settings
        wanted_at = self._clock() + settings.gpu_settle_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * settings.gpu_settle_s + 2.0
        while loop.time() < deadline:
            after = self._gpu_memory(instance_id)
            if after is not None and after.at >= wanted_at:
                rise = after.used_bytes - before.used_bytes
                return rise if rise > 0 else None
            await asyncio.sleep(settings.poll_interval_s)
        return None

    async def _unload(self, job: Job, action: Unload) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        key = (action.model, action.instance_id)
        self._book.draining.add(key)
        self._on_routes_changed()
        started = self._clock()
        deadline = loop.time() + settings.max_drain_s
        while self._routed(*key) and loop.time() < deadline:
            await asyncio.sleep(settings.poll_interval_s)
        if self._routed(*key):
            log.warning("placement: %s still routed to %s when unloading", *key)
        await asyncio.sleep(settings.drain_grace_s)
        while self._queued(*key) and loop.time() < deadline:
            await asyncio.sleep(settings.poll_interval_s)
        idle_s = await self._sequence_idle_s(job.address, action.model)
        if idle_s is not None:
            idle_s += settings.sequence_idle_margin_s
            while not self._idle(*key, idle_s, started) and loop.time() < deadline:
                await asyncio.sleep(settings.poll_interval_s)
            if not self._idle(*key, idle_s, started):
                log.warning("placement: %s may hold live sequences on %s when unloading", *key)
        await self._control.unload(job.address, action.model)
        await self._control.wait_unloaded(job.address, action.model, settings.unload_timeout_s)

    def _routed(self, model: str, instance_id: str) -> bool:
        table = self._book.tables.get(model)
        return table is not None and any(c.instance_id == instance_id for c in table.candidates)

    async def _sequence_idle_s(self, address: str, model: str) -> float | None:
        """The model's sequence idle time, None without a sequence batcher (or unreadable)."""
        try:
            return await self._control.sequence_idle_s(address, model)
        except Exception as exc:  # the unload goes ahead; a live sequence may be cut
            log.warning("placement: no sequence drain for %s on %s: %s", model, address, exc)
            return None

    def _idle(self, model: str, instance_id: str, idle_s: float, started: float) -> bool:
        """Whether no request of the model reached the instance for `idle_s`: a request
        counted before the drain started has had `idle_s` since, and the drain has lasted
        the margin, so a request just before it shows in the counters if there was one."""
        now = self._clock()
        if now - started < self.settings.sequence_idle_margin_s:
            return False
        last = self._last_request_at(model, instance_id)
        return last is None or now - last >= idle_s

    def _queued(self, model: str, instance_id: str) -> int:
        inst = self._snapshot().instance(instance_id)
        loaded = inst.model(model) if inst else None
        return loaded.pending_requests if loaded else 0

    # --- settling --------------------------------------------------------------------------

    def reconcile(self, snapshot: FleetSnapshot) -> list[Job]:
        """Retires jobs whose effect `snapshot` shows (or that waited too long); returns them."""
        now = asyncio.get_running_loop().time()
        retired = []
        for job in self._jobs:
            if job.state is not JobState.SETTLING:
                continue
            inst = snapshot.instance(job.instance_id)
            loaded = inst.model(job.model) if inst else None
            if isinstance(job.action, Load):
                shown = loaded is not None and loaded.is_ready
            else:
                shown = loaded is None
            if shown or now - job._settling_since >= self.settings.settle_timeout_s:
                job.state = JobState.DONE
                retired.append(job)
                if isinstance(job.action, Unload):
                    self._book.draining.discard((job.model, job.instance_id))
        if any(isinstance(j.action, Unload) for j in retired):
            self._on_routes_changed()
        self._jobs = [j for j in self._jobs if j.in_progress]
        return retired

    async def stop(self) -> None:
        """Cancels every lane; unfinished unloads leave `draining`."""
        workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        for job in self._jobs:
            if isinstance(job.action, Unload):
                self._book.draining.discard((job.model, job.instance_id))
        self._lanes.clear()
        self._jobs = []
