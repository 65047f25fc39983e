"""YAML for the config reader: plain data, with a key given twice refused at any depth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pointsman.config._rules import join_path
from pointsman.errors import ConfigError


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
            where = join_path(path, str(key))
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
