"""Where plain data comes from besides YAML: command-line flags laid over a file's data, and
the file paths a file names, taken relative to it."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pointsman.config._reader import fields_of, without_none


def relative_files(cls: type, data: Any, folder: Path) -> Any:
    """`data` (read from a file in `folder`) with each relative file path it holds made
    relative to `folder`: Path fields and `rule(file=True)` ones, in nested classes too. Other
    values, and values of the wrong type (the reader names them), are left as they are."""
    if not isinstance(data, Mapping):
        return data
    resolved = dict(data)
    for f in fields_of(cls):
        tp = without_none(f.type)
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
