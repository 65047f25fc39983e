"""Sequence affinity: every step of a Triton sequence goes to the instance holding its state.

Triton's sequence batcher keeps a sequence's state (its correlation id's slot, the model's own
state) on the one model instance that got its first request; a step that reaches another is
refused ("must specify the START flag on the first request of the sequence") or, worse, starts
afresh there. So the sidecar routes a request that carries a `sequence_id` (head.py reads it) by
the sequence, not by load:

- **Where a sequence lives**, without shared state between sidecars: rendezvous hashing of the
  sequence id over the model's holders (`pointsman.affinity.rendezvous_order`): every sidecar
  that sees the same holders sends the sequence to the same one. A START goes to the first
  holder in that order that outlier detection has not ejected (on a failure before it ran, to
  the next: nothing is lost yet).
- **Exceptions**, in a bounded table (`max_pins` entries, each kept for the model's idle time
  after its last step): a sequence that started elsewhere than the first holder in its order
  (that one was ejected or failed), or that a step found elsewhere (below). END drops the entry.
- **Finding a sequence** that this sidecar never saw start (its steps alternate between
  sidecars), or whose holders changed since: a step without START is tried along the order
  (the pinned instance first), where every instance that does not hold the sequence refuses it
  WITHOUT running it. So the walk never runs a step anywhere but where its state is, and a
  sidecar finds a sequence started through another one, or before a holder was added. Holders
  that left the model's route table (draining before an unload, or dead) stay in the order for
  the model's idle time, so a live sequence on a draining holder is still found there.
- **Never moved**: a route-table change does not move a live sequence (its instance stays in
  the order; a new holder ranked before it refuses, once per sidecar, and the find is pinned).
  When the walk ends without a holder, the step fails: ABORTED (`SequenceLostError`) when an
  instance of the walk was unreachable or had lost the model (the sequence's state was there and
  is gone), else FAILED_PRECONDITION (`SequenceNotLiveError`: it never started, ended, or idled
  out). Both name the sequence. A step is never failed over to an instance without its state.
- **Idle time**: the model's `max_sequence_idle_microseconds`, from one holder's ModelConfig
  (`SequenceConfigs`, asked once per model and again after its route table changes; Triton's
  1 s when unset). The same ModelConfig says whether the model has a sequence batcher at all:
  a request with a `sequence_id` for a model without one is routed as any other.

A walk tries at most `max_probes` instances (the sidecar's `max_attempts`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2

from pointsman.affinity import key_hash, rendezvous_order
from pointsman.clock import Clock, monotonic
from pointsman.errors import SequenceLostError, SequenceNotLiveError, status_of
from sidecar.balancer import CandidateSet
from sidecar.metrics import SidecarMetrics
from sidecar.resilience import counts_against_instance
from sidecar.routes import RouteCache
from sidecar.sequence_wire import SequenceStep
from sidecar.upstream import Upstream, UpstreamPool

__all__ = [
    "NOT_STARTED",
    "SequenceAffinity",
    "SequenceConfigs",
    "SequenceModel",
    "SequencePlan",
]

log = logging.getLogger(__name__)

# How Triton refuses a step of a sequence it does not hold, before running it (INVALID_ARGUMENT).
NOT_STARTED = "must specify the START flag on the first request of the sequence"
# Triton's max_sequence_idle_microseconds when a model's config leaves it unset.
DEFAULT_IDLE_S = 1.0
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
# A failed ModelConfig read is tried again after this long (meanwhile: the defaults).
_CONFIG_RETRY_S = 5.0


@dataclass(frozen=True, slots=True)
class SequenceModel:
    """What a model's config says about sequences."""

    # Whether the model has a sequence batcher (else sequence ids route as any request).
    batched: bool = True
    # Its max_sequence_idle_microseconds, in seconds.
    idle_s: float = DEFAULT_IDLE_S


_ASSUMED = SequenceModel()


class SequenceConfigs:
    """`SequenceModel` per model, from a holder's ModelConfig: read on the first sequence step
    of the model (bounded by `timeout_s`), then kept until the model's route table changes
    (read again in the background, the old value serving meanwhile). Until an answer comes, a
    model is assumed to batch sequences with Triton's default idle time: always safe."""

    def __init__(
        self, cache: RouteCache, *, timeout_s: float = 1.0, clock: Clock = monotonic
    ) -> None:
        self._cache = cache
        self._timeout_s = timeout_s
        self._clock = clock
        # model -> (what its config says, the route generation it was read at)
        self._known: dict[str, tuple[SequenceModel, int]] = {}
        # model -> when a failed read may be tried again
        self._failed_until: dict[str, float] = {}
        self._reading: dict[str, asyncio.Task[None]] = {}

    def peek(self, model: str) -> SequenceModel:
        """The known config of `model` (the assumed one if none yet), without reading."""
        known = self._known.get(model)
        return _ASSUMED if known is None else known[0]

    async def get(self, model: str, holder: Upstream, remaining: float | None) -> SequenceModel:
        known = self._known.get(model)
        route = self._cache.routes.get(model)
        generation = route.generation if route is not None else 0
        if known is not None and known[1] == generation:
            return known[0]
        if self._clock() < self._failed_until.get(model, 0.0):
            return _ASSUMED if known is None else known[0]
        task = self._reading.get(model)
        if task is None:
            task = asyncio.create_task(self._read(model, holder, generation))
            self._reading[model] = task
            task.add_done_callback(lambda _: self._reading.pop(model, None))
        if known is not None:
            return known[0]  # refreshed in the background
        wait_s = self._timeout_s if remaining is None else min(self._timeout_s, remaining)
        await asyncio.wait({task}, timeout=wait_s)
        return self.peek(model)

    async def _read(self, model: str, holder: Upstream, generation: int) -> None:
        request = service_pb2.ModelConfigRequest(name=model).SerializeToString()
        try:
            answer = await holder.unary("ModelConfig")(
                request, timeout=self._timeout_s * 4, metadata=()
            )
            config = service_pb2.ModelConfigResponse.FromString(answer).config
        except Exception as error:  # any failure: the defaults, and a new try later
            self._failed_until[model] = self._clock() + _CONFIG_RETRY_S
            log.warning("could not read the config of %s from %s: %s", model, holder.address,
                        status_of(error)[1])  # fmt: skip
            return
        idle_us = config.sequence_batching.max_sequence_idle_microseconds
        self._known[model] = (
            SequenceModel(config.HasField("sequence_batching"), idle_us / 1e6 or DEFAULT_IDLE_S),
            generation,
        )


class SequencePlan:
    """Where one sequence step goes: the instances to try, in order, and what to remember."""

    __slots__ = ("_affinity", "found", "gone", "model", "order", "preferred", "step")

    def __init__(
        self,
        affinity: SequenceAffinity,
        model: str,
        step: SequenceStep,
        order: Sequence[Upstream],
        preferred: str,
    ) -> None:
        self._affinity = affinity
        self.model = model
        self.step = step
        self.order = tuple(order)
        # The first holder in the sequence's order (ejection aside): where every sidecar
        # looks first, so a sequence elsewhere is an exception worth a pin.
        self.preferred = preferred
        # Instances of the walk that were unreachable or had lost the model.
        self.gone: list[str] = []
        self.found = False

    @property
    def first(self) -> Upstream:
        return self.order[0]

    def next_start(self, tried: Sequence[Upstream]) -> Upstream | None:
        """Where a START goes after a failure before it ran: the next instance in order."""
        return next((u for u in self.order if u not in tried), None)

    def next_step(self, error: grpc.aio.AioRpcError, tried: Sequence[Upstream]) -> Upstream | None:
        """Where a step without START goes after `error`: the next instance in the order when
        the failed one does not hold the sequence (it refused the step without running it, is
        unreachable, or lacks the model); None to give the caller `error` (the instance holds
        the sequence and answered). Raises SequenceLostError or SequenceNotLiveError when the
        walk has run out."""
        code, details = error.code(), error.details() or ""
        if code is _INVALID_ARGUMENT and NOT_STARTED in details:
            pass
        elif code is _NOT_FOUND or counts_against_instance(code, details):
            self.gone.append(tried[-1].address)
        else:
            return None
        following = self.next_start(tried) if len(tried) < self._affinity.max_probes else None
        if following is not None:
            self._affinity.probed(self.model)
            return following
        raise self._affinity.ended(self)

    def answered(self, upstream: Upstream) -> None:
        """The step ran on `upstream`: the sequence lives there (until its END)."""
        self._affinity.settle(self, upstream.address)


class SequenceAffinity:
    """The sequence routing of one sidecar (see the module docstring)."""

    def __init__(
        self,
        cache: RouteCache,
        pool: UpstreamPool,
        metrics: SidecarMetrics,
        *,
        configs: SequenceConfigs | None = None,
        max_pins: int = 65536,
        max_probes: int = 3,
        clock: Clock = monotonic,
    ) -> None:
        self._cache = cache
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        self.configs = configs or SequenceConfigs(cache, clock=clock)
        self.max_probes = max(1, max_probes)
        self._max_pins = max_pins
        # (model, sequence key) -> (address, expiry): the exceptions, oldest use first.
        self._pins: OrderedDict[tuple[str, int], tuple[str, float]] = OrderedDict()
        # model -> {address: when it left the model's route table}
        self._departed: dict[str, dict[str, float]] = {}
        self._holders: dict[str, frozenset[str]] = self._current_holders()
        cache.subscribe(self._routes_changed)

    # -- planning ------------------------------------------------------------------------------

    async def plan(
        self,
        model: str,
        step: SequenceStep,
        candidates: CandidateSet | None,
        is_ejected: Callable[[str], bool],
        remaining: float | None,
    ) -> SequencePlan | None:
        """The plan for one step; None when the model has no sequence batcher (route the
        request as any other) or nothing could hold the sequence. `candidates`: the holders of
        the step's (model, version); None when none is ready (a step that continues a sequence
        may still find it on a holder that just left)."""
        holders = [u.address for u in candidates.upstreams] if candidates is not None else []
        if holders:
            config = await self.configs.get(model, self._pool.get(holders[0]), remaining)
            if not config.batched:
                return None
        key = _key(step.sequence_id)
        ranked = rendezvous_order(key, holders)
        preferred = ranked[0] if ranked else ""
        if step.start:
            kept = [a for a in ranked if not is_ejected(a)]
            order = kept + [a for a in ranked if a not in kept]
        else:
            departed = self._live_departed(model)
            order = list(rendezvous_order(key, [*holders, *departed]))
            pinned = self._pinned(model, key)
            if pinned is not None:
                order = [pinned, *(a for a in order if a != pinned)]
        if not order:
            return None
        return SequencePlan(self, model, step, [self._pool.get(a) for a in order], preferred)

    def _live_departed(self, model: str) -> list[str]:
        departed = self._departed.get(model)
        if not departed:
            return []
        horizon = self._clock() - self.configs.peek(model).idle_s
        for address in [a for a, left in departed.items() if left < horizon]:
            del departed[address]
        return list(departed)

    # -- the pin table -------------------------------------------------------------------------

    def _pinned(self, model: str, key: int) -> str | None:
        entry = self._pins.get((model, key))
        if entry is None:
            return None
        address, expires = entry
        if expires < self._clock():
            del self._pins[(model, key)]
            return None
        return address

    def settle(self, plan: SequencePlan, address: str) -> None:
        """A step of `plan` ran on `address`: pin it there if that is an exception, forget it
        at its END."""
        step = plan.step
        pin = (plan.model, _key(step.sequence_id))
        if step.end or address == plan.preferred:
            self._pins.pop(pin, None)  # ended, or where every sidecar looks first anyway
            return
        idle_s = self.configs.peek(plan.model).idle_s
        self._pins[pin] = (address, self._clock() + idle_s)
        self._pins.move_to_end(pin)
        while len(self._pins) > self._max_pins:
            self._pins.popitem(last=False)

    def ended(self, plan: SequencePlan) -> SequenceLostError | SequenceNotLiveError:
        """The error of a step whose walk found no holder; its pin is forgotten."""
        step = plan.step
        self._pins.pop((plan.model, _key(step.sequence_id)), None)
        what = f"sequence {step.sequence_id!r} of model '{plan.model}'"
        if plan.gone:
            where = ", ".join(dict.fromkeys(plan.gone))
            error: SequenceLostError | SequenceNotLiveError = SequenceLostError(
                f"{what}: its state is lost (instance {where} failed or no longer serves the "
                "model); start the sequence again with sequence_start"
            )
        else:
            error = SequenceNotLiveError(
                f"{what}: no instance holds it (it never started, ended, or was idle longer "
                "than the model's max_sequence_idle_microseconds), so any state it had is "
                "lost; send its first request with sequence_start"
            )
        self._metrics.sequence_failed(plan.model, error.code)
        return error

    def probed(self, model: str) -> None:
        self._metrics.sequence_probe(model)

    @property
    def pins(self) -> int:
        """Sequences this sidecar routes by exception (for tests and metrics)."""
        return len(self._pins)

    # -- holders that leave ----------------------------------------------------------------

    def _current_holders(self) -> dict[str, frozenset[str]]:
        return {name: frozenset(r.addresses()) for name, r in self._cache.routes.items() if name}

    def _routes_changed(self) -> None:
        """Notes holders that left a model's route table (and forgets those that came back)."""
        now = self._clock()
        current = self._current_holders()
        for model, before in self._holders.items():
            after = current.get(model, frozenset())
            departed = self._departed.setdefault(model, {})
            for address in before - after:
                departed.setdefault(address, now)
            for address in after & departed.keys():
                del departed[address]
        self._holders = current
        for model in list(self._departed):
            if not self._live_departed(model):  # forgets those gone longer than the idle time
                del self._departed[model]


def _key(sequence_id: int | str) -> int:
    """The sequence's hash key; a string id and the integer of its hash may meet, rarely: the
    two sequences then share an order, nothing more."""
    return key_hash(sequence_id)
