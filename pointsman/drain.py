"""grpc.health.v1 for a server that drains: Watch streams end once they said NOT_SERVING.

The reference aio HealthServicer keeps every Watch stream open forever, so a server stopping
with a grace period waits the whole grace for them, even with no request in flight. Here
`enter_graceful_shutdown` still flips every service to NOT_SERVING (Check answers it, and
each Watch stream receives it), and then the Watch streams end, so `server.stop(grace)`
returns as soon as the real requests and streams are done.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

__all__ = ["DrainingHealthServicer"]

_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """The reference servicer, with Watch streams that end on graceful shutdown."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Condition()
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await super().set(service, status)
        async with self._changed:
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._draining = True
        async with self._changed:
            self._changed.notify_all()

    def _status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        if self._draining:
            return _NOT_SERVING
        status: health_pb2.HealthCheckResponse.ServingStatus = self._server_status.get(
            service, _UNKNOWN
        )
        return status

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        last = None
        async with self._changed:
            while True:
                status = self._status(request.service)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if self._draining:
                    return  # said NOT_SERVING; ending lets the server stop early
                await self._changed.wait()
