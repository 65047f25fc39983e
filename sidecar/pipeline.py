"""ModelInfer and ModelStreamInfer as one pipeline: the handlers that run the stages.

One call, in order (the handlers below read top to bottom):

1. `read_head` (sidecar.head): model, version, request id, class, metadata to forward.
2. `Decider.prepare` (sidecar.decide): version, priority class, the fields to append.
3. Idempotency (ModelInfer with a request id: `IdempotencyStore.run`), then admission (a slot
   of `max_in_flight`, or a place in the bounded, class-ordered queue, or a shed).
4. `Decider.choose` (sidecar.decide): the first instance.
5. `AttemptLoop.run` (sidecar.attempts): attempts until one answers, within the caller's
   deadline, at places of flow control, failing over while the retry budget allows.

Unary and stream share steps 1, 2, 4 and 5. A stream's attempt forwards the whole stream; it
may fail over only until its first response reaches the caller (`StreamFeed` replays the
messages sent so far), then it is bound to its instance. Errors become statuses in one place
per handler (`status_of`), which also counts sheds and Triton's queue-full answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from time import perf_counter
from typing import NoReturn

import grpc
from opentelemetry.trace import Span

from pointsman.errors import status_of
from sidecar.admission import Admission, ShedError
from sidecar.attempts import AttemptLoop
from sidecar.config import SidecarConfig
from sidecar.decide import Decider, Decision
from sidecar.flow import queue_full, stream_refusal
from sidecar.head import CallHead, Context, read_head, time_left
from sidecar.idempotency import IdempotencyStore
from sidecar.metrics import RequestSeries, SidecarMetrics
from sidecar.stream_feed import StreamFeed
from sidecar.tracing import MODEL, MODEL_VERSION, RpcTracer
from sidecar.upstream import Metadata, Upstream

__all__ = ["INFER", "STREAM", "InferencePipeline"]

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
# The `method` label of the request metrics.
INFER = "infer"
STREAM = "stream"


class InferencePipeline:
    """The handlers of ModelInfer and ModelStreamInfer (see the module docstring)."""

    def __init__(
        self,
        config: SidecarConfig,
        decider: Decider,
        *,
        attempts: AttemptLoop,
        admission: Admission,
        idempotency: IdempotencyStore | None,
        metrics: SidecarMetrics,
        tracer: RpcTracer | None = None,
    ) -> None:
        self._decider = decider
        self._admission = admission
        # None when replay is off; concurrent duplicates are then not coalesced either.
        self._idempotency = idempotency
        self._metrics = metrics
        # None when tracing is off: then a call creates no span and parses no traceparent.
        self._tracer = tracer
        self._replay_limit = config.max_message_bytes
        # Stage 3 (sidecar.attempts); its `run`, bound once: called on every request.
        self._attempts = attempts.run

    # -- ModelInfer ----------------------------------------------------------------------------

    async def model_infer(self, request: bytes, context: Context) -> bytes:
        started = perf_counter()
        metadata = context.invocation_metadata()
        span = None if self._tracer is None else self._tracer.server_span("ModelInfer", metadata)
        series: RequestSeries | None = None
        decision: Decision | None = None
        code, message = _OK, ""
        recorded = False
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
            self._metrics.idempotent_request(reuse.value)
            return response
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception as error:
            code, message = status_of(error)
            # Counted before the status leaves: a caller that reads the metrics once answered
            # must find its call there.
            self._done(INFER, started, series, decision, span, code, message)
            recorded = True
            await self._abort(context, decision, error, code, message)
        finally:
            if not recorded:
                self._done(INFER, started, series, decision, span, code, message)

    async def _infer(
        self, head: CallHead, decision: Decision, series: RequestSeries, request: bytes,
        context: Context, span: Span | None,
    ) -> bytes:  # fmt: skip
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
            return await self._attempts(
                head, decision, series, context, span, "ModelInfer", send, len(request)
            )
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
        admitted = recorded = False
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
                        # Before a response reached the caller, Triton's queue-full refusal
                        # (an error response) is retried like a unary one.
                        if feed.replayable and (refusal := stream_refusal(response)):
                            raise refusal
                        feed.commit()
                        await context.write(response)
                finally:
                    pump.cancel()
                    call.cancel()  # a no-op once it has ended; stops Triton if the caller left

            await self._attempts(
                head, decision, series, context, span, "ModelStreamInfer", send, len(first), feed
            )
        except asyncio.CancelledError:
            code = _CANCELLED
            raise
        except Exception as error:
            code, message = status_of(error)
            self._done(STREAM, started, series, decision, span, code, message)
            recorded = True
            await self._abort(context, decision, error, code, message)
        finally:
            if admitted:
                self._admission.leave()
            if feed is not None:
                feed.close()
            if not recorded:
                self._done(STREAM, started, series, decision, span, code, message)

    # -- bookkeeping ---------------------------------------------------------------------------

    @staticmethod
    def _routed(series: RequestSeries, decision: Decision) -> None:
        series.routed += 1
        if decision.hit:
            series.hits += 1

    def _done(
        self, method: str, started: float, series: RequestSeries | None,
        decision: Decision | None, span: Span | None, code: grpc.StatusCode, message: str,
    ) -> None:  # fmt: skip
        """A call ended with (code, message): its metrics, and its server span's last words."""
        (series or self._metrics.series("", "", method)).done(code, perf_counter() - started)
        if span is not None:
            model, version = ("", "") if decision is None else (decision.model, decision.version)
            RpcTracer.end(span, code, message, {MODEL: model, MODEL_VERSION: version})

    async def _abort(
        self, context: Context, decision: Decision | None, error: Exception,
        code: grpc.StatusCode, message: str,
    ) -> NoReturn:  # fmt: skip
        """Ends the call with (code, message), counting a shed request (with its retry hint in
        the trailing metadata) or Triton's queue-full answer."""
        model = "" if decision is None else decision.model
        trailers: Metadata = ()
        if isinstance(error, ShedError):
            self._metrics.shed_request(model, error.priority.triton_priority)
            trailers = error.trailing_metadata()
        elif queue_full(code, message):
            self._metrics.queue_full(model)
        await context.abort(code, message, trailing_metadata=trailers)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
