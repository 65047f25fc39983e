"""Prefix routing in the sidecar: a request whose prompt shares its leading blocks with earlier
ones goes to the instance that likely holds them in its prefix cache, unless that instance is
busier than its share.

For a model whose route table carries the policy's `prefix_routing` (the model declares a
prompt input), `prefix_key` peeks the prompt's first bytes from the raw request
(`sidecar.prompt`, no parse) and hashes its leading blocks (`pointsman.prefix.prefix_key`).
`choose` picks among the route's candidates by rendezvous hashing with bounded loads
(`pointsman.affinity.choose_holder`'s rule, over the candidates' addresses, with the key's
order kept per route): the key's first holder whose load stays within ceil((1 + epsilon) x
mean), this request added. A holder's load is this sidecar's in-flight requests there divided
by its route weight (the router's view of the fleet: an instance it weighs 0.5 counts each
request twice), the measure the balancer compares.
Every sidecar ranks the holders of a key alike, so sidecars that share no state agree on the
holder as long as their loads are alike; a hot prefix spills in the same order everywhere.
Instances that outlier detection has ejected are left out while another holder remains.

Each decision has an outcome, counted per model (`SidecarMetrics.prefix_routed`) and set on
the call's span (`pointsman.prefix_route`):
- `preferred`: the key's first holder took it;
- `load_fallback`: the first holder was over the bound, a later one took it;
- `no_key`: the prompt is missing or shorter than `min_blocks` blocks: the usual weighted pick;
- `router`: per-request mode, the key went to the router's PickTarget (`prefix-affinity`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Final

from pointsman.affinity import bounded_rank, rendezvous_order
from sidecar.balancer import CandidateSet
from sidecar.prompt import prompt_prefix_key
from sidecar.routes import Route
from sidecar.upstream import Upstream

__all__ = ["LOAD_FALLBACK", "NO_KEY", "OUTCOMES", "PREFERRED", "ROUTER", "choose", "prefix_key"]

PREFERRED: Final = "preferred"
LOAD_FALLBACK: Final = "load_fallback"
NO_KEY: Final = "no_key"
ROUTER: Final = "router"
OUTCOMES: Final = (PREFERRED, LOAD_FALLBACK, NO_KEY, ROUTER)


def prefix_key(route: Route | None, request: bytes) -> int | None:
    """The key of the request's prompt prefix when its model's route asks for prefix routing;
    None otherwise (no route, routing off, or no key: see `Route.prefix_routing` for which).
    Raises InvalidRequestError for malformed bytes on the way to the prompt."""
    if route is None or route.prefix_routing is None:
        return None
    prefix = route.prefix_routing
    return prompt_prefix_key(request, prefix.prompt_input, prefix.blocks)


def choose(
    key: int,
    candidates: CandidateSet,
    epsilon: float,
    avoid: Callable[[str], bool] | None = None,
) -> tuple[Upstream, str]:
    """The instance for a request with `key`, and the outcome (PREFERRED or LOAD_FALLBACK).
    `avoid` names instances to leave out (ejected) while some other candidate remains."""
    upstreams, weights = candidates.upstreams, candidates.weights
    if len(upstreams) == 1:
        return upstreams[0], PREFERRED
    order = _order(key, candidates)
    if avoid is not None:
        kept = tuple(i for i in order if not avoid(upstreams[i].address))
        order = kept or order  # every one avoided: a doubtful instance beats none
    rank = bounded_rank([upstreams[i].in_flight / weights[i] for i in order], epsilon)
    return upstreams[order[rank]], LOAD_FALLBACK if rank else PREFERRED


@lru_cache(maxsize=8192)
def _order(key: int, candidates: CandidateSet) -> tuple[int, ...]:
    """The candidates' indices in the key's rendezvous order over their addresses. Kept per
    (key, candidate set): a route's sets are made once per table, and popular prefixes repeat,
    so most requests skip the hashing (a set is hashed by identity; a new table, new sets)."""
    index = {upstream.address: i for i, upstream in enumerate(candidates.upstreams)}
    return tuple(index[a] for a in rendezvous_order(key, list(index)))
