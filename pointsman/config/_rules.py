"""Field rules of the config reader: what a field's metadata adds to its type, and the common
checks (host:port, URL, non-empty)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "pointsman.config"


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


PLAIN = Rule()


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
    return {METADATA_KEY: Rule(key, minimum, above, maximum, check, parse, flatten, skip, file)}


def join_path(where: str, key: str) -> str:
    """The path of `key` inside the value at `where` ("" at the top)."""
    return f"{where}.{key}" if where else key


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


# gRPC metadata keys: lower case letters, digits, '-', '_' and '.'.
_METADATA_KEY = re.compile(r"[0-9a-z_.\-]+")


def metadata_key(value: str) -> None:
    """A gRPC metadata key (a header name): non-empty, lower case, a-z 0-9 '-' '_' '.'."""
    non_empty(value)
    if value != value.lower():
        raise ValueError("must be lower case (gRPC metadata keys are)")
    if not _METADATA_KEY.fullmatch(value):
        raise ValueError("a metadata key has only a-z, 0-9, '-', '_', '.'")


def http_url(value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http(s) URL")
