"""A priority class: which Triton priority level a request gets, and whether overload may shed
it. The router's policy defines the classes (`priority_classes:` in the policy file), WatchRoutes
carries them to every sidecar, whose admission ranks and sheds requests by them."""

from __future__ import annotations

from dataclasses import dataclass, field

from pointsman.config import rule
from pointsman.router.v1 import router_pb2

__all__ = ["PriorityClass", "priority_class_from_proto"]


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """One class of requests. In the policy file its name is its key, so it is not read."""

    name: str = field(metadata=rule(skip=True))
    # Triton's request priority; 1 is the highest level.
    triton_priority: int = field(metadata=rule(minimum=1))
    sheddable: bool = False


def priority_class_from_proto(message: router_pb2.PriorityClass) -> PriorityClass:
    return PriorityClass(message.name, message.triton_priority, message.sheddable)
