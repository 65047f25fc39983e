"""One reader for every configuration Pointsman takes: YAML files, flags and pod annotations.

    file --load_yaml_file--> plain data --with_flags--> plain data --read--> frozen dataclass

`load_yaml` refuses a key given twice in one mapping, at any depth. `read` takes the field list
(names, types, defaults) from the dataclass itself, and bounds and checks from each field's
metadata (`rule`), so a config class is the whole description of what its file may hold:

    @dataclass(frozen=True, slots=True)
    class Example:
        listen: str = field(default="127.0.0.1:8101", metadata=rule(check=host_port))
        interval_s: float = field(default=1.0, metadata=rule(above=0))
        instances: tuple[Instance, ...] = ()

    read(Example, {"interval_s": 0.5})

Every error is a ConfigError whose message starts with the field's path and says what the field
must be: `instances[1].grpc: must be host:port, got 8001`, `refresh_interval_s: must be a finite
number > 0, got nan`. Keys the class does not know are refused by name.

Types: bool (true or false only), int (not a bool, not 1.5), float (finite; an int is taken),
str, Path, Enum (by value), Literal, `X | None`, `tuple[X, ...]` (a lone scalar is a list of one),
`Mapping[str, X]`, nested dataclasses, and Any (taken as it is). A null value means the field's
default. With `text=True` (pod annotations) scalars arrive as strings and are parsed by type.
A type the reader should not read by shape (a TLS block, a version split) gets a hook: `hooks`
maps a type to `(value, path) -> value`, and `rule(parse=...)` does the same for one field.

Command-line flags take the same path: a flag added with `dest=flag_dest("tls.cert_file")`
(`append=True` adds to a list) is laid over the file's plain data by `with_flags`, then read.
"""

from __future__ import annotations

import argparse
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

import yaml

from pointsman.errors import ConfigError

__all__ = [
    "Hooks",
    "Rule",
    "flag_dest",
    "host_port",
    "http_url",
    "keys_of",
    "load_yaml",
    "load_yaml_file",
    "non_empty",
    "or_empty",
    "read",
    "read_fields",
    "read_value",
    "relative_files",
    "rule",
    "validate",
    "with_flags",
]

T = TypeVar("T")
# Reads one type's raw value: (value, path of the field) -> the typed value.
Hooks = Mapping[Any, Callable[[Any, str], Any]]

_METADATA_KEY = "pointsman.config"
_NO_HOOKS: Hooks = types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Rule:
    """What a field's metadata adds to its type; see `rule`."""

    key: str | None = None
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    check: Callable[[Any], None] | None = None
    parse: Callable[[Any, str], Any] | None = None
    flatten: bool = False
    skip: bool = False
    file: bool = False


_PLAIN = Rule()


def rule(
    *,
    key: str | None = None,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    check: Callable[[Any], None] | None = None,
    parse: Callable[[Any, str], Any] | None = None,
    flatten: bool = False,
    skip: bool = False,
    file: bool = False,
) -> dict[str, Rule]:
    """Field metadata for the reader: `field(default=1.0, metadata=rule(above=0))`.

    key: the name in the file, when not the field's. minimum / above / maximum: bounds of a
    number (or of each number a list or mapping holds). check: called on each scalar the field
    holds; raises ValueError("must be ...") to refuse it. parse: reads the raw value itself,
    `(value, path) -> value`. flatten: a nested dataclass whose keys sit beside this class's
    own. skip: never read (the code sets it). file: a path taken relative to the config file.
    """
    return {_METADATA_KEY: Rule(key, minimum, above, maximum, check, parse, flatten, skip, file)}


# --- common checks -------------------------------------------------------------------------


def host_port(value: str) -> None:
    """host:port with a port in [0, 65535] (0: any free port, where a server binds)."""
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and int(port) <= 65535):
        raise ValueError("must be host:port")


def or_empty(check: Callable[[str], None]) -> Callable[[str], None]:
    """`check`, except that "" (the field left empty: off, or the default) passes."""

    def check_unless_empty(value: str) -> None:
        if value:
            check(value)

    return check_unless_empty


def non_empty(value: str) -> None:
    if not value:
        raise ValueError("must be a non-empty string")


def http_url(value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http(s) URL")


# --- YAML ----------------------------------------------------------------------------------


def load_yaml(text: str, source: str) -> Any:
    """The plain data of YAML `text`; ConfigError for bad YAML (naming `source`) and for a key
    given twice in one mapping, at any depth (naming its path: YAML would keep the last one)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, "", set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: Path) -> Any:
    """`load_yaml` of the file at `path`; errors reading it name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    return load_yaml(text, str(path))


def _refuse_duplicate_keys(
    loader: yaml.SafeLoader, node: yaml.Node, path: str, seen_nodes: set[int]
) -> None:
    if id(node) in seen_nodes:  # an alias of a node already walked (anchors may recurse)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, f"{path}[{index}]", seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            where = _join(path, str(key))
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the reader refuses it later
                first = None
            else:
                lines.setdefault(key, line)
            if first is not None:
                lines_text = f"line {line}" if first == line else f"lines {first} and {line}"
                raise ConfigError(f"{where}: duplicate key ({lines_text})")
            _refuse_duplicate_keys(loader, value_node, where, seen_nodes)


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str
    type: Any
    rule: Rule
    default: Any  # dataclasses.MISSING when required
    factory: Any  # dataclasses.MISSING without a default_factory


_FIELDS: dict[type, tuple[_Field, ...]] = {}


def _fields(cls: type) -> tuple[_Field, ...]:
    """`cls`'s init fields with their resolved types and rules (read once per class)."""
    known = _FIELDS.get(cls)
    if known is None:
        hints = typing.get_type_hints(cls)
        known = _FIELDS[cls] = tuple(
            _Field(
                name=f.name,
                key=(r := f.metadata.get(_METADATA_KEY, _PLAIN)).key or f.name,
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
    for f in _fields(cls):
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
            raise ConfigError(f"{_join(where, key)}: unknown field (allowed: {', '.join(allowed)})")
    values: dict[str, Any] = {}
    for f in _fields(cls):
        if f.rule.skip:
            continue
        if f.rule.flatten:
            own = {key: mapping[key] for key in keys_of(f.type) if key in mapping}
            inner = None if base is None else getattr(base, f.name)
            values[f.name] = read(f.type, own, where, base=inner, text=text, hooks=hooks)
            continue
        value = mapping.get(f.key)
        path = _join(where, f.key)
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
    return _value(value, tp, _PLAIN, where, False, hooks)


def validate(instance: object) -> None:
    """Checks the fields of a dataclass built in code by the rules `read` applies, and stores
    their normal form (a tuple for a list, a read-only mapping, a float for an int). For a
    `__post_init__`, so that a config built by hand is held to the rules of one read."""
    for f in _fields(type(instance)):
        if f.rule.skip or f.rule.flatten:
            continue
        value = getattr(instance, f.name)
        declared = _without_none(f.type)
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
        return _value(value, _without_none(tp), r, path, text, hooks)
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


def _without_none(tp: Any) -> Any:
    if not _is_optional(tp):
        return tp
    arms = [arm for arm in typing.get_args(tp) if arm is not type(None)]
    if len(arms) != 1:  # pragma: no cover - only X | None is read
        raise TypeError(f"the config reader reads X | None only, not {tp!r}")
    return arms[0]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --- files and flags -----------------------------------------------------------------------


def relative_files(cls: type, data: Any, folder: Path) -> Any:
    """`data` (read from a file in `folder`) with each relative file path it holds made
    relative to `folder`: Path fields and `rule(file=True)` ones, in nested classes too. Other
    values, and values of the wrong type (the reader names them), are left as they are."""
    if not isinstance(data, Mapping):
        return data
    resolved = dict(data)
    for f in _fields(cls):
        tp = _without_none(f.type)
        if f.rule.flatten:
            resolved.update(relative_files(tp, resolved, folder))
            continue
        value = resolved.get(f.key)
        if (f.rule.file or tp is Path) and isinstance(value, str) and value:
            resolved[f.key] = str(folder / value)  # an absolute value stays as it is
        elif dataclasses.is_dataclass(tp) and isinstance(tp, type) and f.key in resolved:
            resolved[f.key] = relative_files(tp, value, folder)
    return resolved


_SET = "config="
_ADD = "config+"


def flag_dest(path: str, *, append: bool = False) -> str:
    """The argparse `dest` of a flag that sets the config field at `path` ("tls.cert_file"):
    `with_flags` lays it over the file's data. append: the flag's list adds to the file's."""
    return f"{_ADD if append else _SET}{path}"


def with_flags(data: Any, args: argparse.Namespace) -> Any:
    """The file's plain data with every flag of `flag_dest` that was given laid over it."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return data  # the reader refuses it, naming the file's top level
    merged = _copy_mappings(data)
    for dest, value in sorted(vars(args).items()):
        if not dest.startswith((_SET, _ADD)) or value is None or value == []:
            continue
        *parents, key = dest[len(_SET) :].split(".")
        node = merged
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                break  # the file's value there is no mapping: the reader names it
        else:
            if dest.startswith(_ADD) and node.get(key) is not None:
                given = node[key]
                node[key] = [*(given if isinstance(given, list) else [given]), *value]
            else:
                node[key] = value
    return merged


def _copy_mappings(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_mappings(v) if isinstance(v, Mapping) else v for k, v in data.items()}
