"""The scenarios of `pointsman bench --scenario NAME`, each a module with
`scenario(options, say) -> ScenarioResult` (`SCENARIOS` lists them with a line each):

- `comparison`: Pointsman against fair baselines, workloads x systems x repetitions;
- `seed-table`: the model-router article's table, round robin (worst case) vs Pointsman;
- `overhead`: what the sidecar adds: direct vs sidecar vs a 20-line proxy vs nghttpx;
- `batching`: decode step cost by batch size, and Triton's dynamic batcher on vs off;
- `overload`: high-priority latency and low-priority shedding at three times capacity;
- `route-propagation`: a fleet change and a policy file change, to routing;
- `scale`: the router's engines on simulated fleets (no processes);
- `scale-sweep`: holders per model at 1000 instances: index, rebuild, PickTarget over gRPC;
- `proxyless`: direct vs proxyless (xDS from the router) vs sidecar vs nghttpx, CPU per request.

`--quick` makes each a smoke run of seconds; the scenarios that need one Triton or a one-Triton
fleet (`ON_SHARED_FLEET`) then share one (`quick_fleet.SharedFleet`, in `Options.shared`), and
those that start their own systems (`OWN_SYSTEMS`) run beside them in a second process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.report import ScenarioResult

if TYPE_CHECKING:
    from bench.scenarios.quick_fleet import SharedFleet

__all__ = [
    "ON_SHARED_FLEET",
    "OWN_SYSTEMS",
    "SCENARIOS",
    "Options",
    "Say",
    "Scenario",
    "run_scenario",
]

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line sets for every scenario; each reads what applies to it."""

    quick: bool = False  # a smoke run: small and short
    duration_s: float | None = None  # the measured seconds of each cell, when given
    seed: int = 7
    progress: bool = False
    repetitions: int | None = None  # comparison: repetitions per cell
    systems: tuple[str, ...] = ()  # comparison: which systems (empty: all)
    workloads: tuple[str, ...] = ()  # comparison: which workloads (empty: all)
    # A quick run's one small fleet, shared by the scenarios that need one Triton; None:
    # each scenario starts its own processes.
    shared: SharedFleet | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    module: str
    help: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("comparison", "comparison", "Pointsman vs fair baselines, repeated, with CIs"),
        Scenario("seed-table", "seed_table", "round robin + load-on-miss vs Pointsman (+batcher)"),
        Scenario("overhead", "overhead", "direct vs sidecar vs minimal proxy vs nghttpx"),
        Scenario("batching", "batching", "decode cost by batch size; dynamic batcher on vs off"),
        Scenario("overload", "overload", "priority classes at three times capacity"),
        Scenario("route-propagation", "route_propagation", "fleet and policy changes to routing"),
        Scenario("scale", "scale", "router engines on simulated fleets"),
        Scenario("scale-sweep", "scale_sweep", "holders per model, index, rebuild, PickTarget"),
        Scenario("proxyless", "proxyless", "direct vs proxyless xDS vs sidecar vs nghttpx"),
    )
}
# In quick mode these run on the quick run's one shared fleet (quick_fleet.SharedFleet)...
ON_SHARED_FLEET = frozenset({"overhead", "batching", "overload", "route-propagation", "proxyless"})
# ... and these, which start their own systems cell by cell, in a second process beside them.
OWN_SYSTEMS = frozenset({"comparison", "seed-table"})


def run_scenario(name: str, options: Options, say: Say) -> ScenarioResult:
    module = importlib.import_module(f"bench.scenarios.{SCENARIOS[name].module}")
    result: ScenarioResult = module.scenario(options, say)
    return result
