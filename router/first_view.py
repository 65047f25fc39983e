"""A router's first view of the fleet: nothing is published from a half-read fleet.

A router that has just (re)started knows no instance yet: its first route tables would name
only the instances read so far, and a sidecar that takes a full snapshot replaces everything it
had, so a model on an instance not read yet would turn NOT_FOUND at every sidecar that
reconnected in that window. So a fresh router holds its WatchRoutes streams (the sidecar keeps
routing on its stale tables meanwhile) and answers PickTarget for a model it does not know yet
with UNAVAILABLE (the sidecar falls back to its tables or another replica) until every
configured instance has been read once (or has failed once), or `limit_s` has passed (a fleet
discovered later, or none at all, must not hold the router for ever).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from router.contracts import FleetSnapshot

__all__ = ["FIRST_VIEW_LIMIT_S", "FirstView", "has_first_view"]

# Longest a fresh router holds its route streams: reading an instance takes one repository
# index call (bounded by its 0.5 s timeout), so a few seconds cover a slow or dead instance.
FIRST_VIEW_LIMIT_S = 5.0


def has_first_view(snapshot: FleetSnapshot) -> bool:
    """True when the snapshot names some instance and every one was read or failed once."""
    return bool(snapshot.instances) and all(
        inst.refreshed_at > 0 or inst.last_error for inst in snapshot.instances
    )


class FirstView:
    """Latches once the router's fleet view is complete enough to publish (see module doc)."""

    def __init__(
        self,
        snapshot: Callable[[], FleetSnapshot],
        *,
        limit_s: float = FIRST_VIEW_LIMIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._give_up_at = clock() + limit_s
        self._seen = False

    @property
    def seen(self) -> bool:
        """True once the first view is complete or the limit has passed; then for ever."""
        if not self._seen:
            self._seen = has_first_view(self._snapshot()) or self._clock() >= self._give_up_at
        return self._seen

    async def wait(self, stopping: asyncio.Event, poll_s: float = 0.05) -> None:
        """Returns once `seen` (or the router is stopping)."""
        while not self.seen and not stopping.is_set():
            await asyncio.sleep(poll_s)
