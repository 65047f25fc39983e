"""Choosing one Triton instance among a route's candidates: weighted power of two choices.

Formula: draw candidate a with probability w_a / sum(w), then a different candidate b with
probability w_b / (sum(w) - w_a); send to the one with the lower in_flight / weight, to a on a
tie. `in_flight` is the sidecar's OWN count of requests it has sent to the instance and not seen
answered (it needs no metrics and is never stale). At low load every count is 0 and traffic
splits by weight; under load the less busy instance of each pair wins, which keeps the worst
queue short without the herding that "always the least loaded" causes across many sidecars.

Inputs: a `CandidateSet` (built once per route table, not per request) and an injected
`random.Random`. Parameters: none.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate

from sidecar.upstream import Upstream

__all__ = ["CandidateSet", "pick", "pick_avoiding"]


class CandidateSet:
    """Instances that can serve one (model, version), with their weights, ready for `pick`."""

    __slots__ = ("cum_weights", "total", "uniform", "upstreams", "weights")

    def __init__(self, upstreams: Sequence[Upstream], weights: Sequence[float]) -> None:
        if not upstreams or len(upstreams) != len(weights):
            raise ValueError("a candidate set needs one weight per upstream, at least one")
        # A weight that is unset (proto3 default 0), negative or not finite counts as 1.
        clean = tuple(w if math.isfinite(w) and w > 0 else 1.0 for w in weights)
        self.upstreams: tuple[Upstream, ...] = tuple(upstreams)
        self.weights: tuple[float, ...] = clean
        self.cum_weights: tuple[float, ...] = tuple(accumulate(clean))
        self.total: float = self.cum_weights[-1]
        # Equal weights need no bisection: the common case stays cheap.
        self.uniform: bool = all(w == clean[0] for w in clean)

    def __len__(self) -> int:
        return len(self.upstreams)

    def __repr__(self) -> str:
        pairs = ", ".join(
            f"{u.address}:{w:g}" for u, w in zip(self.upstreams, self.weights, strict=True)
        )
        return f"CandidateSet({pairs})"


def pick(candidates: CandidateSet, rng: random.Random) -> Upstream:
    """The instance to send one request to (see the module docstring for the rule)."""
    upstreams = candidates.upstreams
    n = len(upstreams)
    if n == 1:
        return upstreams[0]
    if candidates.uniform:
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        a = upstreams[i]
        b = upstreams[j]
        return a if a.in_flight <= b.in_flight else b
    weights = candidates.weights
    cum = candidates.cum_weights
    i = min(bisect_right(cum, rng.random() * candidates.total), n - 1)
    w_i = weights[i]
    # Draw b from the other candidates: a point on the line with a's interval cut out.
    v = rng.random() * (candidates.total - w_i)
    if v >= cum[i] - w_i:
        v += w_i
    j = min(bisect_right(cum, v), n - 1)
    if j == i:  # only by float rounding at an interval's edge
        j = (i + 1) % n
    a = upstreams[i]
    b = upstreams[j]
    return a if a.in_flight * weights[j] <= b.in_flight * w_i else b


def pick_avoiding(
    candidates: CandidateSet, rng: random.Random, avoid: Callable[[str], bool]
) -> Upstream:
    """`pick` among the candidates whose address `avoid` rejects (ejected instances); among
    all of them when it rejects every one, since a doubtful instance beats none."""
    kept = [(u, w) for u, w in zip(candidates.upstreams, candidates.weights, strict=True)
            if not avoid(u.address)]  # fmt: skip
    if not kept or len(kept) == len(candidates):
        return pick(candidates, rng)
    return pick(CandidateSet([u for u, _ in kept], [w for _, w in kept]), rng)
