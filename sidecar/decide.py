"""Stage 2 of an inference call: where it goes, and the few fields the sidecar sets on it.

`Decider.prepare` (before admission and idempotency, no I/O): the version an unpinned request
gets (the `x-model-version` header, else the route's header rules and canary split, else
Triton's highest), the request's priority class, and what the sidecar appends to its bytes:
the chosen version, the class's Triton `priority` (unless the request sets one), and on every
attempt the caller's remaining time as Triton's queue `timeout` (unless the request sets one).
The fields are built apart from the request (per version and per class once, `lru_cache`) and
appended in ONE copy of the bytes per attempt (`Decision.apply`); protobuf keeps the last
occurrence of a field, so appending sets them.

`Decider.choose` (after admission): the first instance to try. In table mode a weighted
power-of-two pick from the compiled route (`sidecar.balancer`), skipping ejected instances; a
model ready nowhere asks the router for a load and waits for it (the cold path). In
per-request mode the router's PickTarget gives an ordered list (its policy may choose the
version); without an answer the tables decide. Where the attempts go after a failure is the
attempt loop's business (`sidecar.pipeline`), from the same candidates (`Decider.candidates`).

Affinity (issue 12), in `_choose_among`, before the balancer's random pick, over the
holders `candidates(...)`, in table mode and per-request mode alike (the router knows neither
sequences nor sessions): a request that carries a `sequence_id` goes where its sequence lives
(`sidecar.sequences`: its plan rides on the Decision, for the attempt loop), and one that names
a session to its session's holder (`sidecar.sessions`). A prompt-prefix key (issue 14) is one
more such choice.
"""

from __future__ import annotations

import random
from functools import lru_cache

import grpc
from opentelemetry.trace import Span

from pointsman.clock import Clock, monotonic
from pointsman.errors import NoReadyInstanceError, PointsmanError
from pointsman.versions import select_version
from sidecar.admission import PriorityClass
from sidecar.balancer import CandidateSet, pick, pick_avoiding
from sidecar.config import SidecarConfig
from sidecar.head import CallHead, Context, time_left
from sidecar.metrics import SidecarMetrics
from sidecar.resilience import OutlierDetector
from sidecar.router_picker import ROUTER_SERVICE, RouterPicker, RouterUnreachableError
from sidecar.routes import NoRouteTablesError, RouteCache
from sidecar.sequences import SequenceAffinity, SequencePlan
from sidecar.sessions import SessionAffinity
from sidecar.tracing import INSTANCE, MODEL, RpcTracer
from sidecar.upstream import Metadata, Upstream, UpstreamPool
from sidecar.wire import (
    int64_parameter_field,
    model_version_field,
    sets_parameter,
    uint64_parameter_field,
)

__all__ = [
    "Decider",
    "Decision",
    "queue_timeout_field",
    "queue_timeout_us",
    "sets_queue_timeout",
]

_OK = grpc.StatusCode.OK
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class Decision:
    """Where one call goes and what is appended to its bytes; `prepare` makes it, `choose`
    names the instance."""

    __slots__ = ("first", "hit", "model", "priority", "queue_timeout", "sequence", "suffix",
                 "targets", "version")  # fmt: skip

    def __init__(
        self,
        model: str,
        version: str,
        priority: PriorityClass,
        suffix: bytes,
        queue_timeout: bool | None,
    ) -> None:
        self.model = model
        # The version routed to ("" any): the request's own, or the policy's choice.
        self.version = version
        self.priority = priority
        # Fields appended to the request's bytes (version, priority), built once.
        self.suffix = suffix
        # Whether attempts with a deadline append Triton's queue timeout: None until the
        # first such attempt looks at the request; False when off (or a stream).
        self.queue_timeout = queue_timeout
        # Set by `choose`: the first instance, the router's ordered targets (per-request mode;
        # None in table mode), and whether the first had the model (and version) ready.
        self.first: Upstream | None = None
        self.targets: list[Upstream] | None = None
        self.hit = False
        # Set by `choose` for a step of a sequence: where it may go, and what to remember.
        self.sequence: SequencePlan | None = None

    def apply(self, request: bytes, remaining: float | None) -> bytes:
        """The bytes one attempt sends: `request` with the sidecar's fields, in one copy (none
        when there is nothing to set)."""
        if remaining is not None and self.queue_timeout is not False:
            if self.queue_timeout is None:
                self.queue_timeout = not sets_queue_timeout(request)
            if self.queue_timeout:
                return b"".join((request, self.suffix, queue_timeout_field(remaining)))
        return request + self.suffix if self.suffix else request


class Decider:
    """Makes the Decisions of one sidecar (see the module docstring)."""

    def __init__(
        self,
        config: SidecarConfig,
        cache: RouteCache,
        pool: UpstreamPool,
        *,
        rng: random.Random,
        outliers: OutlierDetector,
        metrics: SidecarMetrics,
        tracer: RpcTracer | None,
        picker: RouterPicker | None,
        cold_picker: RouterPicker | None,
        clock: Clock = monotonic,
    ) -> None:
        self._cache = cache
        self._pool = pool
        self._rng = rng
        self._outliers = outliers
        self._metrics = metrics
        self._tracer = tracer
        self._picker = picker
        # Asks the router for a load when a model is ready nowhere (None: the cold path is off).
        self._cold_picker = cold_picker
        self._cold_start_wait_s = config.cold_start_wait_s
        self._queue_timeout: bool | None = None if config.deadline_queue_timeout else False
        self.sequences = SequenceAffinity(
            cache, pool, metrics, max_probes=config.max_attempts, clock=clock
        )
        self.sessions = SessionAffinity(cache, metrics, clock=clock)

    # -- before admission ----------------------------------------------------------------------

    def prepare(self, head: CallHead, request: bytes, *, stream: bool = False) -> Decision:
        """The version, class and fields of a call whose (first) request is `request`. A
        stream is bound to what its first message chose and its messages get no priority or
        queue timeout."""
        version, suffix = head.version, b""
        # Sequences and sessions are routed from the tables in either mode: the version too.
        by_tables = self._picker is None or head.sequence is not None or bool(head.session)
        if not version and by_tables:
            version = self._policy_version(head)
            if version:
                suffix = _version_field(version)
        priority = self._cache.priorities.resolve(head.priority)
        if stream:
            return Decision(head.model, version, priority, suffix, False)
        level = priority.triton_priority
        if level and not sets_parameter(request, "priority"):
            suffix += _priority_field(level)
        return Decision(head.model, version, priority, suffix, self._queue_timeout)

    def _policy_version(self, head: CallHead) -> str:
        """The version an unpinned request gets: the x-model-version header, else the route's
        header rules and canary split (the router's policy), else "" (Triton's highest)."""
        if head.pinned_version is not None:
            return head.pinned_version
        route = self._cache.routes.get(head.model)
        if route is None or route.version_rules is None:
            return ""
        chosen = select_version(route.version_rules, head.headers(), self._rng, route.versions)
        return chosen or ""

    # -- after admission -----------------------------------------------------------------------

    async def choose(
        self, head: CallHead, decision: Decision, context: Context, span: Span | None
    ) -> None:
        """Names the instance to try first (`decision.first`, `.targets`, `.hit`; `.sequence`
        for a sequence step)."""
        if self._picker is None or head.sequence is not None or head.session:
            # Route tables list only instances with the model ready (static routes are
            # assumed to serve every version): a table pick is always an affinity hit.
            decision.first, decision.hit = await self._table_pick(head, decision, context)
            return
        first, targets, hit, chosen = await self._router_targets(
            head, decision.version, time_left(context), span
        )
        if chosen and not decision.version:  # the router's policy chose the version
            decision.suffix += _version_field(chosen)
        if targets is not None and self._outliers.any_ejected:
            ejected = self._outliers.is_ejected
            first = next((u for u in targets if not ejected(u.address)), first)
        decision.first, decision.targets, decision.hit = first, targets, hit

    def candidates(self, name: str, version: str) -> CandidateSet:
        """The instances that serve (name, version) by the route tables; raises NOT_FOUND
        (UNAVAILABLE before any table) when none does."""
        route = self._cache.routes.get(name)
        if route is None:
            raise self._cache.missing(name, version)
        candidates = route.by_version.get(version, route.fallback)
        if candidates is None:
            raise NoReadyInstanceError(name, version)
        return candidates

    async def _choose_among(
        self, head: CallHead, decision: Decision, candidates: CandidateSet, context: Context
    ) -> Upstream:
        """The instance for a call among the holders: its sequence's, its session's, or the
        balancer's pick."""
        if head.sequence is not None:
            plan = await self.sequences.plan(
                decision.model, head.sequence, candidates, self._outliers.is_ejected,
                time_left(context),
            )  # fmt: skip
            if plan is not None:
                decision.sequence = plan
                return plan.first
        if head.session:
            return self.sessions.choose(
                decision.model, head.session, candidates, self._outliers.is_ejected
            )
        return self._pick(candidates)

    def _pick(self, candidates: CandidateSet) -> Upstream:
        """`pick`, skipping instances that outlier detection has ejected while others exist
        (the check costs one truth test while none is ejected)."""
        if self._outliers.any_ejected:
            return pick_avoiding(candidates, self._rng, self._outliers.is_ejected)
        return pick(candidates, self._rng)

    async def _table_pick(
        self, head: CallHead, decision: Decision, context: Context
    ) -> tuple[Upstream, bool]:
        """A pick from the route table, and whether it was an affinity hit. On the cold path
        (the model is known but ready nowhere) the router is asked to load it, and the
        request waits for that load, up to `cold_start_wait_s` and the caller's deadline."""
        name, version = decision.model, decision.version
        try:
            candidates = self.candidates(name, version)
        except NoRouteTablesError:
            raise
        except NoReadyInstanceError:
            step = head.sequence
            if step is not None and not step.start:
                # Ready nowhere now, but the sequence may live on a holder that just left.
                plan = await self.sequences.plan(
                    name, step, None, self._outliers.is_ejected, time_left(context)
                )
                if plan is None:
                    raise
                decision.sequence = plan
                return plan.first, True
            if self._cold_picker is None:
                raise
        else:
            if head.sequence is None and not head.session:  # the common case, no await
                return self._pick(candidates), True
            return await self._choose_among(head, decision, candidates, context), True
        wait_s = self._cold_start_wait_s
        remaining = time_left(context)
        if remaining is not None:
            wait_s = min(wait_s, remaining)
        self._metrics.cold_start(name)
        md = head.forward
        headers = {k: v for k, v in md if isinstance(v, str)}
        try:
            answer = await self._cold_picker.pick(
                name, version, headers, remaining, metadata=md, wait_for_load_ms=int(wait_s * 1000)
            )
        except RouterUnreachableError:
            raise NoReadyInstanceError(
                name, version, "no router answered for a cold load"
            ) from None
        if not answer.target.grpc_address:
            raise NoReadyInstanceError(name, version, "the router named no target")
        return self._pool.get(answer.target.grpc_address), False

    async def _router_targets(
        self, head: CallHead, version: str, timeout: float | None, span: Span | None
    ) -> tuple[Upstream, list[Upstream] | None, bool, str]:
        """Per-request mode: the first instance to try, the router's further ones, whether
        the first had the model (and version) ready (an affinity hit), and the version the
        router's policy chose; without an answer from the router, a table pick."""
        assert self._picker is not None
        name = head.model
        headers = {k: v for k, v in head.forward if isinstance(v, str)}
        pick_md: Metadata = ()
        pick_span: Span | None = None
        if span is not None:
            assert self._tracer is not None
            pick_span, ctx = self._tracer.client_span(
                span, "PickTarget", ROUTER_SERVICE, "PickTarget", {MODEL: name}
            )
            # The router may read the trace context from the call or from `headers`: both
            # carry the PickTarget span's, so the router's span is its child.
            pick_md = self._tracer.propagate((), ctx)
            headers.update((k, v) for k, v in pick_md if isinstance(v, str))
        code, message = _OK, ""
        try:
            answer = await self._picker.pick(name, version, headers, timeout, metadata=pick_md)
            targets = [t for t in (answer.target, *answer.fallbacks) if t.grpc_address]
            if pick_span is not None and targets:
                pick_span.set_attribute(INSTANCE, targets[0].grpc_address)
        except RouterUnreachableError as error:
            code, message = _UNAVAILABLE, str(error)
            return self._pick(self.candidates(name, version)), None, True, ""
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
            raise
        finally:
            if pick_span is not None:
                RpcTracer.end(pick_span, code, message)
        if not targets:
            raise NoReadyInstanceError(name, version, "the router named no target")
        ready = targets[0].ready_versions
        hit = bool(ready) and (not version or version in ready)
        upstreams = [self._pool.get(a) for a in dict.fromkeys(t.grpc_address for t in targets)]
        return upstreams[0], upstreams, hit, answer.model_version

    def table_targets(self, name: str, version: str) -> tuple[Upstream, ...]:
        """The route table's instances for (name, version); none when the model has left the
        tables (for the attempt loop's failover)."""
        try:
            return self.candidates(name, version).upstreams
        except PointsmanError:
            return ()


@lru_cache(maxsize=256)
def _version_field(version: str) -> bytes:
    return model_version_field(version)


@lru_cache(maxsize=64)
def _priority_field(level: int) -> bytes:
    return uint64_parameter_field("priority", level)


def sets_queue_timeout(request: bytes) -> bool:
    """Whether a serialized ModelInferRequest sets parameters["timeout"] itself."""
    return sets_parameter(request, "timeout")


def queue_timeout_us(remaining_s: float) -> int:
    """Triton's queue timeout for `remaining_s` seconds left: whole microseconds, at least 1
    (0 would mean "no timeout")."""
    return max(1, int(remaining_s * 1_000_000))


def queue_timeout_field(remaining_s: float) -> bytes:
    """The bytes that give Triton `remaining_s` as the request's queue timeout: Triton then
    drops it from its queue instead of running it after the caller has gone (models whose
    queue policy has `allow_timeout_override: true` honour it; others ignore it)."""
    return int64_parameter_field("timeout", queue_timeout_us(remaining_s))
