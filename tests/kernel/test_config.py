"""The one config reader (pointsman/config/): types, bounds, paths in every message,
duplicate keys, flags laid over a file, file paths relative to the file."""

from __future__ import annotations

import argparse
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from pointsman.config import (
    flag_dest,
    host_port,
    load_yaml,
    load_yaml_file,
    non_empty,
    read,
    read_fields,
    relative_files,
    rule,
    validate,
    with_flags,
)
from pointsman.errors import ConfigError


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str = field(metadata=rule(key="id", check=non_empty))
    address: str = field(metadata=rule(key="grpc", check=host_port))
    weight: float = field(default=1.0, metadata=rule(minimum=0, maximum=1))


@dataclass(frozen=True, slots=True)
class Inner:
    cert_file: str = field(default="", metadata=rule(file=True))
    level: int = field(default=1, metadata=rule(minimum=1, maximum=3))


@dataclass(frozen=True, slots=True)
class Example:
    interval_s: float = field(default=0.1, metadata=rule(above=0))
    ttl_ms: int = field(default=5000, metadata=rule(above=0))
    enabled: bool = True
    name: str = "x"
    colour: Colour = Colour.RED
    mode: Literal["table", "per-request"] = "table"
    policy_file: Path | None = None
    seed: int | None = None
    items: tuple[Item, ...] = ()
    cpus: tuple[int, ...] = field(default=(), metadata=rule(minimum=0))
    routes: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict, metadata=rule(check=host_port)
    )
    inner: Inner = field(default_factory=Inner)
    extra: Any = None

    def __post_init__(self) -> None:
        validate(self)
        if self.mode == "per-request" and not self.routes:
            raise ConfigError("mode: per-request needs routes")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            {"interval_s": math.nan}, "interval_s: must be a finite number > 0, got nan", id="nan"
        ),
        pytest.param(
            {"interval_s": math.inf}, "interval_s: must be a finite number > 0, got inf", id="inf"
        ),
        pytest.param({"interval_s": 0}, "interval_s: must be a finite number > 0, got 0", id="0"),
        pytest.param(
            {"interval_s": True}, "interval_s: must be a finite number > 0, got True", id="bool"
        ),
        pytest.param({"ttl_ms": 1.5}, "ttl_ms: must be an integer > 0, got 1.5", id="int-1.5"),
        pytest.param({"ttl_ms": math.inf}, "ttl_ms: must be an integer > 0, got inf", id="int-inf"),
        pytest.param({"ttl_ms": "5"}, "ttl_ms: must be an integer > 0, got '5'", id="int-text"),
        pytest.param({"enabled": 1}, "enabled: must be true or false, got 1", id="number-as-bool"),
        pytest.param({"name": 3}, "name: must be a string, got 3", id="str"),
        pytest.param(
            {"colour": "green"}, "colour: must be one of blue, red, got 'green'", id="enum"
        ),
        pytest.param({"mode": "x"}, "mode: must be one of table, per-request, got 'x'", id="lit"),
        pytest.param({"policy_file": 3}, "policy_file: must be a file path, got 3", id="path"),
        pytest.param({"items": {"id": "a"}}, "items: must be a list, got a mapping", id="list"),
        pytest.param(
            {"items": [{"id": "a", "grpc": "h:1"}, {"id": "b", "grpc": "nope"}]},
            "items[1].grpc: must be host:port, got 'nope'",
            id="nested-check",
        ),
        pytest.param({"items": [{"grpc": "h:1"}]}, "items[0].id: required", id="required"),
        pytest.param(
            {"items": [{"id": "a", "grpc": "h:1", "weight": 2}]},
            "items[0].weight: must be a finite number in [0, 1], got 2",
            id="range",
        ),
        pytest.param(
            {"items": [{"id": "a", "grpc": "h:1", "colour": 1}]},
            "items[0].colour: unknown field (allowed: id, grpc, weight)",
            id="unknown-nested",
        ),
        pytest.param({"cpus": [0, -1]}, "cpus[1]: must be an integer >= 0, got -1", id="each"),
        pytest.param(
            {"routes": {"m": ["h:1", "bad"]}}, "routes.m[1]: must be host:port, got 'bad'", id="map"
        ),
        pytest.param({"routes": [1]}, "routes: must be a mapping, got a list", id="not-map"),
        pytest.param({"inner": {"level": 4}}, "inner.level: must be an integer in [1, 3]", id="in"),
        pytest.param({"bogus": 1}, "bogus: unknown field (allowed: interval_s, ", id="unknown"),
        pytest.param({1: 2}, "example: keys must be strings, got 1", id="key-type"),
        pytest.param([1], "example: must be a mapping, got a list", id="top-not-mapping"),
        pytest.param({"mode": "per-request"}, "mode: per-request needs routes", id="across"),
    ],
)
def test_every_error_starts_with_the_fields_path(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        read(Example, data, root="example")
    assert str(info.value).startswith(message), str(info.value)


def test_values_are_typed_and_defaults_filled() -> None:
    config = read(
        Example,
        {
            "interval_s": 2,  # an int where a float goes
            "items": [{"id": "a", "grpc": "h:1"}],
            "cpus": 3,  # a lone scalar is a list of one
            "routes": {"m": "h:1"},
            "colour": "blue",
            "policy_file": "p.yaml",
            "seed": None,
            "name": None,  # null: the default
            "extra": {"anything": [1]},
        },
    )
    assert config.interval_s == 2.0 and isinstance(config.interval_s, float)
    assert config.items == (Item("a", "h:1"),)
    assert config.cpus == (3,)
    assert dict(config.routes) == {"m": ("h:1",)}
    assert config.colour is Colour.BLUE and config.policy_file == Path("p.yaml")
    assert config.name == "x" and config.ttl_ms == 5000 and config.inner == Inner()
    assert config.extra == {"anything": [1]}
    assert read_fields(Inner, None) == {"cert_file": "", "level": 1}


def test_a_class_built_in_code_is_held_to_the_same_rules() -> None:
    with pytest.raises(ConfigError, match=r"^interval_s: must be a finite number > 0, got nan"):
        Example(interval_s=math.nan)
    assert Example(cpus=[1, 2]).cpus == (1, 2)  # type: ignore[arg-type]


def test_base_supplies_what_the_data_leaves_out() -> None:
    base = Example(ttl_ms=7, name="base")
    assert read(Example, {"name": "given"}, base=base) == Example(ttl_ms=7, name="given")


def test_text_mode_parses_scalars_by_type() -> None:
    config = read(Inner, {"level": "2"}, text=True)
    assert config.level == 2
    with pytest.raises(ConfigError, match=r"^level: must be an integer in \[1, 3\], got '2x'"):
        read(Inner, {"level": "2x"}, text=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("a: 1\nb: 2\na: 3\n", "a: duplicate key (lines 1 and 3)", id="top"),
        pytest.param(
            "items:\n  - id: a\n    grpc: h:1\n    id: b\n",
            "items[0].id: duplicate key (lines 2 and 4)",
            id="in-a-list",
        ),
        pytest.param("x: {k: 1, k: 2}\n", "x.k: duplicate key (line 1)", id="flow-mapping"),
        pytest.param("a: [\n", "f.yaml: not valid YAML", id="syntax"),
    ],
)
def test_yaml_refuses_duplicate_keys_at_any_depth(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml(text, "f.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_yaml_keeps_anchors_and_merge_keys() -> None:
    data = load_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\nsame: *b\n", "f.yaml")
    assert data == {"base": {"x": 1}, "other": {"x": 1, "y": 2}, "same": {"x": 1}}
    assert load_yaml("# only a comment\n", "f.yaml") is None


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_yaml_file(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not UTF-8"):
        load_yaml_file(binary)


def test_flags_are_laid_over_the_files_data() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ttl", dest=flag_dest("ttl_ms"), type=int)
    parser.add_argument("--level", dest=flag_dest("inner.level"), type=int)
    parser.add_argument("--cpu", dest=flag_dest("cpus", append=True), type=int, action="append")
    parser.add_argument("--unrelated")
    file_data = {"ttl_ms": 1, "cpus": [0], "inner": {"cert_file": "c.pem"}}
    args = parser.parse_args(["--ttl", "9", "--level", "2", "--cpu", "5", "--unrelated", "x"])
    merged = with_flags(file_data, args)
    assert merged == {"ttl_ms": 9, "cpus": [0, 5], "inner": {"cert_file": "c.pem", "level": 2}}
    assert file_data == {"ttl_ms": 1, "cpus": [0], "inner": {"cert_file": "c.pem"}}  # untouched
    assert with_flags(None, parser.parse_args([])) == {}
    # A flag's bad value is named by the same reader as a file's.
    with pytest.raises(ConfigError, match=r"^ttl_ms: must be an integer > 0, got 0"):
        read(Example, with_flags(file_data, parser.parse_args(["--ttl", "0"])))


def test_file_paths_are_relative_to_the_file() -> None:
    data = {"policy_file": "p.yaml", "inner": {"cert_file": "certs/c.pem"}, "name": "n.yaml"}
    resolved = relative_files(Example, data, Path("/etc/pointsman"))
    assert resolved == {
        "policy_file": "/etc/pointsman/p.yaml",
        "inner": {"cert_file": "/etc/pointsman/certs/c.pem"},
        "name": "n.yaml",  # not a file field
    }
    absolute = {"policy_file": "/abs/p.yaml", "inner": "not a mapping"}
    assert relative_files(Example, absolute, Path("/etc")) == absolute
