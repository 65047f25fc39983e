"""What the placement executor works on: its settings, the jobs it runs and their states, and
the backoffs failed loads impose (`LoadFailures`: base x 2^(failures - 1), at most `max_s`;
failures are remembered for `memory_s`, and a success forgets them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from router.placement.actions import Action
from router.placement.inputs import LoadBackoff

__all__ = ["ExecutorSettings", "Job", "JobState", "LoadFailures"]


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    # After the route table drops the instance: time for sidecars to drop it too.
    drain_grace_s: float = 0.5
    # The most an unload waits for routes to drop the instance, Triton's queue to empty and
    # (a sequence model) its live sequences to end.
    max_drain_s: float = 30.0
    # Added to a sequence model's idle time when waiting for its last request: the request
    # counters reach the executor up to a metrics scrape and a placement tick late.
    sequence_idle_margin_s: float = 2.0
    # The most an unload waits for Triton's index to show the model gone.
    unload_timeout_s: float = 60.0
    # The most a finished job waits for the fleet snapshot to show its effect.
    settle_timeout_s: float = 10.0
    # After a load, GPU memory is read again from a scrape at least this much later (Triton
    # refreshes its GPU figures every --metrics-interval-ms, 2 s by default).
    gpu_settle_s: float = 2.5
    backoff_base_s: float = 5.0
    backoff_max_s: float = 300.0
    failure_memory_s: float = 900.0
    poll_interval_s: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "drain_grace_s",
            "max_drain_s",
            "sequence_idle_margin_s",
            "unload_timeout_s",
            "settle_timeout_s",
            "gpu_settle_s",
            "backoff_base_s",
            "backoff_max_s",
            "failure_memory_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    # Triton did it; waiting for the fleet snapshot to show it.
    SETTLING = "settling"
    DONE = "done"
    FAILED = "failed"


_IN_PROGRESS = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.SETTLING})


@dataclass(eq=False)
class Job:
    """One action handed to the executor, and what became of it."""

    action: Action
    address: str
    # Injected clock.
    submitted_at: float
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    # A load: seconds RepositoryModelLoad took; bytes GPU memory rose by (None: not measured).
    load_seconds: float | None = None
    measured_bytes: int | None = None
    # A load: the unload jobs it waits for.
    after: tuple[Job, ...] = ()
    # Loop time when the job reached SETTLING.
    _settling_since: float = field(default=0.0, repr=False)

    @property
    def model(self) -> str:
        return self.action.model

    @property
    def instance_id(self) -> str:
        return self.action.instance_id

    @property
    def key(self) -> tuple[str, str]:
        """(model, instance id)."""
        return (self.action.model, self.action.instance_id)

    @property
    def in_progress(self) -> bool:
        return self.state in _IN_PROGRESS


class LoadFailures:
    """Failed loads per (model, instance) and the backoffs they impose (module docstring)."""

    def __init__(self, *, base_s: float, max_s: float, memory_s: float) -> None:
        self._base_s = base_s
        self._max_s = max_s
        self._memory_s = memory_s
        # (model, instance) -> (failures in a row, last failure time, backoff until)
        self._failures: dict[tuple[str, str], tuple[int, float, float]] = {}

    def record(self, model: str, instance_id: str, now: float) -> float:
        """Counts a failure at `now`; returns the backoff it imposes, in seconds."""
        key = (model, instance_id)
        count, last, _ = self._failures.get(key, (0, now, now))
        count = count + 1 if now - last <= self._memory_s else 1
        backoff: float = min(self._max_s, self._base_s * 2.0 ** (count - 1))
        self._failures[key] = (count, now, now + backoff)
        return backoff

    def succeeded(self, model: str, instance_id: str) -> None:
        self._failures.pop((model, instance_id), None)

    def failures(self, model: str, instance_id: str) -> int:
        entry = self._failures.get((model, instance_id))
        return entry[0] if entry else 0

    def backoffs(self, now: float) -> tuple[LoadBackoff, ...]:
        """Backoffs still running at `now`; failures older than the memory are forgotten."""
        for key, (_, last, until) in list(self._failures.items()):
            if now > until and now - last > self._memory_s:
                del self._failures[key]
        return tuple(
            LoadBackoff(model, iid, until)
            for (model, iid), (_, _, until) in sorted(self._failures.items())
            if until > now
        )
