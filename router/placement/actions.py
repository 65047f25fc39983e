"""What the planner proposes: loads and unloads, each with the reason shown to operators.

The executor (not this package) carries them out, in the order given:
    Load    `RepositoryModelLoad` on the instance; it may start only once every Unload named in
            `after_unloads` (same instance) has finished, as their memory is what it fits into.
    Unload  remove the instance from the model's routes, let in-flight requests on it finish
            (drain), then `RepositoryModelUnload`. Never unload first: requests would fail.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["Action", "Load", "LoadPriority", "Unload"]


class LoadPriority(enum.IntEnum):
    """Higher runs first. A request waiting for a model loaded nowhere outranks foresight."""

    PROACTIVE = 0
    REQUESTED = 1


@dataclass(frozen=True, slots=True)
class Load:
    model: str
    instance_id: str
    # E.g. "demand 120 rps > 2 copies x 50 rps".
    reason: str
    priority: LoadPriority = LoadPriority.PROACTIVE
    # Bytes the planner reserved for it on the instance.
    footprint_bytes: int = 0
    # Models on the same instance whose Unload (planned with this Load) must finish first.
    after_unloads: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unload:
    """Remove from routes, drain, then unload (see the module docstring)."""

    model: str
    instance_id: str
    # E.g. "evict LRU to fit codegen".
    reason: str
    # Bytes the planner expects it to free.
    memory_bytes: int = 0
    # The model this eviction makes room for; "" when it is a scale-down.
    for_load: str = ""


Action: TypeAlias = Load | Unload
