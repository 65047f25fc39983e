"""Flow control keyed to Triton's queues: hold what Triton would refuse, retry what it refused.

Triton answers a request beyond a model's queue bound (`max_queue_size`) at once with
UNAVAILABLE "Exceeds maximum queue size" (in a stream: an error response), and runs nothing.
The router publishes, per (instance, model), what Triton takes: its concurrency (max batch
size x model instances) and its queue bound (`RouteCandidate.concurrency`, `.queue_capacity`).
Flow control keeps each sidecar within that:

- A `Place` per (instance, model) counts this sidecar's outstanding requests there; at most
  concurrency + queue bound of them (unbounded when the table says nothing). Below that a
  request costs one compare (`Admission.take`).
- A request whose instance is full goes to another holder with room; when none has room it
  waits in the admission queue (`Admission.wait_for_place`: bounded, best class first, within
  the caller's deadline) and takes the first place that frees.
- A refusal from Triton all the same (another sidecar, or a client of its own, filled the
  queue; or a burst reached Triton faster than its batcher drains the queue) is "not run".
  The place backs off: nothing more goes there for a short jittered delay (doubling while
  refusals go on, up to a ceiling), and then it allows what Triton had just accepted of this
  sidecar's requests (at least one), growing again by 1 / allowed with each one served, up
  to the limit (additive increase, multiplicative decrease, as TCP does). The refused request
  waits again for a place at any holder (another holder at once if one has room, the same
  one after its back-off) and is sent again, within its deadline and at most
  `queue_full_retries` times. These resends go only where this sidecar's counts show room,
  so they do not spend the retry budget, which guards a failing fleet against retry storms.

`FlowControl` follows the route cache's limits and makes these waits; the attempt loop
(sidecar/pipeline.py) decides when to call them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence

import grpc
from prometheus_client import Counter

from sidecar.admission import Admission
from sidecar.decide import Decision
from sidecar.routes import RouteCache
from sidecar.upstream import Upstream

__all__ = ["TRITON_QUEUE_FULL", "FlowControl", "Place", "queue_full", "stream_refusal"]

# How Triton says that a model's queue (its queue policy's max_queue_size) is full.
TRITON_QUEUE_FULL = "Exceeds maximum queue size"
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_UNBOUNDED = float("inf")
# A ModelStreamInferResponse that starts with field 1 (error_message, LEN).
_ERROR_MESSAGE_TAG = 0x0A


def queue_full(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether an answer is Triton's refusal for a full queue (nothing was run)."""
    return code is _UNAVAILABLE and TRITON_QUEUE_FULL in details


def stream_refusal(response: bytes) -> grpc.aio.AioRpcError | None:
    """Triton's queue-full refusal inside a ModelStreamInfer response (Triton answers a
    stream's request with an error response, not a status), as the error a unary call would
    raise; None for any other response. Reads the first field only, no parse."""
    if not response or response[0] != _ERROR_MESSAGE_TAG:
        return None
    length, shift, i = 0, 0, 1
    while i < len(response) and shift < 35:
        byte = response[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    message = response[i : i + length].decode("utf-8", "replace")
    if TRITON_QUEUE_FULL not in message:
        return None
    empty = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(_UNAVAILABLE, empty, empty, details=message)


class Place:
    """One (instance, model): this sidecar's `outstanding` requests there, at most `allowed`
    of them (<= `limit`, what Triton takes; infinite when unknown or unbounded). While it
    backs off after a refusal (`timer` set), `allowed` is 0 and `resume` what it will allow
    after; `strikes` counts back-offs since the last request it served."""

    __slots__ = ("address", "allowed", "limit", "model", "outstanding", "resume", "strikes",
                 "timer")  # fmt: skip

    def __init__(self, address: str, model: str, limit: float = _UNBOUNDED) -> None:
        self.address = address
        self.model = model
        self.limit = self.allowed = self.resume = limit
        self.outstanding = 0
        self.strikes = 0
        self.timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"Place({self.address}, {self.model}, {self.outstanding}/{self.allowed:g})"

    def set_limit(self, limit: float) -> None:
        if limit != self.limit:
            self.limit = self.resume = limit
            if self.timer is None:
                self.allowed = limit

    def served(self) -> None:
        """One of ours answered: one more allowed per `allowed` served, up to the limit."""
        if self.strikes:
            self.strikes = 0
        if self.allowed < self.limit and self.timer is None:
            self.allowed = min(self.limit, self.allowed + 1.0 / self.allowed)

    def refused(self) -> bool:
        """Triton refused one of ours (still counted in `outstanding`): after the back-off,
        allow what it had accepted of ours, at least one. True when a back-off starts now
        (not already backing off)."""
        allowed = self.allowed if self.timer is None else self.resume
        self.resume = max(1.0, min(allowed, self.outstanding - 1))
        self.allowed = 0.0
        return self.timer is None

    def reopen(self) -> None:
        self.timer = None
        self.allowed = min(self.resume, self.limit)


class FlowControl:
    """The places of one sidecar, their limits from the route tables, and the waits for them.

    With `enabled` False every place is unbounded and refusals are not held: the attempt
    loop's failover alone moves a refused request to another instance.
    """

    def __init__(
        self,
        admission: Admission,
        *,
        enabled: bool = True,
        backoff_s: float = 0.01,
        max_backoff_s: float = 0.5,
        max_retries: int = 32,
        rng: random.Random | None = None,
    ) -> None:
        self._admission = admission
        self.enabled = enabled
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        # Resends of one request after refusals, at most (0 when off: nothing is held).
        self.max_retries = max_retries if enabled else 0
        self._rng = rng or random.Random()
        # (address, model) -> its Place; entries come and go, the dict stays.
        self.places: dict[tuple[str, str], Place] = {}

    def follow(self, cache: RouteCache) -> None:
        """Keeps the limits those of `cache`'s routes, now and after every change."""
        self.set_limits(cache.place_limits())
        cache.subscribe(lambda: self.set_limits(cache.place_limits()))

    def set_limits(self, limits: Mapping[tuple[str, str], int]) -> None:
        """(address, model) -> the most requests that instance takes; any other pair is
        unbounded. Waiters that now have room go on."""
        if not self.enabled:
            return
        if not self._admission.waiting_for_place:  # no lane refers to a place now
            unused = [k for k, p in self.places.items() if k not in limits and not p.outstanding]
            for key in unused:
                del self.places[key]  # made again on its next request
        for (address, model), limit in limits.items():
            self.place(address, model).set_limit(limit)
        for key, place in self.places.items():
            if key not in limits:
                place.set_limit(_UNBOUNDED)
        self._admission.dispatch()

    def place(self, address: str, model: str) -> Place:
        """The Place of (address, model), made unbounded on first use."""
        place = self.places.get((address, model))
        if place is None:
            place = self.places[(address, model)] = Place(address, model)
        return place

    def backoff_s(self, strikes: int) -> float:
        """How long a place backs off after its `strikes`-th refusal in a row: doubling from
        `backoff_s` up to `max_backoff_s`, times a random 0.5-1 so that places (and
        sidecars) do not come back together."""
        delay = min(self._max_backoff_s, self._backoff_s * 2.0 ** min(strikes - 1, 30))
        return delay * (0.5 + 0.5 * self._rng.random())

    def refused(self, place: Place) -> None:
        """Triton refused a request at `place` for a full queue: it backs off."""
        if self.enabled and place.refused():
            place.strikes += 1
            place.timer = asyncio.get_running_loop().call_later(
                self.backoff_s(place.strikes), self._reopen, place
            )

    def _reopen(self, place: Place) -> None:
        place.reopen()
        self._admission.dispatch()

    async def wait(
        self,
        holders: Sequence[Upstream],
        decision: Decision,
        held: Counter,
        timeout: float | None,
        size: int,
        seq: int,
    ) -> tuple[Upstream, Place]:
        """A place at the holder with the most room, waiting in the admission queue (counted
        in `held`) while none has room; the holder and its place."""
        by_place = {self.place(u.address, decision.model): u for u in holders}
        # One order per set of places, so that requests waiting for the same set share a lane.
        places = tuple(sorted(by_place, key=lambda p: p.address))
        if all(p.outstanding >= p.allowed for p in places):
            held.inc()
        place = await self._admission.wait_for_place(places, decision.priority, timeout, size, seq)
        return by_place[place], place
