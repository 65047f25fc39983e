"""Session affinity's policy: which header names a session, and when its holder is saturated.

Coding assistants send many turns of one conversation, each sharing the last one's context; the
holder that served the previous turn has that context cached. The router's policy says which
metadata key names a session (`sessions:` in the policy file), WatchRoutes carries the policy to
every sidecar, and each sidecar keeps a session on one holder (the same one from every sidecar,
by rendezvous hashing) until that holder is saturated, then moves it once (sidecar/sessions.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pointsman.config import metadata_key, or_empty, rule

__all__ = ["DEFAULT_SESSION_HEADER", "SessionPolicy"]

DEFAULT_SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How sidecars keep a session's requests together."""

    # The metadata key whose value names a request's session; "" turns session affinity off.
    # A request without it is routed as any other.
    header: str = field(default=DEFAULT_SESSION_HEADER, metadata=rule(check=or_empty(metadata_key)))
    # A holder is saturated while one sidecar has this many requests in flight there (its own
    # count, of every model: what it knows without asking); a session on it moves, once.
    max_in_flight: int = field(default=8, metadata=rule(minimum=1))
    # How long a sidecar remembers a session's move after the session's last request.
    move_ttl_s: float = field(default=600.0, metadata=rule(above=0))
