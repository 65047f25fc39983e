"""Failover rules of the sidecar: which errors to retry, how many retries the fleet can take,
and which instances to avoid for a while.

Pure logic with an injected clock; the attempt loop (`sidecar.attempts`) applies it on the
request path. (The queue timeout Triton gets from the caller's deadline: `sidecar.decide`.)

- `retryable(code, details)`: a Triton answer (or connection failure) after which the same
  request may go to another instance because this one did not run it: UNAVAILABLE (refused,
  reset, queue full) and NOT_FOUND (the model is unloading or gone on that instance; the route
  table still named it). Never DEADLINE_EXCEEDED, INVALID_ARGUMENT, INTERNAL...; nor Triton's
  "Request timeout expired": that queue timeout is the caller's own deadline or timeout.
- `RetryBudget`: retries in a sliding window stay below `min_retries + ratio * requests` (as
  Envoy's retry budget and gRPC's retry throttling do), so a failing fleet sees at most about
  `ratio` more traffic, not `max_attempts` times as much.
- `OutlierDetector` (passive outlier detection): `consecutive_failures` connection-level
  failures in a row eject an instance for `base_ejection_s * 2**n` (n: its earlier ejections),
  at most `max_ejection_s`. Picks skip ejected instances while another candidate exists. When
  the ejection ends the instance is a candidate again only if the router still lists it ready
  (the route tables come from the router's health checks); its first failure then ejects it
  again, for twice as long. A success resets the failure run; the doubling is forgotten after
  `max_ejection_s` without an ejection.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from pointsman.clock import Clock, monotonic

__all__ = [
    "EjectionPolicy",
    "OutlierDetector",
    "RetryBudget",
    "counts_against_instance",
    "retryable",
]

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
# Triton's own UNAVAILABLE answers from a live, busy instance (see TRITON_FACTS.md).
_QUEUE_TIMEOUT = "timeout expired"
_QUEUE_FULL = "maximum queue size"


def retryable(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether another instance may be tried after this answer (Triton did not run it)."""
    if code is _UNAVAILABLE:
        return _QUEUE_TIMEOUT not in details
    return code is _NOT_FOUND


def counts_against_instance(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether this answer says the instance itself is failing (unreachable, reset), rather
    than busy (queue full or queue timeout) or missing one model (NOT_FOUND: the router
    updates the tables)."""
    return code is _UNAVAILABLE and _QUEUE_TIMEOUT not in details and _QUEUE_FULL not in details


class RetryBudget:
    """Retries allowed while retries < min_retries + ratio * requests over the last window_s.

    The window is `buckets` slots of window_s / buckets seconds; a slot older than the window
    is cleared when the clock reaches it again, so counting costs O(1) per request.
    """

    __slots__ = (
        "_bucket_s",
        "_clock",
        "_ids",
        "_requests",
        "_retries",
        "min_retries",
        "ratio",
        "window_s",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.1,
        min_retries: int = 10,
        window_s: float = 10.0,
        buckets: int = 10,
        clock: Clock = monotonic,
    ) -> None:
        if ratio < 0 or min_retries < 0 or window_s <= 0 or buckets < 1:
            raise ValueError("retry budget: ratio, min_retries >= 0; window_s, buckets > 0")
        self.ratio = ratio
        self.min_retries = min_retries
        self.window_s = window_s
        self._bucket_s = window_s / buckets
        self._clock = clock
        self._ids = [-1] * buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets

    def _slot(self) -> int:
        bucket_id = int(self._clock() / self._bucket_s)
        slot = bucket_id % len(self._ids)
        if self._ids[slot] != bucket_id:
            self._ids[slot] = bucket_id
            self._requests[slot] = 0
            self._retries[slot] = 0
        return slot

    def _live(self) -> tuple[int, int]:
        """(requests, retries) in the window ending now."""
        newest = int(self._clock() / self._bucket_s)
        oldest = newest - len(self._ids) + 1
        requests = retries = 0
        for slot, bucket_id in enumerate(self._ids):
            if oldest <= bucket_id <= newest:
                requests += self._requests[slot]
                retries += self._retries[slot]
        return requests, retries

    def record_request(self) -> None:
        """One request arrived (its first attempt)."""
        self._requests[self._slot()] += 1

    def try_spend(self) -> bool:
        """Takes one retry from the budget if it has one; False when exhausted."""
        requests, retries = self._live()
        if retries >= self.min_retries + self.ratio * requests:
            return False
        self._retries[self._slot()] += 1
        return True


@dataclass(frozen=True)
class EjectionPolicy:
    """When and for how long an instance is ejected (see the module docstring)."""

    consecutive_failures: int = 3
    base_ejection_s: float = 1.0
    max_ejection_s: float = 30.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0 < self.base_ejection_s <= self.max_ejection_s:
            raise ValueError("need 0 < base_ejection_s <= max_ejection_s")

    def ejection_s(self, earlier_ejections: int) -> float:
        """base * 2**earlier, capped at max."""
        if earlier_ejections >= 62:  # 2**62 * base exceeds any sane max; avoid huge ints
            return self.max_ejection_s
        return min(self.base_ejection_s * float(2**earlier_ejections), self.max_ejection_s)


class OutlierDetector:
    """Passive outlier detection over instance addresses, fed by request outcomes.

    The request path calls `success`/`failure` per attempt and `ejected` per pick; both are a
    dict lookup or less while no instance is failing.
    """

    def __init__(self, policy: EjectionPolicy, *, clock: Clock = monotonic) -> None:
        self.policy = policy
        self._clock = clock
        # Failures in a row per address (absent: none).
        self._failures: dict[str, int] = {}
        # address -> end of its current or last ejection; pruned by `ejected`.
        self._ejected_until: dict[str, float] = {}
        # address -> (ejections so far, end of the last one), for the growing backoff.
        self._history: dict[str, tuple[int, float]] = {}

    @property
    def any_ejected(self) -> bool:
        """False means no instance is ejected now (the cheap check for the hot path); True
        means one may be (ask `is_ejected`)."""
        return bool(self._ejected_until)

    def is_ejected(self, address: str) -> bool:
        until = self._ejected_until.get(address)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._ejected_until[address]
        return False

    def ejected(self) -> list[str]:
        """Addresses ejected now."""
        return [a for a in list(self._ejected_until) if self.is_ejected(a)]

    def success(self, address: str) -> None:
        if self._failures:
            self._failures.pop(address, None)
        if self._history:
            seen = self._history.get(address)
            if seen is not None and self._clock() - seen[1] >= self.policy.max_ejection_s:
                del self._history[address]

    def failure(self, address: str) -> float | None:
        """Records a failure; the ejection's length in seconds if this one ejects, else None."""
        if self.is_ejected(address):
            return None  # in flight before the ejection: already accounted for
        failures = self._failures.get(address, 0) + 1
        if failures < self.policy.consecutive_failures:
            self._failures[address] = failures
            return None
        now = self._clock()
        earlier, _ = self._history.get(address, (0, now))
        duration = self.policy.ejection_s(earlier)
        until = now + duration
        self._ejected_until[address] = until
        self._history[address] = (earlier + 1, until)
        # Back from an ejection, one failure ejects again (until a success clears the run).
        self._failures[address] = self.policy.consecutive_failures - 1
        return duration
