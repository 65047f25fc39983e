"""Session affinity: the turns of one conversation go to one holder while it is not saturated.

A request whose metadata names a session (the policy's header, `x-session-id` by default;
`pointsman.sessions.SessionPolicy`) goes to the first holder of its model in the session's
rendezvous order (`pointsman.affinity.rendezvous_order`): every sidecar that sees the same
holders sends the session to the same one, so its context stays warm there, with no state
shared between sidecars. Ejected holders are left out while another exists.

Sticky until saturated: a holder is saturated while this sidecar has `max_in_flight` requests
in flight there (its own count, of every model: what it knows without asking). A session whose
holder is saturated moves ONCE, to the next unsaturated holder in its order (the same on every
sidecar that sees the same saturation), and the move is remembered in a bounded table
(`max_moves` entries, each for `move_ttl_s` after the session's last request), so the later
turns follow it instead of bouncing back as the load changes; each move is counted
(`pointsman_sidecar_session_moves_total`). A moved session moves again only when its new holder
saturates too, or leaves the model's holders. When every holder is saturated it stays.
Requests without the header, and any when the header is "" (off), are routed as usual.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from pointsman.affinity import key_hash, rendezvous_order
from pointsman.clock import Clock, monotonic
from sidecar.balancer import CandidateSet
from sidecar.metrics import SidecarMetrics
from sidecar.routes import RouteCache
from sidecar.upstream import Upstream

__all__ = ["SessionAffinity"]


class SessionAffinity:
    """The session routing of one sidecar (see the module docstring)."""

    def __init__(
        self,
        cache: RouteCache,
        metrics: SidecarMetrics,
        *,
        max_moves: int = 65536,
        clock: Clock = monotonic,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._clock = clock
        self._max_moves = max_moves
        # (model, session key) -> (address moved to, expiry), oldest use first. Keys are
        # 64-bit hashes, so a long session id costs no more memory than a short one.
        self._moves: OrderedDict[tuple[str, int], tuple[str, float]] = OrderedDict()

    @property
    def header(self) -> str:
        """The metadata key that names a session ("" when session affinity is off)."""
        return self._cache.sessions.header

    def choose(
        self,
        model: str,
        session: str,
        candidates: CandidateSet,
        is_ejected: Callable[[str], bool],
    ) -> Upstream:
        """The holder for one request of `session` among `candidates`."""
        policy = self._cache.sessions
        limit = policy.max_in_flight
        holders = {u.address: u for u in candidates.upstreams if not is_ejected(u.address)}
        if not holders:
            holders = {u.address: u for u in candidates.upstreams}
        key = key_hash(session)
        entry = (model, key)
        now = self._clock()
        moved = self._moves.get(entry)
        current = None
        if moved is not None and moved[1] >= now and moved[0] in holders:
            current = holders[moved[0]]
        order = rendezvous_order(key, list(holders))
        if current is None:
            current = holders[order[0]]
            if moved is not None:
                del self._moves[entry]  # expired, or its holder left: back to the order
        if current.in_flight < limit:
            if entry in self._moves:
                self._remember(entry, current.address, now + policy.move_ttl_s)
            return current
        for address in order:
            holder = holders[address]
            if holder is not current and holder.in_flight < limit:
                self._remember(entry, address, now + policy.move_ttl_s)
                self._metrics.session_move(model)
                return holder
        return current  # every holder saturated: moving would not help

    def _remember(self, entry: tuple[str, int], address: str, expires: float) -> None:
        self._moves[entry] = (address, expires)
        self._moves.move_to_end(entry)
        while len(self._moves) > self._max_moves:
            self._moves.popitem(last=False)

    @property
    def moves(self) -> int:
        """Sessions this sidecar routes away from their first holder (for tests)."""
        return len(self._moves)
