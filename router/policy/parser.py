"""The policy file's parser: YAML text or plain data -> a validated `Policy`.

Each section is read by the one config reader (pointsman/config/), from the dataclass that
describes it: `placement` from PlacementPolicy's fields plus `_PlacementSection`'s, each model
from `ModelPolicy`, `demand` from DemandWindows, each priority class from PriorityClass. What no
dataclass's shape says (a version split is a mapping of version to weight; a class's name is its
key; windows left out shrink to the span) is read by a hook here. Scheduling is checked by
router.plugins.registry.build_profile. Every error is a ConfigError that starts with the
field's path, e.g. `models.codegen.versions.split["2"]: weight must be > 0, got 0`.

`Policy.version` is a short hash of the normalised data (defaults filled in, comments and key
order ignored), so two files that mean the same have the same version.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pointsman.config import (
    load_yaml,
    metadata_key,
    non_empty,
    read,
    read_fields,
    read_value,
    rule,
)
from pointsman.errors import ConfigError
from pointsman.priority import PriorityClass
from pointsman.sessions import SessionPolicy
from pointsman.versions import HeaderRule, VersionRules
from router.demand import DemandWindows
from router.placement import PlacementPolicy
from router.plugins.registry import DEFAULT_PROFILE_DATA, build_profile, default_registry
from router.policy.model import DEFAULT_SOURCE, ModelPolicy, Policy

__all__ = ["default_policy", "parse_policy", "parse_policy_file", "parse_policy_text"]

_DEFAULT_PRIORITY_CLASS = "default"
_VERSION_NUMBER = re.compile(r"[1-9][0-9]*")


def default_policy() -> Policy:
    return parse_policy({}, source=DEFAULT_SOURCE)


def parse_policy_file(raw: bytes, path: Path) -> Policy:
    """The policy in a file's bytes. An empty file is refused, not read as the default policy:
    it is also what a writer leaves between truncating the file and writing it."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    return parse_policy_text(text, source=str(path), allow_empty=False)


def parse_policy_text(text: str, *, source: str = "<text>", allow_empty: bool = True) -> Policy:
    """The policy in YAML `text`; an empty text (or only comments) is the default policy, or
    an error when not `allow_empty`."""
    data = load_yaml(text, source)
    if data is None and not allow_empty:
        raise ConfigError(f"{source}: holds no policy (write {{}} for the default policy)")
    return parse_policy({} if data is None else data, source=source, yaml_text=text)


# --- the file's sections, as the reader reads them -------------------------------------------


def _version(value: Any, at: str) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _VERSION_NUMBER.fullmatch(text):
        raise ConfigError(f"{at}: must be a Triton version number (1, 2, ...), got {value!r}")
    return text


def _header_value(value: Any, at: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ConfigError(f"{at}: must be a non-empty string, got {value!r}")
    return str(value)


def _split(raw: Any, at: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f'{at}: must be a mapping of version to weight, e.g. {{"1": 90, "2": 10}}, '
            f"got {type(raw).__name__}"
        )
    if not raw:
        raise ConfigError(f"{at}: must list at least one version")
    arms: dict[str, float] = {}
    for key, weight in raw.items():
        where = f'{at}["{key}"]'
        version = _version(key, where)
        if version in arms:
            raise ConfigError(f"{where}: version listed twice")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"{where}: weight must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}: weight must be > 0, got {weight!r}")
        arms[version] = float(weight)
    # Version order, not file order: sticky users keep their arm when the file is reordered.
    return tuple(sorted(arms.items(), key=lambda arm: int(arm[0])))


@dataclass(frozen=True, slots=True)
class _HeaderRuleSection:
    header: str = field(metadata=rule(check=metadata_key))
    value: str = field(metadata=rule(parse=_header_value))
    version: str = field(metadata=rule(parse=_version))


@dataclass(frozen=True, slots=True)
class _VersionsSection:
    split: tuple[tuple[str, float], ...] = field(default=(), metadata=rule(parse=_split))
    sticky_header: str = field(default="", metadata=rule(check=metadata_key))
    header_rules: tuple[_HeaderRuleSection, ...] = ()


def _versions(raw: Any, at: str) -> VersionRules:
    """A model's `versions:` (the hook for VersionRules, whose split is a mapping in the file)."""
    section = read(_VersionsSection, raw, at)
    if section.sticky_header and not section.split:
        raise ConfigError(f"{at}.sticky_header: needs a split to choose from")
    return VersionRules(
        split=section.split,
        sticky_header=section.sticky_header,
        header_rules=tuple(HeaderRule(r.header, r.value, r.version) for r in section.header_rules),
    )


def _demand(raw: Any, at: str) -> DemandWindows:
    values = read_fields(DemandWindows, raw, at)
    given = raw if isinstance(raw, Mapping) else {}
    windows = ("short_window_s", "long_window_s", "fit_window_s", "recent_window_s")
    for name in windows:
        if name not in given:  # a window left out is at most the span that was set
            values[name] = min(values[name], values["span_s"])
    if values["span_s"] < 2 * values["bucket_s"]:
        raise ConfigError(f"{at}.span_s: must be at least two buckets, got {values['span_s']:g}")
    for name in windows:
        if values[name] > values["span_s"]:
            raise ConfigError(
                f"{at}.{name}: must be <= span_s ({values['span_s']:g}), got {values[name]:g}"
            )
    return DemandWindows(**values)


def _default_classes() -> Mapping[str, PriorityClass]:
    return {_DEFAULT_PRIORITY_CLASS: PriorityClass(_DEFAULT_PRIORITY_CLASS, 1)}


def _priority_classes(raw: Any, at: str) -> Mapping[str, PriorityClass]:
    """name -> class; the name is the key, the rest is read from PriorityClass's fields."""
    section = read_value(Mapping[str, Any], raw, at)
    if not section:
        raise ConfigError(f"{at}: must list at least one class")
    if "" in section:
        raise ConfigError(f"{at}: a class name must be a non-empty string")
    return {
        name: PriorityClass(name, **read_fields(PriorityClass, item, f"{at}.{name}"))
        for name, item in section.items()
    }


@dataclass(frozen=True, slots=True)
class _PlacementSection:
    """`placement:`: the planner's knobs (PlacementPolicy's fields) and these beside them."""

    planner: PlacementPolicy = field(default_factory=PlacementPolicy, metadata=rule(flatten=True))
    # The placement controller's tick.
    interval_s: float = field(default=1.0, metadata=rule(above=0))
    enabled: bool = True
    default_per_copy_capacity_rps: float = field(default=50.0, metadata=rule(above=0))
    # Footprint when neither measured nor declared (0 = such a model is never placed).
    default_memory_bytes: int = field(default=0, metadata=rule(minimum=0))


@dataclass(frozen=True, slots=True)
class _PolicySection:
    """The whole file. `scheduling` is checked by build_profile, which knows the plugins."""

    scheduling: Any = None
    placement: _PlacementSection = field(default_factory=_PlacementSection)
    models: Mapping[str, ModelPolicy] = field(default_factory=dict)
    demand: DemandWindows = field(default_factory=DemandWindows, metadata=rule(parse=_demand))
    priority_classes: Mapping[str, PriorityClass] = field(
        default_factory=_default_classes, metadata=rule(parse=_priority_classes)
    )
    default_priority_class: str = field(
        default=_DEFAULT_PRIORITY_CLASS, metadata=rule(check=non_empty)
    )
    sessions: SessionPolicy = field(default_factory=SessionPolicy)


# --- the policy ------------------------------------------------------------------------------


def parse_policy(data: Any, *, source: str = "<data>", yaml_text: str | None = None) -> Policy:
    """Validates plain data (as YAML gives it) into a Policy; raises ConfigError naming the
    field. `yaml_text` defaults to the effective policy's YAML."""
    top = read(_PolicySection, data, root="policy", hooks={VersionRules: _versions})
    scheduling_raw = {} if top.scheduling is None else top.scheduling
    profile = build_profile(scheduling_raw, default_registry(), path="scheduling")
    scheduling = {
        key: copy.deepcopy(scheduling_raw.get(key, DEFAULT_PROFILE_DATA[key]))
        for key in DEFAULT_PROFILE_DATA
    }
    if "" in top.models:
        raise ConfigError("models: a model name must be a non-empty string")
    classes = top.priority_classes
    if top.default_priority_class not in classes:
        raise ConfigError(
            f"default_priority_class: {top.default_priority_class!r} is not a priority class "
            f"(known: {', '.join(classes)})"
        )
    placement = top.placement
    normalised: dict[str, Any] = {
        "scheduling": scheduling,
        "placement": {
            **dataclasses.asdict(placement.planner),
            **{f.name: getattr(placement, f.name) for f in dataclasses.fields(placement)[1:]},
        },
        "models": {name: _model_data(model) for name, model in sorted(top.models.items())},
        "priority_classes": {
            name: {"triton_priority": pc.triton_priority, "sheddable": pc.sheddable}
            for name, pc in sorted(classes.items())
        },
        "default_priority_class": top.default_priority_class,
        "sessions": dataclasses.asdict(top.sessions),
        "demand": dataclasses.asdict(top.demand),
    }
    policy = Policy(
        scheduling_data=_freeze(scheduling),
        profile=profile,
        placement=placement.planner,
        placement_interval_s=placement.interval_s,
        placement_enabled=placement.enabled,
        default_per_copy_capacity_rps=placement.default_per_copy_capacity_rps,
        default_memory_bytes=placement.default_memory_bytes,
        models=MappingProxyType(dict(top.models)),
        priority_classes=MappingProxyType(dict(classes)),
        default_priority_class=top.default_priority_class,
        sessions=top.sessions,
        demand=top.demand,
        version=_content_hash(normalised),
        source=source,
        yaml_text="",
        data=_freeze(normalised),
    )
    text = policy.effective_yaml() if yaml_text is None else yaml_text
    return dataclasses.replace(policy, yaml_text=text)


def _model_data(model: ModelPolicy) -> dict[str, Any]:
    data: dict[str, Any] = {"min_copies": model.min_copies}
    optional = {
        "max_copies": model.max_copies,
        "per_copy_capacity_rps": model.per_copy_capacity_rps,
        "memory_bytes": model.memory_bytes,
    }
    data.update({key: value for key, value in optional.items() if value is not None})
    rules = model.versions
    if not rules.is_empty:
        versions: dict[str, Any] = {}
        if rules.split:
            versions["split"] = dict(rules.split)
        if rules.sticky_header:
            versions["sticky_header"] = rules.sticky_header
        if rules.header_rules:
            versions["header_rules"] = [
                {"header": r.header, "value": r.value, "version": r.version}
                for r in rules.header_rules
            ]
        data["versions"] = versions
    prefix = model.prefix_routing
    if prefix is not None:
        data["prefix_routing"] = {
            "prompt_input": prefix.prompt_input,
            "block_bytes": prefix.block_bytes,
            "max_blocks": prefix.max_blocks,
            "min_blocks": prefix.min_blocks,
            "epsilon": prefix.epsilon,
        }
    return data


def _content_hash(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=6).hexdigest()


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(item) for item in value)
    return value
