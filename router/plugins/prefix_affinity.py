"""Scorer `prefix-affinity`: send requests that share a prompt prefix to the instance that holds it.

Inputs: `request.affinity_key` (PickTarget's `affinity_key`: a sidecar sends its prompt-prefix
key) and `cycle.prefix` (the model's `prefix_routing` in the policy); per candidate its gRPC
address, the model's `pending_requests` and `candidate.assumed_inflight`.
Formula: the candidates are the key's holders; each holder's load is q = pending_requests +
assumed_inflight (queue-depth's q: Triton's queue plus the router's picks of the last two
metric intervals, so the bound caps each holder's share of the model's recent picks). The
chosen holder is the first in the key's rendezvous order whose load, this request added,
stays within ceil((1 + epsilon) x mean) (consistent hashing with bounded loads,
`pointsman.affinity.choose_holder`, the choice sidecars make over the same addresses): it
scores 1.0, every other candidate 0.0. Without a key, or for a model without prefix routing,
every candidate scores 0.0, so the scorer changes neither the other scores' ranking nor the
route tables' weights. Give it a weight above the sum of the others' (the default profile's
10 against 7) so the chosen holder is the pick.
Parameters: none (epsilon and the key's blocks are the model's `prefix_routing`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pointsman.affinity import choose_holder
from pointsman.prefix_routing import parse_affinity_key
from router.contracts import Candidate, SchedulingCycle, SnapshotField
from router.plugins.params import reject_unknown

__all__ = ["PrefixAffinityScorer"]


@dataclass(frozen=True, slots=True)
class PrefixAffinityScorer:
    TYPE_NAME: ClassVar[str] = "prefix-affinity"
    CONSUMES: ClassVar[frozenset[SnapshotField]] = frozenset(
        {SnapshotField.MODEL_PENDING_REQUESTS, SnapshotField.ASSUMED_INFLIGHT}
    )

    name: str = TYPE_NAME

    def score(self, cycle: SchedulingCycle, candidates: Sequence[Candidate]) -> list[float]:
        key, prefix = cycle.request.affinity_key, cycle.prefix
        if not key or prefix is None or not candidates:
            return [0.0] * len(candidates)
        model_name = cycle.request.model_name
        addresses = [c.instance.grpc_address for c in candidates]
        loads = {a: _load(c, model_name) for a, c in zip(addresses, candidates, strict=True)}
        chosen = choose_holder(parse_affinity_key(key), addresses, loads, prefix.epsilon).holder
        return [1.0 if address == chosen else 0.0 for address in addresses]

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> PrefixAffinityScorer:
        reject_unknown(params, ())
        return cls(name=name)


def _load(candidate: Candidate, model_name: str) -> float:
    model = candidate.instance.model(model_name)
    return float((model.pending_requests if model is not None else 0) + candidate.assumed_inflight)
