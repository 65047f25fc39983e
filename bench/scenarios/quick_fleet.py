"""The one small fleet that the scenarios of a `--quick` run share.

Starting a Triton, a router and a sidecar costs seconds each time, and a smoke run of every
scenario that started its own would take minutes. So in quick mode the scenarios that need one
Triton (overhead, batching) or a one-Triton fleet (proxyless, overload, route-propagation) use
this one, started at first use and stopped when the run ends: one Triton serving `add_one` and
`codegen` (versions 1 and 2), the router, and a sidecar that answers UNAVAILABLE at once for a
model with no route (route-propagation times exactly that).

Its policy is the union of what those scenarios need: overload's priority classes and
route-propagation's policy (placement off, so models change only behind the router's back,
and codegen split between its versions). A scenario that changes the policy writes its part
through `SharedFleet.write_policy`, which keeps the rest. Scenarios run one after another and
each leaves the fleet as it found it (batching restores codegen's shipped configuration,
route-propagation ends on the split). Outside quick mode every scenario starts its own
processes, as `one_triton` and `fleet_for` do when there is no shared fleet.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from app.fleet import Fleet, FleetConfig
from app.processes import ManagedProcess, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready

__all__ = ["MODELS", "SharedFleet", "fleet_for", "merged", "one_triton", "shared_policy"]

MODELS = ("add_one", "codegen")


def merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` written over it, mappings merged key by key."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def shared_policy(text: str) -> str:
    """The shared fleet's policy file: overload's priority classes, and `text` (a policy
    document, route-propagation's) over them."""
    # Imported here: those scenarios import this module.
    from bench.scenarios.overload import PRIORITY_POLICY

    document = merged(yaml.safe_load(PRIORITY_POLICY), yaml.safe_load(text))
    return yaml.safe_dump(document, sort_keys=False)


class SharedFleet:
    """The quick run's fleet: started by the first `fleet()`, stopped by `close()`."""

    def __init__(self) -> None:
        self._fleet: Fleet | None = None
        self._policy_file: Path | None = None

    def fleet(self) -> Fleet:
        if self._fleet is None:
            from bench.scenarios.route_propagation import SPLIT  # see shared_policy

            run_dir = Path(tempfile.mkdtemp(prefix="pointsman-bench-quick-"))
            self._policy_file = run_dir / "policy.yaml"
            self.write_policy(SPLIT)
            fleet = Fleet(
                FleetConfig(
                    instances=1,
                    placement={"triton-0": MODELS},
                    models=MODELS,
                    sidecar_port=0,
                    router_port=0,
                    run_dir=run_dir,
                    policy_file=self._policy_file,
                    sidecar_args=("--cold-start-wait", "0"),
                )
            )
            fleet.start()
            self._fleet = fleet
        return self._fleet

    def write_policy(self, text: str) -> None:
        """Writes the policy file (`shared_policy(text)`); the router reloads it."""
        if self._policy_file is None:
            raise RuntimeError("the shared fleet has not started")
        self._policy_file.write_text(shared_policy(text))

    def close(self) -> None:
        if self._fleet is not None:
            self._fleet.stop()
            self._fleet = None

    def __enter__(self) -> SharedFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def one_triton(
    shared: SharedFleet | None, models: Sequence[str], workdir: Path, name: str = "bench-triton"
) -> Iterator[tuple[TritonSpec, ManagedProcess]]:
    """The shared fleet's Triton, or else a fresh one that loads `models`, stopped at the end."""
    if shared is not None:
        fleet = shared.fleet()
        missing = set(models) - set(fleet.tritons[0].load_models)
        if missing:
            raise ValueError(f"the shared fleet does not serve {sorted(missing)}")
        yield fleet.tritons[0], fleet.processes[0]
        return
    spec = TritonSpec.on_free_ports(
        name, load_models=tuple(models), log_path=workdir / f"{name}.log"
    )
    process = triton_process(spec, prepare_installation())
    try:
        process.start()
        wait_until_ready(spec.grpc_address, list(models), 60, process)
        yield spec, process
    finally:
        stop_all([process])


@contextmanager
def fleet_for(shared: SharedFleet | None, config: FleetConfig) -> Iterator[Fleet]:
    """The shared fleet, or else a fresh one of `config`, stopped at the end."""
    if shared is not None:
        yield shared.fleet()
        return
    with Fleet(config) as fleet:
        yield fleet
