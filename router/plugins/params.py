"""Reading plugin parameters from config data; every error names the parameter.

Messages are relative to the plugin's params (`buffer_bytes: must be >= 0`); `build_profile`
prefixes them with the path of the plugin (`scorers[1].params.`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from pointsman.errors import ConfigError

__all__ = ["read_number", "read_optional_number", "reject_unknown"]


def reject_unknown(params: Mapping[str, Any], known: Collection[str]) -> None:
    """A misspelt parameter must fail loudly, not fall back to its default."""
    for key in params:
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{key}: unknown parameter (allowed: {allowed})")


def read_number(
    params: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    """A finite number within bounds, or `default` when the key is absent."""
    value = read_optional_number(params, key, minimum=minimum, maximum=maximum, positive=positive)
    return default if value is None else value


def read_optional_number(
    params: Mapping[str, Any],
    key: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> float | None:
    """A finite number within bounds, or None when the key is absent or null."""
    value = params.get(key)
    if value is None:
        return None
    # bool is an int in Python, but `true` for a number is a config mistake.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite")
    if positive and value <= 0:
        raise ConfigError(f"{key}: must be > 0")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}: must be <= {maximum:g}")
    return float(value)
