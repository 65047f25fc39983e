"""From plugin type names to plugins, and from plain config data to a `SchedulingProfile`.

Plugins are registered explicitly in `default_registry` (one line per built-in, in
`BUILT_IN_PLUGINS`), never as an import side effect. How to add one: router/plugins/README.md.
Profile data looks like:

    {"filters": [{"type": "healthy-fresh", "params": {"stale_after_s": 1.0}}, ...],
     "scorers": [{"type": "model-affinity", "weight": 3}, ...],
     "picker": {"type": "weighted-random", "params": {"tolerance": 0.1}}}

A section left out takes the default profile's (`{}` is the default profile; `filters: []` means
no filters). Every plugin entry takes `type`, an optional `name` (defaults to the type; scores are
reported under it, so names must be unique within a list) and optional `params`; scorers also
need a `weight` (a finite number >= 0). Bad data raises ConfigError naming the field.
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from pointsman.errors import ConfigError
from router.contracts import Filter, Picker, PluginFactory, Scorer, SnapshotField
from router.plugins.healthy_fresh import HealthyFreshFilter
from router.plugins.load import LoadScorer
from router.plugins.max_score import MaxScorePicker
from router.plugins.memory_headroom import MemoryHeadroomScorer
from router.plugins.model_affinity import ModelAffinityScorer
from router.plugins.model_ready import ModelReadyFilter
from router.plugins.power_of_two import PowerOfTwoPicker
from router.plugins.prefix_affinity import PrefixAffinityScorer
from router.plugins.queue_depth import QueueDepthScorer
from router.plugins.weighted_random import WeightedRandomPicker
from router.scheduling import SchedulingProfile

__all__ = [
    "BUILT_IN_PLUGINS",
    "DEFAULT_PROFILE_DATA",
    "PluginClass",
    "PluginInfo",
    "PluginKind",
    "PluginRegistry",
    "build_profile",
    "default_profile",
    "default_registry",
]


class PluginKind(enum.Enum):
    FILTER = "filter"
    SCORER = "scorer"
    PICKER = "picker"

    @property
    def method(self) -> str:
        """The method a plugin of this kind has (see router/contracts.py)."""
        return {"filter": "filter", "scorer": "score", "picker": "pick"}[self.value]


class PluginClass(Protocol):
    """A plugin class as `register_plugin` takes it: a type name, a docstring giving its
    formula, inputs and parameters, and a factory."""

    TYPE_NAME: str

    def from_params(self, name: str, params: Mapping[str, Any]) -> Filter | Scorer | Picker: ...


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One registered plugin type."""

    type_name: str
    kind: PluginKind
    factory: PluginFactory
    # What the catalogue in router/plugins/README.md shows (router/plugins/catalog.py).
    doc: str = ""
    consumes: frozenset[SnapshotField] = frozenset()


class PluginRegistry:
    """Plugin factories by kind and type name."""

    def __init__(self) -> None:
        self._plugins: dict[PluginKind, dict[str, PluginInfo]] = {kind: {} for kind in PluginKind}

    def register(
        self,
        type_name: str,
        kind: PluginKind,
        factory: PluginFactory,
        *,
        doc: str = "",
        consumes: frozenset[SnapshotField] = frozenset(),
    ) -> None:
        if type_name in self._plugins[kind]:
            raise ValueError(f"{kind.value} type '{type_name}' is already registered")
        self._plugins[kind][type_name] = PluginInfo(type_name, kind, factory, doc, consumes)

    def register_plugin(self, plugin: PluginClass) -> None:
        """Registers a plugin class under its TYPE_NAME, as the kind whose method it has
        (`filter`, `score` or `pick`), built by its `from_params`."""
        kinds = [kind for kind in PluginKind if callable(getattr(plugin, kind.method, None))]
        if len(kinds) != 1:
            raise TypeError(f"{plugin!r} must have exactly one of filter, score, pick")
        consumes = getattr(plugin, "CONSUMES", None)
        if consumes is None and kinds[0] is not PluginKind.PICKER:
            raise TypeError(f"{plugin!r} must declare the snapshot fields it reads (CONSUMES)")
        self.register(
            plugin.TYPE_NAME,
            kinds[0],
            plugin.from_params,
            doc=inspect.getdoc(inspect.getmodule(plugin)) or "",
            consumes=consumes or frozenset(),
        )

    def type_names(self, kind: PluginKind) -> list[str]:
        return sorted(self._plugins[kind])

    def info(self, kind: PluginKind, type_name: str) -> PluginInfo:
        return self._plugins[kind][type_name]

    def create_filter(self, type_name: str, name: str, params: Mapping[str, Any]) -> Filter:
        plugin = self._create(PluginKind.FILTER, type_name, name, params)
        if not isinstance(plugin, Filter):
            raise TypeError(f"factory of filter type '{type_name}' built {plugin!r}")
        return plugin

    def create_scorer(self, type_name: str, name: str, params: Mapping[str, Any]) -> Scorer:
        plugin = self._create(PluginKind.SCORER, type_name, name, params)
        if not isinstance(plugin, Scorer):
            raise TypeError(f"factory of scorer type '{type_name}' built {plugin!r}")
        return plugin

    def create_picker(self, type_name: str, name: str, params: Mapping[str, Any]) -> Picker:
        plugin = self._create(PluginKind.PICKER, type_name, name, params)
        if not isinstance(plugin, Picker):
            raise TypeError(f"factory of picker type '{type_name}' built {plugin!r}")
        return plugin

    def _create(
        self, kind: PluginKind, type_name: str, name: str, params: Mapping[str, Any]
    ) -> Filter | Scorer | Picker:
        plugin = self._plugins[kind].get(type_name)
        if plugin is None:
            known = ", ".join(self.type_names(kind))
            raise ConfigError(f"type: unknown {kind.value} type '{type_name}' (known: {known})")
        return plugin.factory(name, params)


# Every built-in plugin, one line each; adding one here is what makes its type usable.
BUILT_IN_PLUGINS: Final[tuple[PluginClass, ...]] = (
    ModelReadyFilter,
    HealthyFreshFilter,
    ModelAffinityScorer,
    MemoryHeadroomScorer,
    QueueDepthScorer,
    LoadScorer,
    PrefixAffinityScorer,
    WeightedRandomPicker,
    PowerOfTwoPicker,
    MaxScorePicker,
)


def default_registry() -> PluginRegistry:
    """Every built-in plugin (`BUILT_IN_PLUGINS`), registered here and only here."""
    registry = PluginRegistry()
    for plugin in BUILT_IN_PLUGINS:
        registry.register_plugin(plugin)
    return registry


# Affinity is paired with two load terms so a hot model's instance is not buried under requests;
# healthy-fresh runs first so model-ready's fall-back to loading instances only sees usable ones.
# prefix-affinity scores 0 everywhere unless the request carries a key for a model with prefix
# routing; then its weight, above the others' sum, makes its bounded-load choice the pick.
# Treat as read-only: copy.deepcopy it to derive a custom profile.
DEFAULT_PROFILE_DATA: Final[Mapping[str, Any]] = {
    "filters": [
        {"type": "healthy-fresh", "params": {"stale_after_s": 1.0}},
        {"type": "model-ready"},
    ],
    "scorers": [
        {"type": "model-affinity", "weight": 3},
        {"type": "queue-depth", "weight": 2},
        {"type": "memory-headroom", "weight": 1},
        {"type": "load", "weight": 1},
        {"type": "prefix-affinity", "weight": 10},
    ],
    "picker": {"type": "weighted-random", "params": {"tolerance": 0.1}},
}

_ENTRY_KEYS = ("type", "name", "params")
_SCORER_ENTRY_KEYS = (*_ENTRY_KEYS, "weight")


def default_profile() -> SchedulingProfile:
    return build_profile(DEFAULT_PROFILE_DATA, default_registry())


def build_profile(
    data: Mapping[str, Any], registry: PluginRegistry, *, path: str = ""
) -> SchedulingProfile:
    """The profile `data` describes; a section left out takes the default profile's.

    Raises ConfigError naming the field, e.g. 'scorers[1].params.buffer_bytes: must be >= 0';
    `path` prefixes every field name, for a profile nested in a larger config ('router.policy').
    """
    profile = _mapping(data, path or "profile")
    _reject_unknown_keys(profile, tuple(DEFAULT_PROFILE_DATA), path)

    def section(key: str) -> Any:
        return profile[key] if key in profile else DEFAULT_PROFILE_DATA[key]

    filter_entries = _entries(section("filters"), _join(path, "filters"), _ENTRY_KEYS)
    scorer_entries = _entries(section("scorers"), _join(path, "scorers"), _SCORER_ENTRY_KEYS)
    picker_entry = _entry(section("picker"), _join(path, "picker"), _ENTRY_KEYS)
    return SchedulingProfile(
        filters=tuple(
            _create(registry, PluginKind.FILTER, registry.create_filter, entry)
            for entry in filter_entries
        ),
        scorers=tuple(
            (_create(registry, PluginKind.SCORER, registry.create_scorer, entry), _weight(entry))
            for entry in scorer_entries
        ),
        picker=_create(registry, PluginKind.PICKER, registry.create_picker, picker_entry),
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    path: str
    fields: Mapping[str, Any]
    type_name: str
    name: str
    params: Mapping[str, Any]


def _entries(raw: Any, at: str, allowed_keys: Sequence[str]) -> list[_Entry]:
    # A lone mapping or a string is a sequence-shaped mistake, not a list of plugins.
    if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
        raise ConfigError(f"{at}: must be a list, got {type(raw).__name__}")
    entries = [_entry(item, f"{at}[{index}]", allowed_keys) for index, item in enumerate(raw)]
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise ConfigError(f"{entry.path}.name: duplicate name '{entry.name}' in {at}")
        seen.add(entry.name)
    return entries


def _entry(raw: Any, at: str, allowed_keys: Sequence[str]) -> _Entry:
    fields = _mapping(raw, at)
    _reject_unknown_keys(fields, allowed_keys, at)
    type_name = _non_empty_string(_required(fields, "type", at), _join(at, "type"))
    name = _non_empty_string(fields.get("name", type_name), _join(at, "name"))
    params_value = fields.get("params")
    params = {} if params_value is None else _mapping(params_value, _join(at, "params"))
    return _Entry(at, fields, type_name, name, params)


_Plugin = TypeVar("_Plugin")


def _create(
    registry: PluginRegistry,
    kind: PluginKind,
    create: Callable[[str, str, Mapping[str, Any]], _Plugin],
    entry: _Entry,
) -> _Plugin:
    known = registry.type_names(kind)
    if entry.type_name not in known:
        raise ConfigError(
            f"{entry.path}.type: unknown {kind.value} type '{entry.type_name}' "
            f"(known: {', '.join(known)})"
        )
    try:
        return create(entry.type_name, entry.name, entry.params)
    except ConfigError as error:
        # Factories name the parameter; the path to the plugin is known only here.
        raise ConfigError(f"{entry.path}.params.{error}") from error


def _weight(entry: _Entry) -> float:
    at = _join(entry.path, "weight")
    value = _required(entry.fields, "weight", entry.path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{at}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{at}: must be a finite number >= 0")
    return float(value)


def _required(fields: Mapping[str, Any], key: str, at: str) -> Any:
    if key not in fields:
        raise ConfigError(f"{_join(at, key)}: required")
    return fields[key]


def _mapping(value: Any, at: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{at}: must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{at}: keys must be strings, got {key!r}")
    return value


def _non_empty_string(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{at}: must be a non-empty string")
    return value


def _reject_unknown_keys(fields: Mapping[str, Any], allowed: Sequence[str], at: str) -> None:
    for key in fields:
        if key not in allowed:
            raise ConfigError(f"{_join(at, key)}: unknown key (allowed: {', '.join(allowed)})")


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key
