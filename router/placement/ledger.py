"""The planner's ledger: memory and copies per instance as one round's plan stands.

Built from the round's `PlanInputs`: committed bytes start from each healthy instance's
committed use plus loads in progress not listed yet; unloads in progress free nothing until
they are done, but their copies stop counting. The round then reserves (a planned load) and
releases (a planned unload) as it goes.
"""

from __future__ import annotations

from router.placement.actions import Load
from router.placement.inputs import InstanceState, PlanInputs
from router.placement.ranking import RoomOnInstance

__all__ = ["Ledger"]


class Ledger:
    """Memory and copies as the plan stands; lives for one round only."""

    def __init__(self, inputs: PlanInputs) -> None:
        self.instances: dict[str, InstanceState] = {
            i.instance_id: i
            for i in sorted(inputs.instances, key=lambda i: i.instance_id)
            if i.healthy
        }
        self.committed = {iid: inst.committed_bytes for iid, inst in self.instances.items()}
        # model -> instances where it is listed, being loaded or planned: no second load there.
        self.present: dict[str, set[str]] = {}
        # model -> instances whose copy counts: present, minus unloads in progress or planned.
        self.counting: dict[str, set[str]] = {}
        # model -> instances where it is listed and stays: the copies serving now, which the
        # last-copy protection counts (a copy still loading may yet fail).
        self.established: dict[str, set[str]] = {}
        # (model, instance) pairs the executor is working on, and those this plan acts on.
        self.in_progress: set[tuple[str, str]] = set()
        self.unloading: set[tuple[str, str]] = set()
        self.acted: set[tuple[str, str]] = set()
        for iid, inst in self.instances.items():
            for loaded in inst.models:
                for holders in (self.present, self.counting, self.established):
                    holders.setdefault(loaded.name, set()).add(iid)
        footprints = {s.name: s.footprint_bytes for s in inputs.specs}
        for action in inputs.in_progress:
            iid = action.instance_id
            if iid not in self.instances:
                continue
            self.in_progress.add((action.model, iid))
            if isinstance(action, Load):
                if self.instances[iid].model(action.model) is None:
                    # Not listed yet, so not in committed_bytes: reserve it.
                    self.committed[iid] += action.footprint_bytes or footprints.get(action.model, 0)
                self.present.setdefault(action.model, set()).add(iid)
                self.counting.setdefault(action.model, set()).add(iid)
                # Triton lists a copy while it loads: it serves nothing yet, and may fail.
                self.established.get(action.model, set()).discard(iid)
            else:
                # Its memory stays committed until the unload is done.
                self.unloading.add((action.model, iid))
                self.counting.get(action.model, set()).discard(iid)
                self.established.get(action.model, set()).discard(iid)

    def copies(self, model: str) -> int:
        return len(self.counting.get(model, ()))

    def established_copies(self, model: str) -> int:
        return len(self.established.get(model, ()))

    def busy(self, model: str, iid: str) -> bool:
        """True when the executor or this plan already acts on the model there."""
        return (model, iid) in self.in_progress or (model, iid) in self.acted

    def models(self) -> set[str]:
        return set(self.present)

    def room(self, iid: str) -> RoomOnInstance:
        inst = self.instances[iid]
        return RoomOnInstance(iid, inst.memory_budget_bytes, self.committed[iid], inst.load)

    def reserve(self, model: str, iid: str, footprint_bytes: int) -> None:
        self.committed[iid] += footprint_bytes
        self.present.setdefault(model, set()).add(iid)
        self.counting.setdefault(model, set()).add(iid)
        self.acted.add((model, iid))

    def release(self, model: str, iid: str, memory_bytes: int) -> None:
        self.committed[iid] -= memory_bytes
        self.counting[model].discard(iid)
        self.established[model].discard(iid)
        self.acted.add((model, iid))
