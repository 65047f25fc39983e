"""Scheduling plugins: one module per filter, scorer or picker, each documented in its docstring.

README.md here lists them all (formula, inputs, parameters) and says how to add one.
registry.py  type name -> factory (built-ins in `BUILT_IN_PLUGINS`, registered by
             `default_registry`), and config data -> `SchedulingProfile` (`build_profile`,
             `default_profile`)
"""

from __future__ import annotations

from router.plugins.registry import (
    BUILT_IN_PLUGINS,
    DEFAULT_PROFILE_DATA,
    PluginKind,
    PluginRegistry,
    build_profile,
    default_profile,
    default_registry,
)

__all__ = [
    "BUILT_IN_PLUGINS",
    "DEFAULT_PROFILE_DATA",
    "PluginKind",
    "PluginRegistry",
    "build_profile",
    "default_profile",
    "default_registry",
]
