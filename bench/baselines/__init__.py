"""The systems Pointsman is compared with, each on the same testbed, budget and workload.

| name | module | what it is |
| --- | --- | --- |
| `everything-everywhere` | `everything_everywhere` | identical replicas, per-request round robin |
| `static-split` | `static_split` | placed once by expected popularity, least-request routing |
| `random-among-holders` | `random_among_holders` | ablation: Pointsman's placement, uniform pick |
| `round-robin-load-on-miss` | `round_robin_load_on_miss` | WORST CASE: model-blind, loads on miss |

`SYSTEMS` maps each name, and `pointsman` and `pointsman-proxyless` (bench.pointsman_fleet),
to a factory of its `System` (bench.testbed). bench/README.md says why each is fair.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.baselines.everything_everywhere import EverythingEverywhere
from bench.baselines.random_among_holders import random_among_holders
from bench.baselines.round_robin_load_on_miss import RoundRobinLoadOnMiss
from bench.baselines.static_split import StaticSplit
from bench.pointsman_fleet import PointsmanSystem, proxyless
from bench.testbed import System

__all__ = ["FAIR_BASELINES", "SYSTEMS", "WORST_CASE"]

SYSTEMS: dict[str, Callable[[], System]] = {
    "pointsman": PointsmanSystem,
    "pointsman-proxyless": proxyless,
    "everything-everywhere": EverythingEverywhere,
    "static-split": StaticSplit,
    "random-among-holders": random_among_holders,
    "round-robin-load-on-miss": RoundRobinLoadOnMiss,
}
# What Pointsman's goals are judged against ("the best fair baseline").
FAIR_BASELINES = ("everything-everywhere", "static-split", "random-among-holders")
WORST_CASE = "round-robin-load-on-miss"
