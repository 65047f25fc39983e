"""A baseline that routes in the client: plain Tritons, and a routing rule in this process.

This is what a gRPC client-side balancer (or an Envoy/Linkerd in front of the Tritons) gives:
the client holds one channel per instance and a rule picks the instance per request. There is
no sidecar hop, so the baselines pay no proxy cost that Pointsman pays; that favours them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import grpc

from app.triton import TritonSpec
from bench.calls import Metadata, TritonCalls, closing
from bench.loadgen import Call, Responses
from bench.testbed import Sender, TritonGroup

__all__ = ["ClientRouter", "ClientSideDeployment", "SendTo", "started"]

# The call to make at a chosen instance address.
SendTo = Callable[[str], Call]


class ClientRouter(Protocol):
    """Chooses the instance of each request and makes the call there."""

    async def send(self, model: str, send_to: SendTo) -> Responses: ...

    def delayed_requests(self) -> int:
        """Requests that waited for a load (0 for a rule that never loads)."""
        ...


class ClientSideDeployment:
    def __init__(self, system: str, group: TritonGroup, router: ClientRouter) -> None:
        self.system = system
        self.group = group
        self.router = router

    @property
    def tritons(self) -> list[TritonSpec]:
        return self.group.specs

    @property
    def triton_pids(self) -> list[int]:
        return self.group.pids

    def component_pids(self) -> Mapping[str, int]:
        return {}

    @contextlib.asynccontextmanager
    async def connect(self, timeout_s: float = 60.0) -> AsyncIterator[Sender]:
        channels = {a: grpc.aio.insecure_channel(a) for a in self.group.addresses}
        calls = {a: TritonCalls(c, timeout_s) for a, c in channels.items()}
        router = self.router

        def send(
            model: str, body: bytes, tokens: int | None = None, metadata: Metadata = ()
        ) -> Call:
            def at(address: str) -> Call:
                return calls[address].call(body, tokens, metadata)

            async def call() -> Responses:
                return await router.send(model, at)

            return call

        async with closing(channels):
            yield send

    def delayed_requests(self) -> int:
        return self.router.delayed_requests()

    def stop(self) -> None:
        self.group.stop()


def started(system: str, group: TritonGroup, router: ClientRouter) -> ClientSideDeployment:
    """Starts the group's Tritons (stopping them if that fails) and wraps them."""
    group.start()
    return ClientSideDeployment(system, group, router)
