"""Filter `model-ready`: keep the instances that can serve the requested model now.

Inputs: `request.model_name` and `request.model_version` (empty = any version); per candidate
`instance.models[model].ready_versions` and `.loading_versions`.
Rule: keep the candidates where the model (the pinned version, when one is pinned) is ready.
If it is ready nowhere, keep instead the candidates where it is loading, so a cold request can
wait for a load already under way rather than fail; if it is loading nowhere either, nothing
survives and the router reports that no instance is ready.
Parameters: none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from router.contracts import Candidate, SchedulingCycle, SnapshotField
from router.plugins.model_state import model_loading_on, model_ready_on
from router.plugins.params import reject_unknown

__all__ = ["ModelReadyFilter"]


@dataclass(frozen=True, slots=True)
class ModelReadyFilter:
    TYPE_NAME: ClassVar[str] = "model-ready"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset(
        {SnapshotField.READY_VERSIONS, SnapshotField.LOADING_VERSIONS}
    )
    # What it keeps has the model ready or loading (see router.contracts.Filter).
    KEEPS_ONLY_HOLDERS: ClassVar[bool] = True

    name: str = TYPE_NAME

    def filter(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[Candidate]:
        ready = [c for c in candidates if model_ready_on(c, cycle.request)]
        if ready:
            return ready
        return [c for c in candidates if model_loading_on(c, cycle.request)]

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> ModelReadyFilter:
        reject_unknown(params, ())
        return cls(name=name)
