"""What the collector derives from successive scrapes of Triton's cumulative counters.

`RequestDelta`: requests one instance answered per model version between two scrapes (what
placement measures demand from); `CounterWindow`: inferences, executions and prefix-cache
blocks per model over the last seconds of scrapes (throughput, average batch size, hit
ratio); `GpuMemoryReading`: the latest nv_gpu_memory_used_bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CounterWindow",
    "GpuMemoryReading",
    "RequestDelta",
    "request_increases",
]


@dataclass(frozen=True, slots=True)
class RequestDelta:
    """Requests of one model version that one instance answered between two scrapes."""

    instance_id: str
    model: str
    version: str
    count: int
    # Clock time of the later scrape.
    at: float


@dataclass(frozen=True, slots=True)
class GpuMemoryReading:
    """nv_gpu_memory_used_bytes of one instance (all its GPUs) at one scrape."""

    at: float
    used_bytes: int


def request_increases(
    previous: Mapping[tuple[str, str], float], current: Mapping[tuple[str, str], float]
) -> dict[tuple[str, str], int]:
    """Requests answered per (model, version) between two scrapes of Triton's counters, with
    Prometheus `increase` semantics: a series never seen before started from zero (a version
    just loaded), and a series that went down was reset (Triton restarted, or the version was
    unloaded and loaded again), so its current value is all it counted since. Never negative;
    zero increases are left out. `previous` should hold the last value of every series ever
    seen, not only of the last scrape: series of a version come and go around its unload, and
    one that comes back with its old value has counted nothing new."""
    increases: dict[tuple[str, str], int] = {}
    for key, value in current.items():
        before = previous.get(key, 0.0)
        increase = value - before if value >= before else value
        if increase >= 1:
            increases[key] = int(increase)
    return increases


@dataclass(frozen=True, slots=True)
class _Counters:
    """Triton's cumulative per-model counters at one scrape, one mapping per series."""

    at: float
    series: tuple[Mapping[str, float], ...]


class CounterWindow:
    """Per-model counters of the scrapes of the last `window_s` seconds (at least two), for
    the same series at every scrape (the collector's: nv_inference_count, the batch items;
    nv_inference_exec_count, the batches; the prefix cache's lookups and hits)."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._scrapes: deque[_Counters] = deque()

    def add(self, at: float, *series: Mapping[str, float]) -> None:
        self._scrapes.append(_Counters(at, series))
        while len(self._scrapes) > 2 and at - self._scrapes[0].at > self._window_s:
            self._scrapes.popleft()

    def increases(self) -> tuple[float, list[dict[str, float]]]:
        """(seconds, per series the increase by model) over the window; (0.0, []) before two
        scrapes. A model new in the window started from zero; a counter that went down
        (Triton restarted, or the model reloaded) counts as no increase."""
        if len(self._scrapes) < 2 or self._scrapes[-1].at <= self._scrapes[0].at:
            return 0.0, []
        first, last = self._scrapes[0], self._scrapes[-1]
        return last.at - first.at, [
            {m: max(0.0, c - before.get(m, 0.0)) for m, c in now.items()}
            for before, now in zip(first.series, last.series, strict=True)
        ]
