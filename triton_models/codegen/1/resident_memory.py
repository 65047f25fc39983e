"""Honest memory: a model's process holds the footprint the model declares.

The router places models by their declared footprint, the config parameter
`pointsman.memory_bytes` (one loaded version, one Python stub process). For the budget to be
real, each model tops its stub process up to that size at initialize, once its weights and
caches are allocated: a zero-filled (so resident) buffer of what is missing, less a little
working memory that serving requests takes up afterwards. The stub's RSS then matches what
placement counts. When the process is already larger, the model warns: the declared value
is too low and should be raised.

This file lives in triton_models/codegen/1/; the other models' version folders link to it,
since the Python backend puts a model's version folder on sys.path.
"""

from __future__ import annotations

import os

DECLARED_KEY = "pointsman.memory_bytes"


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def declared_bytes(config: dict) -> int:
    value = config.get("parameters", {}).get(DECLARED_KEY, {}).get("string_value", "")
    return int(value or 0)


def hold_declared(config: dict, warn: object = None, working_bytes: int = 3 << 20) -> bytearray:
    """A resident buffer that brings this process up to the declared footprint less
    `working_bytes`, which serving requests takes up later; keep it.

    `warn` (a callable taking a message) hears when the process already exceeds it.
    """
    declared = declared_bytes(config)
    missing = declared - working_bytes - rss_bytes()
    if declared and missing < 0 and callable(warn):
        warn(
            f"{DECLARED_KEY} {declared} is below this model's resident memory "
            f"({declared - working_bytes - missing} bytes) plus {working_bytes} for serving: "
            "raise it"
        )
    # bytearray(n) is zero-filled with memset, so every page is touched and resident.
    return bytearray(max(0, missing) if declared else 0)
