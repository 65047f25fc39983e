"""The config reader: plain data -> a frozen dataclass, each field read by its type and its
rule (pointsman/config/_rules.py), every error naming the field's path."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pointsman.config._rules import METADATA_KEY, PLAIN, Rule, join_path
from pointsman.errors import ConfigError

T = TypeVar("T")
# Reads one type's raw value: (value, path of the field) -> the typed value.
Hooks = Mapping[Any, Callable[[Any, str], Any]]

_NO_HOOKS: Hooks = types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str
    type: Any
    rule: Rule
    default: Any  # dataclasses.MISSING when required
    factory: Any  # dataclasses.MISSING without a default_factory


_FIELDS_CACHE: dict[type, tuple[_Field, ...]] = {}


def fields_of(cls: type) -> tuple[_Field, ...]:
    """`cls`'s init fields with their resolved types and rules (read once per class)."""
    known = _FIELDS_CACHE.get(cls)
    if known is None:
        hints = typing.get_type_hints(cls)
        known = _FIELDS_CACHE[cls] = tuple(
            _Field(
                name=f.name,
                key=(r := f.metadata.get(METADATA_KEY, PLAIN)).key or f.name,
                type=hints[f.name],
                rule=r,
                default=f.default,
                factory=f.default_factory,
            )
            for f in dataclasses.fields(cls)
            if f.init
        )
    return known


def keys_of(cls: type) -> tuple[str, ...]:
    """The keys a mapping read as `cls` may hold (flattened classes' keys included)."""
    keys: list[str] = []
    for f in fields_of(cls):
        if f.rule.flatten:
            keys.extend(keys_of(f.type))
        elif not f.rule.skip:
            keys.append(f.key)
    return tuple(keys)


def read(
    cls: type[T],
    data: Any,
    where: str = "",
    *,
    root: str = "config",
    base: T | None = None,
    text: bool = False,
    hooks: Hooks = _NO_HOOKS,
) -> T:
    """`data` (plain data: YAML, flags) read as a `cls`; raises ConfigError naming the field.

    `where` is the path of `data` in its file ("" at the top, where errors about the whole
    say `root`). Fields absent from `data` take `base`'s values, else their defaults. A rule
    across fields raised by `cls` itself (ConfigError "field: ...", or ValueError) gets `where`
    in front."""
    values = read_fields(cls, data, where, root=root, base=base, text=text, hooks=hooks)
    return _build(cls, values, where or root, nested=bool(where))


def read_fields(
    cls: type[T],
    data: Any,
    where: str = "",
    *,
    root: str = "config",
    base: T | None = None,
    text: bool = False,
    hooks: Hooks = _NO_HOOKS,
) -> dict[str, Any]:
    """The checked values of `cls`'s fields (absent ones: `base`'s, else the defaults), not yet
    built into a `cls`: for a reader with a rule of its own to apply first. Fields with
    `rule(skip=True)` are left out."""
    mapping = _mapping({} if data is None else data, where or root)
    allowed = keys_of(cls)
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"{join_path(where, key)}: unknown field (allowed: {', '.join(allowed)})"
            )
    values: dict[str, Any] = {}
    for f in fields_of(cls):
        if f.rule.skip:
            continue
        if f.rule.flatten:
            own = {key: mapping[key] for key in keys_of(f.type) if key in mapping}
            inner = None if base is None else getattr(base, f.name)
            values[f.name] = read(f.type, own, where, base=inner, text=text, hooks=hooks)
            continue
        value = mapping.get(f.key)
        path = join_path(where, f.key)
        if value is not None or (f.key in mapping and _is_optional(f.type)):
            values[f.name] = _read_field(f, value, path, text, hooks)
        elif base is not None:
            values[f.name] = getattr(base, f.name)
        elif f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.factory is not dataclasses.MISSING:
            values[f.name] = f.factory()
        else:
            raise ConfigError(f"{path}: required")
    return values


def read_value(tp: Any, value: Any, where: str, *, hooks: Hooks = _NO_HOOKS) -> Any:
    """`value` read as any type the reader knows (`Mapping[str, Any]`, say), for a hook that
    reads a section by its own shape."""
    return _value(value, tp, PLAIN, where, False, hooks)


def validate(instance: object) -> None:
    """Checks the fields of a dataclass built in code by the rules `read` applies, and stores
    their normal form (a tuple for a list, a read-only mapping, a float for an int). For a
    `__post_init__`, so that a config built by hand is held to the rules of one read."""
    for f in fields_of(type(instance)):
        if f.rule.skip or f.rule.flatten:
            continue
        value = getattr(instance, f.name)
        declared = without_none(f.type)
        if f.rule.parse and declared is not Any and isinstance(value, declared):
            continue  # already what its parse hook makes
        normal = _read_field(f, value, f.key, False, _NO_HOOKS)
        if normal is not value:
            object.__setattr__(instance, f.name, normal)


def _read_field(f: _Field, value: Any, path: str, text: bool, hooks: Hooks) -> Any:
    if value is None and _is_optional(f.type):
        return None
    if f.rule.parse is not None:
        return f.rule.parse(value, path)
    return _value(value, f.type, f.rule, path, text, hooks)


def _build(cls: type[T], values: dict[str, Any], where: str, *, nested: bool) -> T:
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}" if nested else str(exc)) from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _value(value: Any, tp: Any, r: Rule, path: str, text: bool, hooks: Hooks) -> Any:
    """`value` read as type `tp`; each scalar it holds is checked by `r`."""
    if tp in hooks:
        return hooks[tp](value, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return _value(value, without_none(tp), r, path, text, hooks)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        items = [value] if _is_scalar(value) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{path}: must be a list, got {_kind(value)}")
        return tuple(
            _value(item, args[0], r, f"{path}[{index}]", text, hooks)
            for index, item in enumerate(items)
        )
    if origin in (Mapping, dict):
        mapping = _mapping(value, path)
        return types.MappingProxyType(
            {
                key: _value(item, args[1], r, f"{path}.{key}", text, hooks)
                for key, item in mapping.items()
            }
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return read(tp, value, path, text=text, hooks=hooks)
    if tp is Any:
        return value
    return _scalar(value, tp, r, path, text)


def _scalar(value: Any, tp: Any, r: Rule, path: str, text: bool) -> Any:
    if text and isinstance(value, str) and tp in (bool, int, float):
        value = _from_text(value, tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(sorted(str(member.value) for member in tp))
            raise ConfigError(f"{path}: must be one of {choices}, got {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int or tp is float:
        return _number(value, tp, r, path)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
    elif tp is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{path}: must be a file path, got {value!r}")
        value = Path(value)
    else:  # pragma: no cover - a config class with a type the reader does not know
        raise TypeError(f"{path}: the config reader cannot read {tp!r}")
    _check(value, r, path)
    return value


def _number(value: Any, tp: type, r: Rule, path: str) -> int | float:
    whole = tp is int
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and (isinstance(value, int) if whole else math.isfinite(value))
    )
    ok = ok and (r.minimum is None or value >= r.minimum)
    ok = ok and (r.above is None or value > r.above)
    ok = ok and (r.maximum is None or value <= r.maximum)
    if not ok:
        what = "an integer" if whole else "a finite number"
        raise ConfigError(f"{path}: must be {what}{_bounds(r)}, got {value!r}")
    number = int(value) if whole else float(value)
    _check(number, r, path)
    return number


def _bounds(r: Rule) -> str:
    low = r.minimum if r.minimum is not None else r.above
    if low is not None and r.maximum is not None:
        opening = "[" if r.minimum is not None else "("
        return f" in {opening}{_text(low)}, {_text(r.maximum)}]"
    if r.above is not None:
        return f" > {_text(r.above)}"
    if r.minimum is not None:
        return f" >= {_text(r.minimum)}"
    if r.maximum is not None:
        return f" <= {_text(r.maximum)}"
    return ""


def _text(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _check(value: Any, r: Rule, path: str) -> None:
    if r.check is None:
        return
    try:
        r.check(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}, got {value!r}") from None


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def _from_text(value: str, tp: type) -> Any:
    """An annotation's text as `tp`, or the text unchanged (refused by the type check)."""
    if tp is bool:
        return {"true": True, "false": False}.get(value, value)
    if tp is int:
        return int(value) if _INTEGER_TEXT.fullmatch(value) else value
    try:
        return float(value)
    except ValueError:
        return value


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: must be a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: keys must be strings, got {key!r}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"{value!r}" if _is_scalar(value) or value is None else type(value).__name__


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | Path)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (types.UnionType, typing.Union) and type(
        None
    ) in typing.get_args(tp)


def without_none(tp: Any) -> Any:
    if not _is_optional(tp):
        return tp
    arms = [arm for arm in typing.get_args(tp) if arm is not type(None)]
    if len(arms) != 1:  # pragma: no cover - only X | None is read
        raise TypeError(f"the config reader reads X | None only, not {tp!r}")
    return arms[0]
