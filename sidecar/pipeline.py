"""ModelInfer and ModelStreamInfer as one pipeline, and stage 3: the attempt loop.

One call, in order (the handlers below read top to bottom):

1. `read_head` (sidecar.head): model, version, request id, class, metadata to forward.
2. `Decider.prepare` (sidecar.decide): version, priority class, the fields to append.
3. Idempotency (ModelInfer with a request id: `IdempotencyStore.run`), then admission (a slot
   of `max_in_flight`, or a place in the bounded, class-ordered queue, or a shed).
4. `Decider.choose` (sidecar.decide): the first instance.
5. `_attempts` (here): attempts until one answers, within the caller's deadline, failing
   over to another instance after an answer that says the request did not run, while the
   retry budget allows (`sidecar.resilience`); each attempt counted in the instance's
   in-flight requests, its metrics, its outlier record and, with tracing on, a CLIENT span.

Unary and stream share steps 1, 2, 4 and 5. A stream's attempt forwards the whole stream; it
may fail over only until its first response reaches the caller (`StreamFeed` replays the
messages sent so far), then it is bound to its instance. Errors become statuses in one place
per handler (`status_of`), which also counts sheds and Triton's queue-full answers.

A sequence step follows its plan (`Decision.sequence`, `sidecar.sequences`). Issue 15's
back-off retries of Triton's queue-full answer belong to `_failover` and to admission.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from time import perf_counter
from typing import NoReturn, TypeVar

import grpc
from opentelemetry.trace import Span

from pointsman.clock import Clock, monotonic
from pointsman.errors import status_of
from sidecar.admission import Admission, ShedError
from sidecar.config import SidecarConfig
from sidecar.decide import Decider, Decision
from sidecar.head import CallHead, Context, read_head, time_left
from sidecar.idempotency import IdempotencyStore
from sidecar.metrics import RequestSeries, SidecarMetrics
from sidecar.resilience import (
    EjectionPolicy,
    OutlierDetector,
    RetryBudget,
    counts_against_instance,
    retryable,
)
from sidecar.stream_feed import StreamFeed
from sidecar.tracing import ATTEMPT, ATTEMPTS, INSTANCE, MODEL, MODEL_VERSION, RpcTracer
from sidecar.upstream import SERVICE, Metadata, Upstream

__all__ = ["INFER", "STREAM", "TRITON_QUEUE_FULL", "InferencePipeline", "outlier_detector"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# One attempt: (instance, remaining time, metadata to send) -> its answer.
Send = Callable[[Upstream, float | None, Metadata], Awaitable[T]]

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
# How Triton says that a model's queue (its queue policy's max_queue_size) is full.
TRITON_QUEUE_FULL = "Exceeds maximum queue size"
# The `method` label of the request metrics.
INFER = "infer"
STREAM = "stream"


def outlier_detector(config: SidecarConfig, clock: Clock = monotonic) -> OutlierDetector:
    """The passive outlier detection the config asks for (shared by picks and attempts)."""
    policy = EjectionPolicy(
        consecutive_failures=config.outlier_consecutive_failures,
        base_ejection_s=config.outlier_base_ejection_s,
        max_ejection_s=config.outlier_max_ejection_s,
    )
    return OutlierDetector(policy, clock=clock)


class InferencePipeline:
    """The handlers of ModelInfer and ModelStreamInfer (see the module docstring)."""

    def __init__(
        self,
        config: SidecarConfig,
        decider: Decider,
        *,
        admission: Admission,
        idempotency: IdempotencyStore | None,
        outliers: OutlierDetector,
        metrics: SidecarMetrics,
        tracer: RpcTracer | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self._decider = decider
        self._admission = admission
        # None when replay is off; concurrent duplicates are then not coalesced either.
        self._idempotency = idempotency
        self._outliers = outliers
        self._metrics = metrics
        # None when tracing is off: then a call creates no span and parses no traceparent.
        self._tracer = tracer
        self._retry = config.retry_unavailable
        self._max_attempts = config.max_attempts
        self._replay_limit = config.max_message_bytes
        self._budget = RetryBudget(
            ratio=config.retry_budget_ratio,
            min_retries=config.retry_budget_min,
            window_s=config.retry_budget_window_s,
            clock=clock,
        )

    # -- ModelInfer ----------------------------------------------------------------------------

    async def model_infer(self, request: bytes, context: Context) -> bytes:
        started = perf_counter()
        metadata = context.invocation_metadata()
        span = None if self._tracer is None else self._tracer.server_span("ModelInfer", metadata)
        series: RequestSeries | None = None
        decision: Decision | None = None
        code, message = _OK, ""
        try:
            head = read_head(request, metadata, session_header=self._decider.sessions.header)
            decision = self._decider.prepare(head, request)
            series = self._metrics.series(head.model, decision.version, INFER)
            if not head.request_id or self._idempotency is None:
                return await self._infer(head, decision, series, request, context, span)
            response, reuse = await self._idempotency.run(
                (head.model, head.version, head.request_id),
                lambda: self._infer(head, decision, series, request, context, span),
            )
            self._metrics.idempotent.labels(reuse.value).inc()
            return response
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception as error:
            code, message = status_of(error)
            await self._abort(context, decision, error, code, message)
        finally:
            self._done(INFER, started, series, decision, span, code, message)

    async def _infer(
        self,
        head: CallHead,
        decision: Decision,
        series: RequestSeries,
        request: bytes,
        context: Context,
        span: Span | None,
    ) -> bytes:
        def send(upstream: Upstream, remaining: float | None, md: Metadata) -> Awaitable[bytes]:
            return upstream.infer(
                decision.apply(request, remaining), timeout=remaining, metadata=md
            )

        admission = self._admission
        if not admission.try_enter():
            await admission.wait(decision.priority, time_left(context), len(request))
        try:
            await self._decider.choose(head, decision, context, span)
            self._routed(series, decision)
            return await self._attempts(head, decision, series, context, span, "ModelInfer", send)
        finally:
            admission.leave()

    # -- ModelStreamInfer ----------------------------------------------------------------------

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """Forwards a bidirectional stream, bound to the instance chosen for its first message
        once a response has reached the caller. Counted as one request (its duration the
        stream's); each try is one upstream attempt."""
        started = perf_counter()
        metadata = context.invocation_metadata()
        span = (
            None if self._tracer is None else self._tracer.server_span("ModelStreamInfer", metadata)
        )
        series: RequestSeries | None = None
        decision: Decision | None = None
        code, message = _OK, ""
        feed: StreamFeed | None = None
        admitted = False
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                return  # the caller half-closed without a request: nothing to route
            head = read_head(
                first, metadata, with_id=False, session_header=self._decider.sessions.header
            )
            decision = self._decider.prepare(head, first, stream=True)
            series = self._metrics.series(head.model, decision.version, STREAM)
            # A stream holds one admission slot for its whole life.
            if not self._admission.try_enter():
                await self._admission.wait(decision.priority, time_left(context), len(first))
            admitted = True
            await self._decider.choose(head, decision, context, span)
            self._routed(series, decision)
            feed = StreamFeed(decision.apply(first, None), requests, self._replay_limit)

            async def send(upstream: Upstream, remaining: float | None, md: Metadata) -> None:
                assert feed is not None
                call = upstream.open_stream(timeout=remaining, metadata=md)
                pump = asyncio.create_task(feed.pump_to(call))
                try:
                    async for response in call:
                        feed.commit()
                        await context.write(response)
                finally:
                    pump.cancel()
                    call.cancel()  # a no-op once it has ended; stops Triton if the caller left

            await self._attempts(
                head, decision, series, context, span, "ModelStreamInfer", send, feed
            )
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception as error:
            code, message = status_of(error)
            await self._abort(context, decision, error, code, message)
        finally:
            if admitted:
                self._admission.leave()
            if feed is not None:
                feed.close()
            self._done(STREAM, started, series, decision, span, code, message)

    # -- the attempt loop ----------------------------------------------------------------------

    async def _attempts(
        self,
        head: CallHead,
        decision: Decision,
        series: RequestSeries,
        context: Context,
        span: Span | None,
        method: str,
        send: Send[T],
        feed: StreamFeed | None = None,
    ) -> T:
        """`send` on the chosen instance, then on others while `_failover` allows (for a
        stream: only while its `feed` can replay)."""
        upstream = decision.first
        assert upstream is not None, "choose() names the first instance"
        tried = [upstream]
        self._budget.record_request()
        try:
            while True:
                # Checked before every attempt: an expired request is never forwarded.
                remaining = time_left(context)
                try:
                    answer = await self._attempt(
                        upstream, remaining, head.forward, send, span, method, len(tried)
                    )
                    if decision.sequence is not None:
                        decision.sequence.answered(upstream)
                    return answer
                except grpc.aio.AioRpcError as error:
                    if feed is not None and not feed.replayable:
                        raise  # a response has reached the caller: bound to this instance
                    following = self._failover(decision, error, tried)
                    if following is None:
                        raise
                    upstream = following
                    tried.append(upstream)
                    series.retries.inc()
        finally:
            if span is not None:
                span.set_attributes({INSTANCE: upstream.address, ATTEMPTS: len(tried)})

    async def _attempt(
        self,
        upstream: Upstream,
        remaining: float | None,
        md: Metadata,
        send: Send[T],
        span: Span | None,
        method: str,
        number: int,
    ) -> T:
        """One attempt, counted in the instance's in-flight requests while it runs, then in
        its attempt metric and outlier record; with tracing on, in a CLIENT span whose
        traceparent goes to Triton, so Triton's spans are its children."""
        client: Span | None = None
        if span is not None:
            assert self._tracer is not None
            client, ctx = self._tracer.client_span(
                span, f"{method} upstream", SERVICE, method,
                {INSTANCE: upstream.address, ATTEMPT: number}, address=upstream.address,
            )  # fmt: skip
            md = self._tracer.propagate(md, ctx)
        code, message = _OK, ""
        upstream.in_flight += 1
        try:
            return await send(upstream, remaining, md)
        except grpc.aio.AioRpcError as error:
            code, message = error.code(), error.details() or ""
            if counts_against_instance(code, message):
                self._instance_failed(upstream.address)
            raise
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception as error:  # e.g. the caller's side of a stream went away
            code, message = status_of(error)
            raise
        finally:
            upstream.in_flight -= 1
            self._metrics.attempt(upstream.address, code)
            if code is _OK:
                self._outliers.success(upstream.address)
            if client is not None:
                RpcTracer.end(client, code, message)

    def _failover(
        self, decision: Decision, error: grpc.aio.AioRpcError, tried: Sequence[Upstream]
    ) -> Upstream | None:
        """The instance to retry on after `error`, or None to give the caller the error:
        retries must be on, the error one after which Triton did not run the request, attempts
        left, another candidate, and room in the retry budget. A step that continues a
        sequence follows its plan alone (it raises when no instance holds the sequence)."""
        plan = decision.sequence
        if plan is not None and not plan.step.start:
            return plan.next_step(error, tried)
        if not self._retry or len(tried) >= self._max_attempts:
            return None
        if not retryable(error.code(), error.details() or ""):
            return None
        following = self._next_target(decision, tried) if plan is None else plan.next_start(tried)
        if following is None:
            return None
        if not self._budget.try_spend():
            self._metrics.budget_exhausted(decision.model)
            return None
        return following

    def _next_target(self, decision: Decision, tried: Sequence[Upstream]) -> Upstream | None:
        """Where to try after a failed attempt: the router's next fallback not yet tried
        (per-request mode), else the least busy route-table candidate not yet tried; ejected
        instances are left out. None when there is nowhere else."""
        ordered = [u for u in decision.targets or () if u not in tried]
        table = self._decider.table_targets(decision.model, decision.version)
        ordered.extend(
            sorted((u for u in table if u not in tried and u not in ordered),
                   key=lambda u: u.in_flight)
        )  # fmt: skip
        ejected = self._outliers.is_ejected
        return next((u for u in ordered if not ejected(u.address)), None)

    def _instance_failed(self, address: str) -> None:
        ejected_for = self._outliers.failure(address)
        if ejected_for is not None:
            self._metrics.ejection(address)
            log.warning("ejected %s from picks for %.1fs after repeated failures",
                        address, ejected_for)  # fmt: skip

    # -- bookkeeping ---------------------------------------------------------------------------

    @staticmethod
    def _routed(series: RequestSeries, decision: Decision) -> None:
        series.routed.inc()
        if decision.hit:
            series.hits.inc()

    def _done(
        self,
        method: str,
        started: float,
        series: RequestSeries | None,
        decision: Decision | None,
        span: Span | None,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """A call ended with (code, message): its metrics, and its server span's last words."""
        (series or self._metrics.series("", "", method)).done(code, perf_counter() - started)
        if span is not None:
            model, version = ("", "") if decision is None else (decision.model, decision.version)
            RpcTracer.end(span, code, message, {MODEL: model, MODEL_VERSION: version})

    async def _abort(
        self,
        context: Context,
        decision: Decision | None,
        error: Exception,
        code: grpc.StatusCode,
        message: str,
    ) -> NoReturn:
        """Ends the call with (code, message), counting a shed request (with its retry hint in
        the trailing metadata) or Triton's queue-full answer."""
        model = "" if decision is None else decision.model
        trailers: Metadata = ()
        if isinstance(error, ShedError):
            self._metrics.shed_request(model, error.priority.triton_priority)
            trailers = error.trailing_metadata()
        elif code is _UNAVAILABLE and TRITON_QUEUE_FULL in message:
            self._metrics.queue_full(model)
        await context.abort(code, message, trailing_metadata=trailers)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
