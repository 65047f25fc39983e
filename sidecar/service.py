"""Triton's `inference.GRPCInferenceService`, served by routing each call to a Triton instance.

Every handler takes and returns raw bytes (the server registers them with no serializers), so
ModelInfer is forwarded without a protobuf parse: `peek_model` reads the model name, the route
cache and `pick` choose the instance, and the bytes go out on that instance's channel. Handlers
map every exception to a status through `pointsman.errors.abort`; Triton's own errors keep their
code and message. See README.md for what each RPC does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import metadata as package_metadata
from typing import Any, TypeAlias

import grpc
from tritonclient.grpc import service_pb2 as pb

from pointsman.errors import (
    DeadlineExpiredError,
    ManagedByRouterError,
    NoReadyInstanceError,
    NotSupportedError,
    PointsmanError,
    abort,
)
from sidecar.balancer import CandidateSet, pick
from sidecar.config import SidecarConfig
from sidecar.router_picker import RouterPicker, RouterUnreachableError
from sidecar.routes import NoRouteTablesError, RouteCache
from sidecar.upstream import Upstream, UpstreamPool
from sidecar.wire import peek_model

__all__ = ["InferenceProxy", "forward_metadata"]

# grpc ships no type hints, so this is Any to mypy; it names what handlers receive.
Context: TypeAlias = grpc.aio.ServicerContext
Metadata = tuple[tuple[str, str | bytes], ...]

SERVER_NAME = "pointsman-sidecar"
# What a request through the sidecar can use; shared memory, sequences (no sticky routing),
# tracing and logging settings are missing on purpose (see README.md).
EXTENSIONS = ("classification", "model_configuration", "binary_tensor_data", "parameters",
              "statistics")  # fmt: skip

# Keys that describe one HTTP/2 hop, not the request: grpc sets its own for the next hop.
_HOP_BY_HOP = frozenset({"user-agent", "content-type", "te"})
_REPOSITORY_STATE_RANK = {"READY": 0, "LOADING": 1, "UNLOADING": 2, "UNAVAILABLE": 3}


def forward_metadata(metadata: Sequence[tuple[str, Any]] | None) -> Metadata:
    """The caller's metadata minus hop-by-hop and reserved keys, for the upstream call."""
    if not metadata:
        return ()
    kept = []
    for item in metadata:
        key = item[0]
        if key in _HOP_BY_HOP or key[0] == ":" or key.startswith("grpc-"):
            continue
        kept.append(item)
    return tuple(kept)


def _version() -> str:
    try:
        return package_metadata.version("pointsman")
    except package_metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "0.0.0"


class InferenceProxy:
    """The handlers of the inference service, over a route cache and a pool of upstreams."""

    def __init__(
        self,
        config: SidecarConfig,
        cache: RouteCache,
        pool: UpstreamPool,
        *,
        rng: random.Random,
        picker: RouterPicker | None = None,
    ) -> None:
        self._config = config
        self._cache = cache
        self._pool = pool
        self._rng = rng
        self._picker = picker
        self._retry = config.retry_unavailable
        self._server_live: bytes = pb.ServerLiveResponse(live=True).SerializeToString()
        self._ready_true: bytes = pb.ServerReadyResponse(ready=True).SerializeToString()
        self._ready_false: bytes = pb.ServerReadyResponse(ready=False).SerializeToString()
        self._model_not_ready: bytes = pb.ModelReadyResponse(ready=False).SerializeToString()
        self._server_metadata: bytes = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_version(), extensions=EXTENSIONS
        ).SerializeToString()

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Every method of the service, raw bytes in and out."""
        unary: dict[str, Callable[[bytes, Context], Any]] = {
            "ModelInfer": (
                self.model_infer_per_request if self._picker is not None else self.model_infer
            ),
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self._routed("ModelMetadata"),
            "ModelConfig": self._routed("ModelConfig"),
            "ModelStatistics": self.model_statistics,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self._refuse(
                ManagedByRouterError(
                    "RepositoryModelLoad is refused: model placement is the Pointsman "
                    "router's job; ask the router, not the sidecar"
                )
            ),
            "RepositoryModelUnload": self._refuse(
                ManagedByRouterError(
                    "RepositoryModelUnload is refused: model placement is the Pointsman "
                    "router's job; ask the router, not the sidecar"
                )
            ),
            "TraceSetting": self._refuse(
                NotSupportedError("TraceSetting is per Triton instance: call the instance directly")
            ),
            "LogSettings": self._refuse(
                NotSupportedError("LogSettings is per Triton instance: call the instance directly")
            ),
        }
        for kind in ("SystemSharedMemory", "CudaSharedMemory"):
            for op in ("Status", "Register", "Unregister"):
                unary[kind + op] = self._refuse(
                    NotSupportedError(
                        f"{kind}{op} is not supported through the sidecar: shared memory is "
                        "local to one Triton host; call the instance directly"
                    )
                )
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=None, response_serializer=None
            )
            for name, handler in unary.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer, request_deserializer=None, response_serializer=None
        )
        return handlers

    # -- choosing an instance ------------------------------------------------------------------

    def _candidates(self, name: str, version: str) -> CandidateSet:
        route = self._cache.routes.get(name)
        if route is None:
            raise self._cache.missing(name, version)
        candidates = route.by_version.get(version, route.fallback)
        if candidates is None:
            raise NoReadyInstanceError(name, version)
        return candidates

    async def _router_targets(
        self, name: str, version: str, md: Metadata, timeout: float | None
    ) -> list[Upstream]:
        """Per-request mode: the router's target and fallbacks, or a table pick without it."""
        assert self._picker is not None
        headers = {k: v for k, v in md if isinstance(v, str)}
        try:
            answer = await self._picker.pick(name, version, headers, timeout)
        except RouterUnreachableError:
            return [pick(self._candidates(name, version), self._rng)]
        addresses = [t.grpc_address for t in (answer.target, *answer.fallbacks) if t.grpc_address]
        if not addresses:
            raise NoReadyInstanceError(name, version, "the router named no target")
        return [self._pool.get(address) for address in dict.fromkeys(addresses)]

    # -- ModelInfer ----------------------------------------------------------------------------

    async def model_infer(self, request: bytes, context: Context) -> bytes:
        # The hot path: one peek, one dict lookup, one pick, one upstream await.
        upstream: Upstream | None = None
        try:
            name, version = peek_model(request)
            upstream = pick(self._candidates(name, version), self._rng)
            timeout = _remaining(context)
            md = forward_metadata(context.invocation_metadata())
            return await _send(upstream, request, timeout, md)
        except grpc.aio.AioRpcError as error:
            if self._retry and error.code() is grpc.StatusCode.UNAVAILABLE and upstream:
                return await self._retry_elsewhere(request, context, name, version, upstream, error)
            await abort(context, error)
        except Exception as error:
            await abort(context, error)

    async def _retry_elsewhere(
        self,
        request: bytes,
        context: Context,
        name: str,
        version: str,
        failed: Upstream,
        error: grpc.aio.AioRpcError,
    ) -> bytes:
        """One more try on the least busy other candidate: UNAVAILABLE means Triton did not run
        the request (unreachable, or its queue is full)."""
        try:
            others = [u for u in self._candidates(name, version).upstreams if u is not failed]
            if not others:
                raise error
            upstream = min(others, key=lambda u: u.in_flight)
            md = forward_metadata(context.invocation_metadata())
            return await _send(upstream, request, _remaining(context), md)
        except Exception as final:
            await abort(context, final)

    async def model_infer_per_request(self, request: bytes, context: Context) -> bytes:
        try:
            name, version = peek_model(request)
            md = forward_metadata(context.invocation_metadata())
            targets = await self._router_targets(name, version, md, _remaining(context))
            last: grpc.aio.AioRpcError | None = None
            for upstream in targets:
                try:
                    return await _send(upstream, request, _remaining(context), md)
                except grpc.aio.AioRpcError as error:
                    if error.code() is not grpc.StatusCode.UNAVAILABLE or not self._retry:
                        raise
                    last = error  # not run there: try the next fallback
            assert last is not None  # targets is never empty
            raise last
        except Exception as error:
            await abort(context, error)

    # -- ModelStreamInfer ----------------------------------------------------------------------

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """Forwards a bidirectional stream, bound to the instance chosen for its first message."""
        upstream: Upstream | None = None
        call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None
        pump: asyncio.Task[None] | None = None
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                return  # the caller half-closed without a request: nothing to route
            name, version = peek_model(first)
            md = forward_metadata(context.invocation_metadata())
            timeout = _remaining(context)
            if self._picker is not None:
                chosen = (await self._router_targets(name, version, md, timeout))[0]
            else:
                chosen = pick(self._candidates(name, version), self._rng)
            call = chosen.open_stream(timeout=timeout, metadata=md)
            upstream = chosen
            upstream.in_flight += 1
            pump = asyncio.create_task(_pump_requests(first, requests, call))
            async for response in call:
                await context.write(response)
            # The upstream ended with OK (an error raises out of the loop above).
        except Exception as error:
            await abort(context, error)
        finally:
            if pump is not None:
                pump.cancel()
            if call is not None:
                call.cancel()  # a no-op once it has ended; stops Triton if the caller left
            if upstream is not None:
                upstream.in_flight -= 1

    # -- RPCs answered for the fleet -----------------------------------------------------------

    async def server_live(self, request: bytes, context: Context) -> bytes:
        return self._server_live

    async def server_ready(self, request: bytes, context: Context) -> bytes:
        return self._ready_true if self._cache.ready else self._ready_false

    async def server_metadata(self, request: bytes, context: Context) -> bytes:
        return self._server_metadata

    async def model_ready(self, request: bytes, context: Context) -> bytes:
        try:
            name, version = peek_model(request)
            route = self._cache.routes.get(name)
            candidates = None if route is None else route.candidates(version)
            if candidates is None:
                return self._model_not_ready  # as Triton answers for a model it does not have
            return await self._call(pick(candidates, self._rng), "ModelReady", request, context)
        except Exception as error:
            await abort(context, error)

    def _routed(self, method: str) -> Callable[[bytes, Context], Any]:
        async def handler(request: bytes, context: Context) -> bytes:
            try:
                name, version = peek_model(request)
                upstream = pick(self._candidates(name, version), self._rng)
                return await self._call(upstream, method, request, context)
            except Exception as error:
                await abort(context, error)

        handler.__name__ = method
        return handler

    async def model_statistics(self, request: bytes, context: Context) -> bytes:
        try:
            name, version = peek_model(request, require_name=False)
            if name:
                upstream = pick(self._candidates(name, version), self._rng)
                return await self._call(upstream, "ModelStatistics", request, context)
            merged = pb.ModelStatisticsResponse()
            for raw in await self._fan_out("ModelStatistics", request, context):
                part = pb.ModelStatisticsResponse.FromString(raw)
                merged.model_stats.extend(part.model_stats)
            data: bytes = merged.SerializeToString()
            return data
        except Exception as error:
            await abort(context, error)

    async def repository_index(self, request: bytes, context: Context) -> bytes:
        """The union of every instance's index; per (model, version) the best state wins."""
        try:
            best: dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex] = {}
            for raw in await self._fan_out("RepositoryIndex", request, context):
                for entry in pb.RepositoryIndexResponse.FromString(raw).models:
                    key = (entry.name, entry.version)
                    seen = best.get(key)
                    if seen is None or _state_rank(entry.state) < _state_rank(seen.state):
                        best[key] = entry
            merged = pb.RepositoryIndexResponse(models=[best[k] for k in sorted(best)])
            data: bytes = merged.SerializeToString()
            return data
        except Exception as error:
            await abort(context, error)

    def _refuse(self, error: PointsmanError) -> Callable[[bytes, Context], Any]:
        async def handler(request: bytes, context: Context) -> bytes:
            await abort(context, error)

        return handler

    # -- helpers -------------------------------------------------------------------------------

    async def _call(
        self, upstream: Upstream, method: str, request: bytes, context: Context
    ) -> bytes:
        response: bytes = await upstream.unary(method)(
            request,
            timeout=_remaining(context),
            metadata=forward_metadata(context.invocation_metadata()),
        )
        return response

    async def _fan_out(self, method: str, request: bytes, context: Context) -> list[bytes]:
        """The same call on every known instance; the answers of those that answered.

        Fails only when every instance fails (with the first error), or, before any route
        table has arrived, with UNAVAILABLE.
        """
        addresses = sorted(self._cache.addresses())
        if not addresses:
            if self._cache.awaiting_router:
                raise NoRouteTablesError()
            return []
        timeout = context.time_remaining()
        timeout = (
            self._config.fanout_timeout_s
            if timeout is None
            else min(timeout, self._config.fanout_timeout_s)
        )
        md = forward_metadata(context.invocation_metadata())
        results = await asyncio.gather(
            *(
                self._pool.get(a).unary(method)(request, timeout=timeout, metadata=md)
                for a in addresses
            ),
            return_exceptions=True,
        )
        answers = [r for r in results if isinstance(r, bytes)]
        if not answers:
            first = results[0]
            raise first if isinstance(first, BaseException) else RuntimeError(repr(first))
        return answers


def _state_rank(state: str) -> int:
    return _REPOSITORY_STATE_RANK.get(state, len(_REPOSITORY_STATE_RANK))


async def _pump_requests(
    first: bytes, requests: AsyncIterator[bytes], call: grpc.aio.StreamStreamCall[bytes, bytes]
) -> None:
    """Caller -> Triton half of a stream; the caller's half-close becomes Triton's."""
    try:
        await call.write(first)
        async for request in requests:
            await call.write(request)
        await call.done_writing()
    except asyncio.CancelledError:
        raise
    except Exception:
        # Writing fails once Triton has ended the stream; the read side carries its status.
        pass


def _remaining(context: Context) -> float | None:
    """The caller's remaining time; never send a request whose deadline has passed, since
    Triton would run it anyway."""
    timeout: float | None = context.time_remaining()
    if timeout is not None and timeout <= 0:
        raise DeadlineExpiredError("deadline expired before the request was sent")
    return timeout


async def _send(upstream: Upstream, request: bytes, timeout: float | None, md: Metadata) -> bytes:
    """One upstream call, counted in the instance's in-flight requests while it runs."""
    upstream.in_flight += 1
    try:
        response: bytes = await upstream.infer(request, timeout=timeout, metadata=md)
        return response
    finally:
        upstream.in_flight -= 1
