"""Which version of a model an unpinned request gets: header rules, then a weighted split.

Shared by the router (PickTarget, route tables) and the sidecar (which receives the same rules in
each route table's `VersionPolicy`), so both choose alike. Nothing here imports router code.

    select_version(rules, headers, rng, available):
      1. the first header rule whose header has exactly the rule's value -> its version;
      2. the split over the arms whose version is in `available`: a point in
         [0, sum of their weights) picks the arm whose cumulative weight range holds it.
         The point is random (`rng`), or, when `sticky_header` is set and the request carries
         it, blake2b(header value) / 2**64 of the total, so one user always lands on one arm
         and many users spread by the weights;
      3. None: the caller uses the model's default version.

A header rule applies even when its version is not in `available`: it is a pin chosen by the
operator, as `x-model-version` is one chosen by the client. Header names are gRPC metadata
keys, which are lower case; `headers` is looked up with the rule's name as it is.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pointsman.router.v1 import router_pb2 as pb

__all__ = [
    "PIN_HEADER",
    "HeaderRule",
    "VersionRules",
    "rules_from_proto",
    "rules_to_proto",
    "select_version",
    "sticky_point",
]

# A request pins a version with this header when its model_version field is empty.
PIN_HEADER = "x-model-version"

_HASH_SPAN = float(2**64)


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """Requests whose `header` equals `value` get `version`."""

    header: str
    value: str
    version: str


@dataclass(frozen=True, slots=True)
class VersionRules:
    """How one model's unpinned requests choose a version. The empty rules choose nothing."""

    # (version, weight) arms, weights > 0 and relative; () = no split.
    split: tuple[tuple[str, float], ...] = ()
    # Header whose value's hash picks the arm; "" = a random draw per request.
    sticky_header: str = ""
    header_rules: tuple[HeaderRule, ...] = ()

    def __post_init__(self) -> None:
        # The policy loader names fields in its own messages; this guards direct use.
        for version, weight in self.split:
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"split weight of version '{version}' must be finite and > 0")
        versions = [version for version, _ in self.split]
        if len(set(versions)) != len(versions):
            raise ValueError(f"split lists a version twice: {versions}")

    @property
    def is_empty(self) -> bool:
        return not self.split and not self.header_rules


def sticky_point(value: str) -> float:
    """A stable point in [0, 1) for a header value: the same on every host and run."""
    digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN


def select_version(
    rules: VersionRules,
    headers: Mapping[str, str],
    rng: random.Random,
    available: Collection[str],
) -> str | None:
    """The version for an unpinned request, or None for the default (see the module docstring).

    `available` holds the versions ready somewhere; split arms outside it are left out and the
    others share the traffic by their weights. Draws from `rng` only for a non-sticky split.
    """
    for rule in rules.header_rules:
        if headers.get(rule.header) == rule.value:
            return rule.version
    arms = [(version, weight) for version, weight in rules.split if version in available]
    if not arms:
        return None
    total = sum(weight for _, weight in arms)
    sticky_value = headers.get(rules.sticky_header) if rules.sticky_header else None
    unit = sticky_point(sticky_value) if sticky_value is not None else rng.random()
    point = unit * total
    for version, weight in arms:
        point -= weight
        if point < 0:
            return version
    return arms[-1][0]  # rounding left the point at the very end


def rules_to_proto(rules: VersionRules) -> pb.VersionPolicy:
    return pb.VersionPolicy(
        splits=[pb.VersionWeight(version=v, weight=w) for v, w in rules.split],
        sticky_header=rules.sticky_header,
        header_rules=[
            pb.HeaderRule(header=r.header, value=r.value, version=r.version)
            for r in rules.header_rules
        ],
    )


def rules_from_proto(policy: pb.VersionPolicy) -> VersionRules:
    """Raises ValueError on a split weight that is not finite and > 0."""
    return VersionRules(
        split=tuple((s.version, s.weight) for s in policy.splits),
        sticky_header=policy.sticky_header,
        header_rules=tuple(
            HeaderRule(header=r.header, value=r.value, version=r.version)
            for r in policy.header_rules
        ),
    )
