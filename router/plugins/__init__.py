"""Scheduling plugins: one module per filter, scorer or picker, each documented in its docstring.

filters   model_ready.py (model-ready), healthy_fresh.py (healthy-fresh)
scorers   model_affinity.py (model-affinity), memory_headroom.py (memory-headroom),
          queue_depth.py (queue-depth), load.py (load)
pickers   weighted_random.py (weighted-random), power_of_two.py (power-of-two),
          max_score.py (max-score)
registry.py  type name -> factory (built-ins registered in `default_registry`), and
             config data -> `SchedulingProfile` (`build_profile`, `default_profile`)
"""

from __future__ import annotations

from router.plugins.registry import (
    DEFAULT_PROFILE_DATA,
    PluginKind,
    PluginRegistry,
    build_profile,
    default_profile,
    default_registry,
)

__all__ = [
    "DEFAULT_PROFILE_DATA",
    "PluginKind",
    "PluginRegistry",
    "build_profile",
    "default_profile",
    "default_registry",
]
