"""Flow control keyed to Triton's queues: hold what Triton would refuse, retry what it refused.

Triton answers a request beyond a model's queue bound (`max_queue_size`) at once with
UNAVAILABLE "Exceeds maximum queue size" (in a stream: an error response), and runs nothing.
The router publishes, per (instance, model), what Triton takes: its concurrency (max batch
size x model instances) and its queue bound (`RouteCandidate.concurrency`, `.queue_capacity`).
Flow control keeps each sidecar within that:

- A `Place` per (instance, model) (sidecar/admission.py) counts this sidecar's outstanding
  requests there; at most concurrency + queue bound of them (unbounded when the table says
  nothing). Below that a request costs one compare (`Admission.take`).
- A request whose instance is full goes to another holder with room; when none has room it
  waits in the admission queue (`Admission.wait_for_place`: bounded, best class first, within
  the caller's deadline) and takes the first place that frees.
- A refusal from Triton all the same (another sidecar, or a client of its own, filled the
  queue; or a burst reached Triton faster than its batcher drains the queue) is "not run":
  the place lowers what it allows to what Triton had accepted (`Place.refused`), and the
  request waits a short jittered back-off, then for a place at any holder, and is sent again,
  within its deadline and at most `queue_full_retries` times. These resends wait for room by
  this sidecar's own counts, so they do not spend the retry budget, which guards a failing
  fleet against retry storms.

`FlowControl` follows the route cache's limits and makes these waits; the attempt loop
(sidecar/pipeline.py) decides when to call them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence

import grpc
from prometheus_client import Counter

from sidecar.admission import Admission, Place
from sidecar.decide import Decision
from sidecar.routes import RouteCache
from sidecar.upstream import Upstream

__all__ = ["TRITON_QUEUE_FULL", "FlowControl", "queue_full", "stream_refusal"]

# How Triton says that a model's queue (its queue policy's max_queue_size) is full.
TRITON_QUEUE_FULL = "Exceeds maximum queue size"
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
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
        self._places: dict[tuple[str, str], Place] = {}

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
            unused = [k for k, p in self._places.items() if k not in limits and not p.outstanding]
            for key in unused:
                del self._places[key]  # made again on its next request
        for (address, model), limit in limits.items():
            self.place(address, model).set_limit(limit)
        for key, place in self._places.items():
            if key not in limits:
                place.set_limit(float("inf"))
        self._admission.dispatch()

    def place(self, address: str, model: str) -> Place:
        """The Place of (address, model), made unbounded on first use."""
        place = self._places.get((address, model))
        if place is None:
            place = self._places[(address, model)] = Place(address, model)
        return place

    def backoff_s(self, refusals: int) -> float:
        """How long a request refused `refusals` times waits before it is sent again:
        doubling from `backoff_s` up to `max_backoff_s`, times a random 0.5-1 so that
        refused requests do not come back together."""
        delay = min(self._max_backoff_s, self._backoff_s * 2.0 ** min(refusals - 1, 30))
        return delay * (0.5 + 0.5 * self._rng.random())

    async def back_off(self, refusals: int, remaining: float | None) -> None:
        delay = self.backoff_s(refusals)
        await asyncio.sleep(delay if remaining is None else min(delay, remaining))

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
        places = tuple(by_place)
        if all(p.room <= 0 for p in places):
            held.inc()
        place = await self._admission.wait_for_place(places, decision.priority, timeout, size, seq)
        return by_place[place], place
