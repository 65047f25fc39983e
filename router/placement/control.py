"""Triton's explicit model control, as the placement executor uses it: load, unload, and wait
for an unload to finish.

`ModelControl` is the swap point (tests of pure logic pass a fake); `TritonModelControl` speaks
`inference.GRPCInferenceService` over grpc.aio, one cached channel per instance address:
    load            RepositoryModelLoad; Triton answers when the load is done (every version
                    its version_policy names), or with the error (INVALID_ARGUMENT and the
                    initialisation error for a model that fails to initialise)
    unload          RepositoryModelUnload; Triton answers at once and unloads in the background
                    (UNLOADING in its index for a second or two), letting in-flight requests end
    wait_unloaded   polls RepositoryIndex until no version of the model is READY, LOADING or
                    UNLOADING: only then is its memory free for what comes next
    sequence_idle_s ModelConfig: the model's max_sequence_idle_microseconds (Triton's 1 s when
                    unset) when it has a sequence batcher, else None (an unload drain waits
                    that long after the last request, so live sequences end first)
Every failure is a `ModelControlError` with Triton's status code and message.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from pointsman.tls import TlsConfig, aio_channel

__all__ = ["ModelControl", "ModelControlError", "TritonModelControl"]

# Triton's max_sequence_idle_microseconds when a sequence batcher leaves it unset.
_DEFAULT_SEQUENCE_IDLE_S = 1.0
# Index states in which a model version still holds memory.
_PRESENT_STATES = frozenset({"READY", "LOADING", "UNLOADING"})


class ModelControlError(Exception):
    """A load or unload that Triton refused, failed or did not finish in time.

    Not part of `pointsman.errors`: it never reaches a client; the controller turns it into a
    backoff and a decision that operators read.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ModelControl(Protocol):
    """What the executor needs of Triton's model control; `address` is the instance's host:port."""

    async def load(self, address: str, model: str) -> None: ...

    async def unload(self, address: str, model: str) -> None: ...

    async def wait_unloaded(self, address: str, model: str, timeout_s: float) -> None: ...

    async def sequence_idle_s(self, address: str, model: str) -> float | None: ...


class TritonModelControl:
    """`ModelControl` over grpc.aio. Call `close` when done, to close the cached channels."""

    def __init__(
        self,
        *,
        load_timeout_s: float = 300.0,
        rpc_timeout_s: float = 10.0,
        poll_interval_s: float = 0.05,
        tls: TlsConfig | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._load_timeout_s = load_timeout_s
        self._rpc_timeout_s = rpc_timeout_s
        self._poll_interval_s = poll_interval_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tls = tls  # None or empty: plaintext
        self._options = (
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        )

    def _stub(self, address: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self._tls, self._options)
        return service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def load(self, address: str, model: str) -> None:
        request = service_pb2.RepositoryModelLoadRequest(model_name=model)
        try:
            await self._stub(address).RepositoryModelLoad(request, timeout=self._load_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _error("load", model, address, exc) from exc

    async def unload(self, address: str, model: str) -> None:
        request = service_pb2.RepositoryModelUnloadRequest(model_name=model)
        try:
            await self._stub(address).RepositoryModelUnload(request, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _error("unload", model, address, exc) from exc

    async def sequence_idle_s(self, address: str, model: str) -> float | None:
        request = service_pb2.ModelConfigRequest(name=model)
        try:
            response = await self._stub(address).ModelConfig(request, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _error("read the config of", model, address, exc) from exc
        config = response.config
        if not config.HasField("sequence_batching"):
            return None
        idle_us = config.sequence_batching.max_sequence_idle_microseconds
        return idle_us / 1e6 if idle_us else _DEFAULT_SEQUENCE_IDLE_S

    async def present_versions(self, address: str, model: str) -> dict[str, str]:
        """Version -> state for each version of `model` that is READY, LOADING or UNLOADING."""
        try:
            index = await self._stub(address).RepositoryIndex(
                service_pb2.RepositoryIndexRequest(), timeout=self._rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _error("read the index for", model, address, exc) from exc
        return {
            entry.version: entry.state
            for entry in index.models
            if entry.name == model and entry.state in _PRESENT_STATES
        }

    async def wait_unloaded(self, address: str, model: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while versions := await self.present_versions(address, model):
            if time.monotonic() >= deadline:
                raise ModelControlError(
                    f"{model} on {address} still {versions} after {timeout_s:g} s"
                )
            await asyncio.sleep(self._poll_interval_s)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


def _error(verb: str, model: str, address: str, exc: grpc.aio.AioRpcError) -> ModelControlError:
    code = exc.code()
    return ModelControlError(f"{verb} {model} on {address}: {code.name}: {exc.details()}", code)
