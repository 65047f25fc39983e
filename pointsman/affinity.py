"""Which holder a key goes to: rendezvous hashing, bounded by load.

A key (a prompt-prefix hash from `pointsman.prefix`, a session id) should reach the same
holder from every sidecar, with no shared state, and move as little as possible when holders
come and go. Rendezvous (highest-random-weight) hashing ranks the holders by a hash of
(key, holder) and prefers the first: adding a holder moves only the keys it now ranks first
(about 1/n of them), removing one moves only the keys it held.

Alone, that lets one hot key bury one holder. Bounded loads (Mirrokni, Thorup and
Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018; HAProxy's
`hash-balance-factor`, KubeAI's CHWBL): a holder takes the request only while its load stays
within ceil((1 + epsilon) x mean load), the mean counting this request; otherwise the next
holder in the key's order is asked. With whole-number loads and costs some holder always
qualifies (the loads sum to less than n x the bound), so no holder is pushed past the bound,
and a hot key spills over in the same order on every sidecar.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "AffinityChoice",
    "Key",
    "bounded_rank",
    "choose_holder",
    "key_hash",
    "load_bound",
    "rendezvous_order",
]

Key = int | str | bytes
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class AffinityChoice:
    """The holder picked for a key.

    preferred: the key's first holder in rendezvous order.
    rank: how far down that order the pick is; 0 is the preferred holder, more means the
        holders before it were at the load bound.
    """

    holder: str
    preferred: str
    rank: int

    @property
    def fell_back(self) -> bool:
        return self.rank > 0


def key_hash(key: Key) -> int:
    """A key as an unsigned 64-bit integer, the same in every process (no `hash()`)."""
    if isinstance(key, int):
        return key & _MASK
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@lru_cache(maxsize=4096)
def _holder_hash(holder: str) -> int:
    return key_hash(b"holder:" + holder.encode())


def _mix(x: int) -> int:
    """SplitMix64's finaliser: every input bit moves every output bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def rendezvous_order(key: Key, holders: Sequence[str]) -> tuple[str, ...]:
    """`holders` (duplicates dropped) from the key's most to least preferred."""
    k = key_hash(key)
    unique = dict.fromkeys(holders)
    return tuple(sorted(unique, key=lambda h: (-_mix(k ^ _holder_hash(h)), h)))


def load_bound(total_load: float, holders: int, epsilon: float, cost: float = 1.0) -> float:
    """The most load one holder may carry once a request of `cost` joins `total_load`."""
    return math.ceil((1.0 + epsilon) * (total_load + cost) / holders)


def choose_holder(
    key: Key,
    holders: Sequence[str],
    loads: Mapping[str, float],
    epsilon: float,
    cost: float = 1.0,
) -> AffinityChoice:
    """The first holder in the key's rendezvous order whose load, with this request's `cost`
    added, stays within `load_bound`; holders missing from `loads` carry none.

    When none does (possible only with fractional loads or costs), the least loaded holder,
    earliest in the order among equals.
    """
    order = rendezvous_order(key, holders)
    rank = bounded_rank([loads.get(h, 0.0) for h in order], epsilon, cost)
    return AffinityChoice(order[rank], order[0], rank)


def bounded_rank(loads_in_order: Sequence[float], epsilon: float, cost: float = 1.0) -> int:
    """`choose_holder`'s rule over the loads of a key's holders, listed in its rendezvous
    order: the rank of the holder that takes the request. For a caller that keeps the order
    (it changes only with the key or the holders) and reads the loads per request."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not loads_in_order:
        raise ValueError("choose_holder needs at least one holder")
    bound = load_bound(sum(loads_in_order), len(loads_in_order), epsilon, cost)
    for rank, current in enumerate(loads_in_order):
        if current + cost <= bound:
            return rank
    return min(range(len(loads_in_order)), key=lambda i: (loads_in_order[i], i))
