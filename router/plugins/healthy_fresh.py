"""Filter `healthy-fresh`: keep the instances that are healthy and recently refreshed.

Inputs: `cycle.now`; per candidate `instance.healthy` and `instance.refreshed_at`.
Rule: keep a candidate when `instance.healthy` and `cycle.now - instance.refreshed_at <=
stale_after_s`. A stale view is unusable: the instance may have died or filled up since, so it is
dropped rather than trusted. A never-refreshed instance is unhealthy (`healthy` defaults to False).
Parameters: `stale_after_s` (seconds, > 0, default 1.0): how old a view may be; set it to a few
refresh intervals so one late refresh does not drop an instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import Candidate, InstanceSnapshot, SchedulingCycle, SnapshotField
from router.plugins.params import read_number, reject_unknown

__all__ = ["HealthyFreshFilter"]


@dataclass(frozen=True, slots=True)
class HealthyFreshFilter:
    TYPE_NAME: ClassVar[str] = "healthy-fresh"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset(
        {SnapshotField.HEALTHY, SnapshotField.REFRESHED_AT}
    )

    name: str = TYPE_NAME
    stale_after_s: float = 1.0

    def filter(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if self._usable(c.instance, cycle.now)]

    def _usable(self, instance: InstanceSnapshot, now: float) -> bool:
        return instance.healthy and now - instance.refreshed_at <= self.stale_after_s

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> HealthyFreshFilter:
        reject_unknown(params, ("stale_after_s",))
        return cls(
            name=name, stale_after_s=read_number(params, "stale_after_s", 1.0, positive=True)
        )
