"""Loads, unloads and the final placement, counted the same way for every system.

`PlacementWatcher` polls each Triton's repository index (a few times a second, on a thread)
and records every change of the set of READY models per instance as an event, so "loads made"
and "time to converge" mean the same for Pointsman (whose router loads), for the baseline that
loads on a miss and for those that never load after start. Loads shorter than one poll
interval can be missed; the interval is in the result.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tritonclient.grpc as grpcclient

from app.triton import TritonSpec

__all__ = ["LoadCounts", "PlacementEvent", "PlacementWatcher", "load_counts"]


@dataclass(frozen=True, slots=True)
class PlacementEvent:
    at_s: float  # on the watcher's clock
    instance: str
    model: str
    loaded: bool  # True: became READY; False: stopped being READY


@dataclass(frozen=True, slots=True)
class LoadCounts:
    loads: int  # models that became READY on an instance in the window
    unloads: int
    delayed_requests: int  # requests that waited for a load (the system's own exact count)
    converge_s: float  # from the window's reference point to its last placement change; 0: none

    def to_dict(self) -> dict[str, float]:
        return {
            "loads": self.loads,
            "unloads": self.unloads,
            "delayed_requests": self.delayed_requests,
            "converge_s": self.converge_s,
        }


def load_counts(
    events: Sequence[PlacementEvent], start_s: float, end_s: float, reference_s: float, delayed: int
) -> LoadCounts:
    """Counts of the events in [start_s, end_s]; convergence is measured from `reference_s`
    (the window's start, or a popularity shift within it) to the last change after it."""
    window = [e for e in events if start_s <= e.at_s <= end_s]
    after = [e.at_s for e in window if e.at_s >= reference_s]
    return LoadCounts(
        loads=sum(e.loaded for e in window),
        unloads=sum(not e.loaded for e in window),
        delayed_requests=delayed,
        converge_s=max(after) - reference_s if after else 0.0,
    )


class PlacementWatcher:
    """Polls the repository indexes of `tritons` while the `with` block runs."""

    def __init__(
        self,
        tritons: Sequence[TritonSpec],
        *,
        interval_s: float = 0.2,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.interval_s = interval_s
        self._tritons = list(tritons)
        self._clock = clock
        self._ready: dict[str, frozenset[str]] = {}
        self.events: list[PlacementEvent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}

    def _read(self, spec: TritonSpec) -> frozenset[str] | None:
        client = self._clients.setdefault(
            spec.instance_id, grpcclient.InferenceServerClient(spec.grpc_address)
        )
        try:
            index = client.get_model_repository_index(client_timeout=2.0)
        except Exception:  # an instance that does not answer keeps its last known state
            return None
        return frozenset(m.name for m in index.models if m.state == "READY")

    def poll(self) -> None:
        for spec in self._tritons:
            ready = self._read(spec)
            if ready is None:
                continue
            now = self._clock()
            before = self._ready.get(spec.instance_id)
            self._ready[spec.instance_id] = ready
            if before is None:
                continue  # the first reading is the starting state, not a change
            for model in sorted(ready - before):
                self.events.append(PlacementEvent(now, spec.instance_id, model, True))
            for model in sorted(before - ready):
                self.events.append(PlacementEvent(now, spec.instance_id, model, False))

    def changed_within(self, seconds: float) -> bool:
        """Whether the placement changed in the last `seconds` (on the watcher's clock)."""
        return any(e.at_s >= self._clock() - seconds for e in self.events)

    def placement(self) -> dict[str, list[str]]:
        """Per instance, the READY models at the last poll."""
        return {instance: sorted(models) for instance, models in sorted(self._ready.items())}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> PlacementWatcher:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll()
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
