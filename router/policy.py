"""The policy file: scheduling, placement, per-model copies and versions, priority classes.

Typed and frozen, parsed and validated once. A file looks like (see examples/policy.yaml):

    scheduling:            # as router.plugins.registry.build_profile takes; sections left out
      scorers:             # take the default profile's
        - {type: model-affinity, weight: 3}
    placement:             # router.placement.PlacementPolicy's fields, plus:
      interval_s: 1.0                      # controller tick
      enabled: true
      default_per_copy_capacity_rps: 50
      default_memory_bytes: 0              # footprint when neither measured nor declared
    models:                                #   (0 = such a model is never placed)
      codegen:
        min_copies: 1
        max_copies: 3                      # absent or null: as many as there are instances
        per_copy_capacity_rps: 40          # absent: placement.default_per_copy_capacity_rps
        memory_bytes: 67108864             # replaces the declared footprint (not a measured one)
        versions:
          split: {"1": 90, "2": 10}        # relative weights > 0; versions are Triton's numbers
          sticky_header: x-user-id         # the hash of this header's value picks the arm
          header_rules:
            - {header: x-canary, value: "1", version: "2"}
    demand:                                # how demand is measured (router.demand.DemandWindows)
      bucket_s: 1.0
      span_s: 300                          # history kept; every window must fit in it
      short_window_s: 60                   # the rate copies are sized for
      long_window_s: 300
      fit_window_s: 60                     # the trend behind the forecast
      horizon_s: 30                        # how far ahead the forecast looks
    priority_classes:                      # name -> Triton priority level (1 = highest)
      high: {triton_priority: 1}
      low: {triton_priority: 2, sheddable: true}
    default_priority_class: low

Every section may be left out: `{}` is the default policy (an empty file is refused, since it
is also what a writer leaves half-way). Every error is a ConfigError whose message starts with
the field's path, e.g.
`models.codegen.versions.split["2"]: weight must be > 0`.

`Policy.version` is a short hash of the normalised data (defaults filled in, comments and key
order ignored), so two files that mean the same have the same version. `PolicyStore` holds the
running policy: it reloads on request and when the file changes, and a refused file leaves the
running policy in place.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

from pointsman.clock import Clock
from pointsman.errors import ConfigError
from pointsman.versions import HeaderRule, VersionRules, select_version
from router.demand import DemandWindows
from router.placement import ModelSpec, PlacementPolicy
from router.plugins.registry import DEFAULT_PROFILE_DATA, build_profile, default_registry
from router.scheduling import SchedulingProfile

__all__ = [
    "DEFAULT_SOURCE",
    "HeaderRule",
    "ModelPolicy",
    "Policy",
    "PolicyStore",
    "PriorityClass",
    "VersionRules",
    "default_policy",
    "load_policy",
    "parse_policy",
    "parse_policy_text",
    "select_version",
]

log = logging.getLogger(__name__)

# `Policy.source` of the built-in policy.
DEFAULT_SOURCE: Final = "default"

_DEFAULT_INTERVAL_S = 1.0
_DEFAULT_PER_COPY_CAPACITY_RPS = 50.0
_DEFAULT_PRIORITY_CLASS = "default"
# A file whose mtime is this recent is read on every poll: a rewrite within the file system's
# timestamp granularity, with the same size, would otherwise look unchanged.
_RACY_S = 2.0
# A file seen changing is read once its size and mtime held still this long.
_SETTLE_S = 0.05


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """A class of requests: the Triton priority level they get, and whether overload may shed
    them."""

    name: str
    # Triton's request priority; 1 is the highest level.
    triton_priority: int
    sheddable: bool = False


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """What the policy says of one model. A model the file does not list gets the defaults."""

    min_copies: int = 0
    # None: as many copies as there are healthy instances.
    max_copies: int | None = None
    # None: the policy's default_per_copy_capacity_rps.
    per_copy_capacity_rps: float | None = None
    # Bytes one copy takes, replacing the declared footprint; None: declared (or measured).
    memory_bytes: int | None = None
    versions: VersionRules = field(default_factory=VersionRules)


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


# --- loading -------------------------------------------------------------------------------


def default_policy() -> Policy:
    return parse_policy({}, source=DEFAULT_SOURCE)


def load_policy(path: Path) -> Policy:
    """The policy in the file at `path`. Raises ConfigError (file errors start with the path)."""
    return _parse_file(_read(path)[1], path)


def parse_policy_text(text: str, *, source: str = "<text>", allow_empty: bool = True) -> Policy:
    """The policy in YAML `text`; an empty text (or only comments) is the default policy, or
    an error when not `allow_empty`."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None and not allow_empty:
        raise ConfigError(f"{source}: holds no policy (write {{}} for the default policy)")
    return parse_policy({} if data is None else data, source=source, yaml_text=text)


def parse_policy(data: Any, *, source: str = "<data>", yaml_text: str | None = None) -> Policy:
    """Validates plain data (as YAML gives it) into a Policy; raises ConfigError naming the
    field. `yaml_text` defaults to the effective policy's YAML."""
    top = _mapping(data, "policy")
    _reject_unknown(top, _TOP_LEVEL, "")
    scheduling_raw = top.get("scheduling", {})
    profile = build_profile(
        {} if scheduling_raw is None else scheduling_raw, default_registry(), path="scheduling"
    )
    scheduling = {
        key: copy.deepcopy((scheduling_raw or {}).get(key, DEFAULT_PROFILE_DATA[key]))
        for key in DEFAULT_PROFILE_DATA
    }
    placement, placement_data = _placement(top.get("placement"))
    models = _models(top.get("models"))
    demand = _demand(top.get("demand"))
    priority_classes = _priority_classes(top.get("priority_classes"))
    default_class = top.get("default_priority_class", _DEFAULT_PRIORITY_CLASS)
    if not isinstance(default_class, str) or not default_class:
        raise ConfigError(
            f"default_priority_class: must be a non-empty string, got {default_class!r}"
        )
    if default_class not in priority_classes:
        known = ", ".join(priority_classes)
        raise ConfigError(
            f"default_priority_class: {default_class!r} is not a priority class (known: {known})"
        )
    normalised: dict[str, Any] = {
        "scheduling": scheduling,
        "placement": placement_data,
        "models": {name: _model_data(model) for name, model in sorted(models.items())},
        "priority_classes": {
            name: {"triton_priority": pc.triton_priority, "sheddable": pc.sheddable}
            for name, pc in sorted(priority_classes.items())
        },
        "default_priority_class": default_class,
        "demand": dataclasses.asdict(demand),
    }
    policy = Policy(
        scheduling_data=_freeze(scheduling),
        profile=profile,
        placement=placement,
        placement_interval_s=placement_data["interval_s"],
        placement_enabled=placement_data["enabled"],
        default_per_copy_capacity_rps=placement_data["default_per_copy_capacity_rps"],
        default_memory_bytes=placement_data["default_memory_bytes"],
        models=MappingProxyType(dict(models)),
        priority_classes=MappingProxyType(dict(priority_classes)),
        default_priority_class=default_class,
        demand=demand,
        version=_content_hash(normalised),
        source=source,
        yaml_text="",
        data=_freeze(normalised),
    )
    text = policy.effective_yaml() if yaml_text is None else yaml_text
    return dataclasses.replace(policy, yaml_text=text)


_TOP_LEVEL = (
    "scheduling",
    "placement",
    "models",
    "demand",
    "priority_classes",
    "default_priority_class",
)
_PLACEMENT_EXTRA: Final[Mapping[str, Any]] = {
    "interval_s": _DEFAULT_INTERVAL_S,
    "enabled": True,
    "default_per_copy_capacity_rps": _DEFAULT_PER_COPY_CAPACITY_RPS,
    "default_memory_bytes": 0,
}
# Bounds beyond ">= 0" of PlacementPolicy's fields: (lowest, lowest allowed?, highest).
_PLACEMENT_BOUNDS: Final[Mapping[str, tuple[float, bool, float]]] = {
    "scale_down_utilisation": (0.0, False, 1.0),
    "shortlist_tolerance": (0.0, True, 1.0),
}
_MODEL_KEYS = ("min_copies", "max_copies", "per_copy_capacity_rps", "memory_bytes", "versions")
_VERSIONS_KEYS = ("split", "sticky_header", "header_rules")
_RULE_KEYS = ("header", "value", "version")
_PRIORITY_KEYS = ("triton_priority", "sheddable")
# gRPC metadata keys: lower case letters, digits, '-', '_' and '.'.
_METADATA_KEY = re.compile(r"[0-9a-z_.\-]+")
_VERSION_NUMBER = re.compile(r"[1-9][0-9]*")


def _placement(raw: Any) -> tuple[PlacementPolicy, dict[str, Any]]:
    at = "placement"
    section = {} if raw is None else _mapping(raw, at)
    policy_fields = {f.name: f.default for f in dataclasses.fields(PlacementPolicy)}
    _reject_unknown(section, (*policy_fields, *_PLACEMENT_EXTRA), at)
    values: dict[str, Any] = {}
    for name, default in policy_fields.items():
        where = f"{at}.{name}"
        value = section.get(name, default)
        if isinstance(default, bool):
            values[name] = _bool(value, where)
        elif isinstance(default, int):
            values[name] = _int(value, where, minimum=0)
        else:
            number = _number(value, where, minimum=0.0)
            low, low_allowed, high = _PLACEMENT_BOUNDS.get(name, (0.0, True, math.inf))
            if number > high or number < low or (number == low and not low_allowed):
                opening = "[" if low_allowed else "("
                raise ConfigError(f"{where}: must be in {opening}{low:g}, {high:g}], got {value!r}")
            values[name] = number
    try:
        placement = PlacementPolicy(**values)
    except ValueError as exc:  # a rule across fields, e.g. both weights 0
        raise ConfigError(f"{at}: {exc}") from exc
    extra = {
        "interval_s": _number(
            section.get("interval_s", _DEFAULT_INTERVAL_S), f"{at}.interval_s", above=0.0
        ),
        "enabled": _bool(section.get("enabled", True), f"{at}.enabled"),
        "default_per_copy_capacity_rps": _number(
            section.get("default_per_copy_capacity_rps", _DEFAULT_PER_COPY_CAPACITY_RPS),
            f"{at}.default_per_copy_capacity_rps",
            above=0.0,
        ),
        "default_memory_bytes": _int(
            section.get("default_memory_bytes", 0), f"{at}.default_memory_bytes", minimum=0
        ),
    }
    return placement, {**values, **extra}


def _demand(raw: Any) -> DemandWindows:
    at = "demand"
    section = {} if raw is None else _mapping(raw, at)
    defaults = DemandWindows()
    names = tuple(f.name for f in dataclasses.fields(DemandWindows))
    _reject_unknown(section, names, at)
    values = {
        # A zero horizon forecasts the rate of now; every other figure must be > 0.
        name: _number(section.get(name, getattr(defaults, name)), f"{at}.{name}", minimum=0.0)
        if name == "horizon_s"
        else _number(section.get(name, getattr(defaults, name)), f"{at}.{name}", above=0.0)
        for name in names
    }
    for name in ("short_window_s", "long_window_s", "fit_window_s"):
        if name not in section:  # a window left out is at most the span that was set
            values[name] = min(values[name], values["span_s"])
    if values["span_s"] < 2 * values["bucket_s"]:
        raise ConfigError(f"{at}.span_s: must be at least two buckets, got {values['span_s']:g}")
    for name in ("short_window_s", "long_window_s", "fit_window_s"):
        if values[name] > values["span_s"]:
            raise ConfigError(
                f"{at}.{name}: must be <= span_s ({values['span_s']:g}), got {values[name]:g}"
            )
    return DemandWindows(**values)


def _models(raw: Any) -> dict[str, ModelPolicy]:
    section = {} if raw is None else _mapping(raw, "models")
    models: dict[str, ModelPolicy] = {}
    for name, item in section.items():
        at = f"models.{name}"
        if not name:
            raise ConfigError("models: a model name must be a non-empty string")
        models[name] = _model({} if item is None else item, at)
    return models


def _model(raw: Any, at: str) -> ModelPolicy:
    fields = _mapping(raw, at)
    _reject_unknown(fields, _MODEL_KEYS, at)
    min_copies = _int(fields.get("min_copies", 0), f"{at}.min_copies", minimum=0)
    max_copies = _optional(fields, "max_copies", lambda v, w: _int(v, w, minimum=0), at)
    if max_copies is not None and max_copies < min_copies:
        raise ConfigError(
            f"{at}.max_copies: must be >= min_copies ({min_copies}), got {max_copies}"
        )
    capacity = _optional(fields, "per_copy_capacity_rps", lambda v, w: _number(v, w, above=0.0), at)
    memory = _optional(fields, "memory_bytes", lambda v, w: _int(v, w, minimum=1), at)
    versions_raw = fields.get("versions")
    versions = VersionRules() if versions_raw is None else _versions(versions_raw, f"{at}.versions")
    return ModelPolicy(
        min_copies=min_copies,
        max_copies=max_copies,
        per_copy_capacity_rps=capacity,
        memory_bytes=memory,
        versions=versions,
    )


def _versions(raw: Any, at: str) -> VersionRules:
    fields = _mapping(raw, at)
    _reject_unknown(fields, _VERSIONS_KEYS, at)
    split: tuple[tuple[str, float], ...] = ()
    if fields.get("split") is not None:
        split = _split(fields["split"], f"{at}.split")
    sticky = fields.get("sticky_header")
    sticky_header = "" if sticky is None else _header_name(sticky, f"{at}.sticky_header")
    if sticky_header and not split:
        raise ConfigError(f"{at}.sticky_header: needs a split to choose from")
    rules_raw = fields.get("header_rules")
    rules: tuple[HeaderRule, ...] = ()
    if rules_raw is not None:
        if not isinstance(rules_raw, list):
            raise ConfigError(f"{at}.header_rules: must be a list, got {type(rules_raw).__name__}")
        rules = tuple(
            _header_rule(item, f"{at}.header_rules[{index}]")
            for index, item in enumerate(rules_raw)
        )
    return VersionRules(split=split, sticky_header=sticky_header, header_rules=rules)


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


def _header_rule(raw: Any, at: str) -> HeaderRule:
    fields = _mapping(raw, at)
    _reject_unknown(fields, _RULE_KEYS, at)
    for key in _RULE_KEYS:
        if key not in fields:
            raise ConfigError(f"{at}.{key}: required")
    value = fields["value"]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ConfigError(f"{at}.value: must be a non-empty string, got {value!r}")
    return HeaderRule(
        header=_header_name(fields["header"], f"{at}.header"),
        value=str(value),
        version=_version(fields["version"], f"{at}.version"),
    )


def _header_name(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{at}: must be a non-empty string, got {value!r}")
    if value != value.lower():
        raise ConfigError(f"{at}: must be lower case (gRPC metadata keys are), got {value!r}")
    if not _METADATA_KEY.fullmatch(value):
        raise ConfigError(f"{at}: a metadata key has only a-z, 0-9, '-', '_', '.', got {value!r}")
    return value


def _version(value: Any, at: str) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _VERSION_NUMBER.fullmatch(text):
        raise ConfigError(f"{at}: must be a Triton version number (1, 2, ...), got {value!r}")
    return text


def _priority_classes(raw: Any) -> dict[str, PriorityClass]:
    if raw is None:
        return {_DEFAULT_PRIORITY_CLASS: PriorityClass(_DEFAULT_PRIORITY_CLASS, 1)}
    section = _mapping(raw, "priority_classes")
    if not section:
        raise ConfigError("priority_classes: must list at least one class")
    classes: dict[str, PriorityClass] = {}
    for name, item in section.items():
        at = f"priority_classes.{name}"
        if not name:
            raise ConfigError("priority_classes: a class name must be a non-empty string")
        fields = _mapping(item, at)
        _reject_unknown(fields, _PRIORITY_KEYS, at)
        if "triton_priority" not in fields:
            raise ConfigError(f"{at}.triton_priority: required")
        classes[name] = PriorityClass(
            name=name,
            triton_priority=_int(fields["triton_priority"], f"{at}.triton_priority", minimum=1),
            sheddable=_bool(fields.get("sheddable", False), f"{at}.sheddable"),
        )
    return classes


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
    return data


# --- field checks: each names the field ----------------------------------------------------


def _mapping(value: Any, at: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{at}: must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{at}: keys must be strings, got {key!r}")
    return value


def _reject_unknown(fields: Mapping[str, Any], allowed: tuple[str, ...], at: str) -> None:
    for key in fields:
        if key not in allowed:
            where = f"{at}.{key}" if at else key
            raise ConfigError(f"{where}: unknown field (allowed: {', '.join(allowed)})")


def _int(value: Any, at: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{at}: must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{at}: must be >= {minimum}, got {value}")
    return value


def _number(
    value: Any, at: str, *, minimum: float | None = None, above: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{at}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{at}: must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{at}: must be >= {minimum:g}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{at}: must be > {above:g}, got {value!r}")
    return float(value)


def _bool(value: Any, at: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{at}: must be true or false, got {value!r}")
    return value


def _optional(
    fields: Mapping[str, Any], key: str, check: Callable[[Any, str], Any], at: str
) -> Any:
    value = fields.get(key)
    return None if value is None else check(value, f"{at}.{key}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (YAML would keep the last,
    silently dropping, say, a model's first entry)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _content_hash(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=6).hexdigest()


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


# --- the running policy --------------------------------------------------------------------

PolicyListener = Callable[[Policy], None]


@dataclass(frozen=True, slots=True)
class _FileState:
    """What the store last read of the file: its stat signature and the hash of its bytes."""

    signature: tuple[int, int, int]  # (mtime_ns, size, inode)
    digest: str


class PolicyStore:
    """The running policy; reloads on `reload()` and, under `watch()`, when the file changes.

    A file that does not validate is refused and the running policy keeps serving: `reload()`
    raises the ConfigError, `watch()` logs it once per content. Listeners run synchronously, in
    subscription order, after each change of version; one that raises is logged and the rest
    still run. Runs on one event loop: no locks.
    """

    def __init__(self, path: Path | None, *, clock: Clock = time.time) -> None:
        """Loads `path` (the default policy when None); raises ConfigError if it is invalid.

        `clock` gives Unix seconds: `activated_unix_ms` is what GetPolicy shows.
        """
        self.path = path
        self._clock = clock
        self._listeners: list[PolicyListener] = []
        self._file: _FileState | None = None
        self._missing_logged = False
        if path is None:
            self._current = default_policy()
        else:
            state, raw = _read(path)
            self._current = _parse_file(raw, path)
            self._file = state
        self._activated_at = clock()

    @property
    def current(self) -> Policy:
        return self._current

    @property
    def activated_unix_ms(self) -> int:
        """When the current version became active, Unix milliseconds."""
        return int(self._activated_at * 1000)

    def subscribe(self, listener: PolicyListener) -> Callable[[], None]:
        """Calls `listener(policy)` on each change of version; returns the unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def reload(self) -> tuple[bool, str]:
        """Reads the file now: (whether the version changed, the version now active).

        Raises ConfigError, and keeps the running policy, when the file does not validate or
        cannot be read. Without a file, nothing changes.
        """
        if self.path is None:
            return False, self._current.version
        state, raw = _read(self.path)
        self._file = state
        try:
            policy = _parse_file(raw, self.path)
        except ConfigError as exc:
            self._log_refusal(exc)
            raise
        return self._activate(policy), self._current.version

    async def watch(self, interval_s: float = 0.2) -> None:
        """Polls the file every `interval_s` and applies a changed one; never raises, so a bad
        edit is logged and the running policy stays. Returns at once without a file.

        A change is applied within interval_s + _SETTLE_S + the parse (about 0.3 s at the
        default): a file seen changing is read once it has held still for _SETTLE_S, so a
        writer caught half-way is not taken for a new policy.
        """
        if self.path is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._poll(self.path)
            except Exception:  # the watcher must outlive any surprise
                log.exception("policy watch: checking %s failed", self.path)

    async def _poll(self, path: Path) -> None:
        signature = self._stat_or_log(path)
        if signature is None:
            return
        if self._file is None or self._file.signature != signature:
            await asyncio.sleep(_SETTLE_S)
            if self._stat_or_log(path) != signature:
                return  # still being written: the next poll looks again
        elif time.time() - signature[0] / 1e9 >= _RACY_S:
            return  # unchanged, and old enough for its timestamp to be trusted
        try:
            state, raw = _read(path)
        except ConfigError as exc:
            log.warning("policy file: %s", exc)
            return
        if self._file is not None and self._file.digest == state.digest:
            self._file = state
            return
        self._file = state
        try:
            policy = _parse_file(raw, path)
        except ConfigError as exc:
            self._log_refusal(exc)
            return
        self._activate(policy)

    def _stat_or_log(self, path: Path) -> tuple[int, int, int] | None:
        try:
            signature = _signature(path)
        except OSError as exc:
            if not self._missing_logged:
                log.warning(
                    "policy file %s: %s; keeping version %s",
                    path,
                    exc.strerror or exc,
                    self._current.version,
                )
                self._missing_logged = True
            return None
        self._missing_logged = False
        return signature

    def _activate(self, policy: Policy) -> bool:
        if policy.version == self._current.version:
            self._current = policy  # same meaning; keep the text as now written
            return False
        old = self._current.version
        self._current = policy
        self._activated_at = self._clock()
        log.info("policy %s active (was %s), from %s", policy.version, old, policy.source)
        for listener in tuple(self._listeners):
            try:
                listener(policy)
            except Exception:
                log.exception("policy listener %r failed on version %s", listener, policy.version)
        return True

    def _log_refusal(self, error: ConfigError) -> None:
        log.warning(
            "policy file %s refused, keeping version %s: %s",
            self.path,
            self._current.version,
            error,
        )


def _signature(path: Path) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _read(path: Path) -> tuple[_FileState, bytes]:
    """Stat first, then read: a write between the two shows as a new signature next poll."""
    try:
        signature = _signature(path)
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    return _FileState(signature, hashlib.blake2b(raw, digest_size=16).hexdigest()), raw


def _parse_file(raw: bytes, path: Path) -> Policy:
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    # An empty file is refused, not read as the default policy: it is also what a writer
    # leaves between truncating the file and writing it.
    return parse_policy_text(text, source=str(path), allow_empty=False)
