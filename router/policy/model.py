"""The policy's data model: what a validated policy file says, typed and frozen.

`Policy` is the whole file; `ModelPolicy` is one model's entry, and doubles as the schema the
reader (pointsman/config/) reads that entry by: its fields, types, defaults and bounds are the
file's. `PriorityClass` (pointsman/priority.py) and `SessionPolicy` (pointsman/sessions.py) are
the kernel's, shared with the sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from pointsman.config import rule
from pointsman.errors import ConfigError
from pointsman.priority import PriorityClass
from pointsman.sessions import SessionPolicy
from pointsman.versions import VersionRules
from router.demand import DemandWindows
from router.placement import ModelSpec, PlacementPolicy
from router.scheduling import SchedulingProfile

__all__ = ["DEFAULT_SOURCE", "ModelPolicy", "Policy", "PriorityClass", "SessionPolicy"]

# `Policy.source` of the built-in policy.
DEFAULT_SOURCE: Final = "default"


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """What the policy says of one model. A model the file does not list gets the defaults."""

    min_copies: int = field(default=0, metadata=rule(minimum=0))
    # None: as many copies as there are healthy instances.
    max_copies: int | None = field(default=None, metadata=rule(minimum=0))
    # None: the policy's default_per_copy_capacity_rps.
    per_copy_capacity_rps: float | None = field(default=None, metadata=rule(above=0))
    # Bytes one copy takes, replacing the declared footprint; None: declared (or measured).
    memory_bytes: int | None = field(default=None, metadata=rule(minimum=1))
    versions: VersionRules = field(default_factory=VersionRules)

    def __post_init__(self) -> None:
        if self.max_copies is not None and self.max_copies < self.min_copies:
            raise ConfigError(
                f"max_copies: must be >= min_copies ({self.min_copies}), got {self.max_copies}"
            )


_DEFAULT_MODEL = ModelPolicy()


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    """The whole policy, validated. Compare policies by `version`."""

    # The scheduling section with every section filled in (read-only; build_profile takes it).
    scheduling_data: Mapping[str, Any]
    profile: SchedulingProfile
    placement: PlacementPolicy
    placement_interval_s: float
    placement_enabled: bool
    default_per_copy_capacity_rps: float
    # Footprint of a model neither measured nor declared nor set here; 0 = never placed.
    default_memory_bytes: int
    models: Mapping[str, ModelPolicy]
    priority_classes: Mapping[str, PriorityClass]
    default_priority_class: str
    # Session affinity: the header that names a session, and when its holder is saturated.
    sessions: SessionPolicy
    demand: DemandWindows
    # Short content hash of the normalised data.
    version: str
    # The file it came from, or DEFAULT_SOURCE.
    source: str
    # The text as written (comments included); the effective policy is `effective_yaml()`.
    yaml_text: str
    # The normalised data the version hashes (read-only).
    data: Mapping[str, Any]

    def model(self, name: str) -> ModelPolicy:
        return self.models.get(name, _DEFAULT_MODEL)

    def version_rules(self, model_name: str) -> VersionRules:
        return self.model(model_name).versions

    def priority_class(self, name: str = "") -> PriorityClass:
        """The named class; the default class for "" or a name the policy does not know."""
        return self.priority_classes.get(name) or self.priority_classes[self.default_priority_class]

    def model_spec(
        self, name: str, footprint_bytes: int, *, measured: bool = False
    ) -> ModelSpec | None:
        """The placement planner's spec of `name`, or None when its footprint is unknown (0).

        `footprint_bytes` is what the router knows of one copy (0 if nothing): a measured figure
        (`measured=True`) wins; else the model's `memory_bytes` here, else `footprint_bytes`
        (declared), else `default_memory_bytes`.
        """
        model = self.model(name)
        if measured and footprint_bytes > 0:
            footprint = footprint_bytes
        elif model.memory_bytes is not None:
            footprint = model.memory_bytes
        elif footprint_bytes > 0:
            footprint = footprint_bytes
        else:
            footprint = self.default_memory_bytes
        if footprint <= 0:
            return None
        return ModelSpec(
            name=name,
            footprint_bytes=footprint,
            per_copy_capacity_rps=model.per_copy_capacity_rps or self.default_per_copy_capacity_rps,
            min_copies=model.min_copies,
            max_copies=model.max_copies,
        )

    def effective_yaml(self) -> str:
        """The normalised policy as YAML: every default written out. It parses back to a policy
        of the same version."""
        return yaml.safe_dump(_thaw(self.data), sort_keys=False, default_flow_style=False)


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value
