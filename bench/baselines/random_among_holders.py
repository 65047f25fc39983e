"""Ablation `random-among-holders`: Pointsman's placement, its scorers replaced by a uniform pick.

The same router, sidecar, policy and placement controller as `pointsman`, with one change in
the policy file: `scheduling: {scorers: [], picker: {type: max-score}}`. With no scorer every
holder of the model totals 0, so `max-score` draws uniformly among them (the filters still
keep only healthy instances where the model is ready). The sidecar asks the router for every
request (`--pick-mode per-request`): in table mode it would balance by its own in-flight counts
(power of two choices), which is a scoring rule of its own. The router round trip this adds is
part of what the ablation measures; compare with `pointsman` to see what scoring buys beyond
placement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.pointsman_fleet import PointsmanSystem

__all__ = ["UNIFORM_SCHEDULING", "random_among_holders"]

UNIFORM_SCHEDULING: Mapping[str, Any] = {"scorers": [], "picker": {"type": "max-score"}}


def random_among_holders() -> PointsmanSystem:
    return PointsmanSystem(
        name="random-among-holders",
        description=(
            "ablation: Pointsman's placement, a uniform pick among the model's holders "
            "(no scorers; the router picks per request)"
        ),
        scheduling=UNIFORM_SCHEDULING,
        pick_mode="per-request",
    )
