"""Priorities and overload: which class a request is in, and whether it may go on now.

A request's class comes from its `x-priority` metadata, looked up in the classes the router's
policy publishes on WatchRoutes (`PriorityClasses`); an unknown or missing name gets the
policy's default class. The class gives Triton's priority level (1 is the highest) and whether
overload may shed the request.

`Admission` bounds what one sidecar has in flight (`max_in_flight`) and what waits for a slot
(`max_queued`). Waiting requests are admitted best level first, then in arrival order. When
the queue is full, a newcomer displaces the lowest-level sheddable waiter of a strictly lower
priority than its own (that waiter is shed); if there is none, the newcomer is shed. Shed
requests end with RESOURCE_EXHAUSTED (`ShedError`) and a retry hint, never UNAVAILABLE, which
means that no instance could serve. Nothing here grows with the offered load: the queue is
bounded and a shed request costs one exception.

Flow control (sidecar/flow.py) adds a `Place` per (instance, model): how many of this
sidecar's requests of the model are outstanding there, and how many may be. A request whose
instances have no room waits for a place in the same queue (`wait_for_place`), under the same
bounds, order and shedding, and gives its slot back while it waits; a place that frees goes
with a free slot to the best waiter for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from pointsman.errors import DeadlineExpiredError, OverloadedError
from pointsman.priority import PriorityClass, priority_class_from_proto
from pointsman.router.v1 import router_pb2

__all__ = [
    "NO_CLASSES",
    "RETRY_AFTER_HEADER",
    "STATUS_DETAILS_HEADER",
    "UNCLASSED",
    "Admission",
    "Place",
    "PriorityClass",
    "PriorityClasses",
    "ShedError",
    "priority_classes_from_proto",
]

# Trailing metadata of a shed request: milliseconds the caller should wait before retrying.
RETRY_AFTER_HEADER = "retry-after-ms"
# Where gRPC carries a google.rpc.Status with details.
STATUS_DETAILS_HEADER = "grpc-status-details-bin"


# What a request is in while no policy has arrived (static routes only): below every real
# level, never shed by class (a full queue still refuses it), and no Triton priority is set.
UNCLASSED = PriorityClass("", 0, False)
# Admission ranks UNCLASSED requests after every level a policy can name.
_UNCLASSED_RANK = 1 << 32


@dataclass(frozen=True, slots=True)
class PriorityClasses:
    """The policy's classes by name, and the class of a request that names none it knows."""

    by_name: Mapping[str, PriorityClass] = field(default_factory=lambda: MappingProxyType({}))
    default: PriorityClass = UNCLASSED

    def resolve(self, name: str) -> PriorityClass:
        """The class called `name`; the default class for "" or an unknown name."""
        return self.by_name.get(name, self.default) if name else self.default


NO_CLASSES = PriorityClasses()


def priority_classes_from_proto(message: router_pb2.PriorityPolicy) -> PriorityClasses:
    """The classes a WatchRoutes message carries. A default naming no class leaves requests
    without a known class UNCLASSED rather than failing: the router validated the policy."""
    classes = {pc.name: priority_class_from_proto(pc) for pc in message.classes if pc.name}
    return PriorityClasses(MappingProxyType(classes), classes.get(message.default_class, UNCLASSED))


class ShedError(OverloadedError):
    """RESOURCE_EXHAUSTED: refused to protect the fleet; retry after `retry_after_ms`."""

    def __init__(self, message: str, *, priority: PriorityClass, retry_after_ms: int) -> None:
        super().__init__(message)
        self.priority = priority
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The retry hint: `retry-after-ms`, and a `google.rpc.RetryInfo` in the standard
        rich status (`grpc-status-details-bin`) for clients that read that."""
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(self.retry_after_ms)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status = status_pb2.Status(
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message=str(self), details=[detail]
        )
        return (
            (RETRY_AFTER_HEADER, str(self.retry_after_ms)),
            (STATUS_DETAILS_HEADER, status.SerializeToString()),
        )


class Place(Protocol):
    """What the queue needs of one (instance, model) of flow control (sidecar/flow.py makes
    them): this sidecar's requests outstanding there, and how many may be."""

    model: str
    outstanding: int
    allowed: float


P = TypeVar("P", bound=Place)


class _Lane:
    """Waiters for a place at one of `places` (and a slot), best first."""

    __slots__ = ("places", "waiters")

    def __init__(self, places: tuple[Place, ...]) -> None:
        self.places = places
        self.waiters: list[_Waiter] = []

    def best(self) -> Place | None:
        """The place with the most room, if any has room."""
        best = max(self.places, key=lambda p: p.allowed - p.outstanding)
        return best if best.outstanding < best.allowed else None


@dataclass(order=True, slots=True)
class _Waiter:
    rank: int
    seq: int
    # Not part of the order: ties are broken by arrival (seq), which is unique.
    priority: PriorityClass = field(compare=False)
    admitted: asyncio.Future[Place | None] = field(compare=False)
    size: int = field(compare=False, default=0)
    # None: waits for a slot only.
    lane: _Lane | None = field(compare=False, default=None)


def _rank(priority: PriorityClass) -> int:
    return priority.triton_priority if priority.triton_priority > 0 else _UNCLASSED_RANK


class Admission:
    """At most `max_in_flight` requests running and `max_queued` waiting, per sidecar; the
    waiting ones hold at most `max_queued_bytes` of request bytes (None: no byte bound).

    `try_enter()` takes a slot at once when one is free and nobody waits (the hot path: no
    future, no await); otherwise `wait()` queues. Whoever got a slot calls `leave()` once.
    A request holding a slot takes a place with `take` (a compare while there is room) or
    `wait_for_place`, and gives it back with `release`. Runs on one event loop: no locks.
    """

    def __init__(
        self,
        max_in_flight: int,
        max_queued: int,
        *,
        retry_after_ms: int,
        max_queued_bytes: int | None = None,
    ) -> None:
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queued >= 0")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self.retry_after_ms = retry_after_ms
        self.in_flight = 0
        # Waiting for a slot only.
        self._queue: list[_Waiter] = []
        # Waiting for a place, by the places they may take.
        self._lanes: dict[tuple[Place, ...], _Lane] = {}
        self._count = 0
        self._seq = itertools.count()

    @property
    def queued(self) -> int:
        """Requests waiting, for a slot or for a place."""
        return self._count

    @property
    def waiting_for_place(self) -> int:
        return sum(len(lane.waiters) for lane in self._lanes.values())

    def try_enter(self) -> bool:
        if self.in_flight < self.max_in_flight and not self._queue:
            self.in_flight += 1
            return True
        return False

    async def wait(self, priority: PriorityClass, timeout: float | None, size: int = 0) -> None:
        """Queues a request of `size` bytes for a slot, up to `timeout` seconds (the caller's
        deadline).

        Raises ShedError when the queue is full (in count or bytes) and this request ranks
        lowest, or when a better request displaces it while it waits; DeadlineExpiredError
        when time runs out.
        """
        if self.try_enter():
            return
        waiter = self._enqueue(priority, size, None)
        await self._await(waiter, timeout, "admission queue")

    def leave(self) -> None:
        """Frees a slot; the best waiter that can go takes it."""
        self.in_flight -= 1
        if self._count:
            self.dispatch()

    # -- places --------------------------------------------------------------------------------

    @staticmethod
    def take(place: Place) -> bool:
        """Takes a place at once if it has room (the hot path: one compare)."""
        if place.outstanding < place.allowed:
            place.outstanding += 1
            return True
        return False

    def release(self, place: Place) -> None:
        """Gives a place back; a waiter for it may take it."""
        place.outstanding -= 1
        if self._lanes:
            self.dispatch()

    async def wait_for_place(
        self, places: Sequence[P], priority: PriorityClass, timeout: float | None,
        size: int = 0, seq: int | None = None,
    ) -> P:  # fmt: skip
        """A place taken at one of `places`, the one with the most room, waiting in the queue
        when none has room (`seq`: a place in the arrival order kept from an earlier wait).

        Called holding a slot, and returns holding one: while it waits, the slot is lent to
        others. If the wait fails (ShedError, DeadlineExpiredError, cancellation) the slot is
        taken back before the error goes on (over `max_in_flight` until the caller leaves,
        which the error makes it do, so nothing more is admitted meanwhile).
        """
        lane = self._lanes.get(key := tuple(places)) or _Lane(key)
        place = lane.best()
        if place is not None and not lane.waiters:
            place.outstanding += 1
            return cast(P, place)  # one of `places`
        waiter = self._enqueue(priority, size, lane, seq)  # a shed keeps the slot
        self.leave()  # lent while waiting
        try:
            admitted = await self._await(waiter, timeout, f"queue for a place at {places[0].model}")
        except BaseException:
            self.in_flight += 1  # taken back: the caller leaves once more
            raise
        assert admitted is not None
        return cast(P, admitted)

    def next_seq(self) -> int:
        """A ticket in the arrival order, for a request that may wait more than once."""
        return next(self._seq)

    def dispatch(self) -> None:
        """Hands free slots, with places where waiters need one, to the best waiters that
        can go: the head of the slot queue, or of a lane whose places have room."""
        while self.in_flight < self.max_in_flight:
            best = self._queue[0] if self._queue else None
            place: Place | None = None
            for lane in self._lanes.values():
                head = lane.waiters[0]
                if best is None or head < best:
                    room = lane.best()
                    if room is not None:
                        best, place = head, room
            if best is None:
                return
            self._remove(best)
            self.in_flight += 1
            if place is not None:
                place.outstanding += 1
            best.admitted.set_result(place)

    # -- the queue -----------------------------------------------------------------------------

    def _enqueue(
        self, priority: PriorityClass, size: int, lane: _Lane | None, seq: int | None = None
    ) -> _Waiter:
        """A new waiter in the queue (or in `lane`), after shedding what makes room for it;
        raises ShedError when nothing can."""
        rank = _rank(priority)
        if not self._fits(0, 0, size):
            victims = self._victims(rank, size)
            if victims is None:
                raise self._shed(priority, "the sidecar's queue is full")
            for victim in victims:
                self._remove(victim)
                victim.admitted.set_exception(
                    self._shed(
                        victim.priority,
                        "displaced from the sidecar's queue by a request of higher priority",
                    )
                )
        waiter = _Waiter(
            rank, next(self._seq) if seq is None else seq, priority,
            asyncio.get_running_loop().create_future(), size, lane,
        )  # fmt: skip
        if lane is None:
            heapq.heappush(self._queue, waiter)
        else:
            if not lane.waiters:
                self._lanes[lane.places] = lane
            heapq.heappush(lane.waiters, waiter)
        self._count += 1
        self.queued_bytes += size
        return waiter

    async def _await(self, waiter: _Waiter, timeout: float | None, where: str) -> Place | None:
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.admitted), timeout)
        except TimeoutError:
            self._give_up(waiter)
            raise DeadlineExpiredError(
                f"deadline expired while waiting in the sidecar's {where}"
            ) from None
        except asyncio.CancelledError:
            self._give_up(waiter)
            raise

    def _waiters(self) -> Iterator[_Waiter]:
        yield from self._queue
        for lane in self._lanes.values():
            yield from lane.waiters

    def _fits(self, freed_count: int, freed_bytes: int, size: int) -> bool:
        """Whether a request of `size` bytes fits once `freed_*` of the queue are gone."""
        if self._count - freed_count >= self.max_queued:
            return False
        limit = self.max_queued_bytes
        return limit is None or self.queued_bytes - freed_bytes + size <= limit

    def _victims(self, rank: int, size: int) -> list[_Waiter] | None:
        """The fewest sheddable waiters ranking strictly below `rank` whose leaving makes room
        for `size` bytes, lowest priority first (the latest among equals); None if those
        cannot make room."""
        eligible = sorted(
            (w for w in self._waiters() if w.priority.sheddable and w.rank > rank),
            key=lambda w: (w.rank, w.seq),
            reverse=True,
        )
        freed = 0
        for count, waiter in enumerate(eligible, 1):
            freed += waiter.size
            if self._fits(count, freed, size):
                return eligible[:count]
        return None

    def _remove(self, waiter: _Waiter) -> None:
        lane = waiter.lane
        heap = self._queue if lane is None else lane.waiters
        if heap and heap[0] is waiter:
            heapq.heappop(heap)
        else:
            heap.remove(waiter)
            heapq.heapify(heap)
        if lane is not None and not heap:
            del self._lanes[lane.places]
        self._count -= 1
        self.queued_bytes -= waiter.size

    def _give_up(self, waiter: _Waiter) -> None:
        """A waiter that stops waiting: out of the queue, or, if a slot (and a place) was
        just handed to it, they pass on."""
        admitted = waiter.admitted
        if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
            place = admitted.result()
            if place is not None:
                place.outstanding -= 1
            self.leave()
        elif not admitted.done():
            admitted.cancel()
            self._remove(waiter)

    def _shed(self, priority: PriorityClass, why: str) -> ShedError:
        what = f"priority class '{priority.name}'" if priority.name else "request"
        return ShedError(
            f"overloaded: {what} shed, {why} ({self.in_flight} in flight, {len(self._queue)} "
            f"queued); retry after {self.retry_after_ms} ms",
            priority=priority,
            retry_after_ms=self.retry_after_ms,
        )
