"""The caller's half of a ModelStreamInfer stream, replayable until the first response.

A stream fails over like a unary call only while nothing has reached the caller: then the
messages sent so far are sent again on the next instance. `StreamFeed` reads the caller's
messages one at a time, only when an upstream attempt asks for the next (so a slow Triton
slows the caller, as a direct stream would), and keeps them until `commit` (the first
response went to the caller) or until they pass `replay_limit_bytes`; from then on it keeps
none that were written. The one read in progress is shared: it survives an attempt that is
given up, so no caller message is lost between attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

__all__ = ["StreamFeed", "StreamWriter"]


class StreamWriter(Protocol):
    """The writing side of an upstream stream call (grpc.aio.StreamStreamCall)."""

    async def write(self, message: bytes) -> None: ...

    async def done_writing(self) -> None: ...


class StreamFeed:
    def __init__(self, first: bytes, source: AsyncIterator[bytes], replay_limit_bytes: int) -> None:
        self._messages: list[bytes] = [first]
        self._base = 0  # the position of self._messages[0] in the caller's stream
        self._kept_bytes = len(first)
        self._limit = replay_limit_bytes
        self._source = source
        self._ended = False
        self._reading: asyncio.Future[None] | None = None
        # Whether a new attempt can start from the first message.
        self.replayable = len(first) <= replay_limit_bytes

    @property
    def kept(self) -> int:
        """How many of the caller's messages are held (for a replay, or not yet written)."""
        return len(self._messages)

    def commit(self) -> None:
        """A response reached the caller: no retry from here on, nothing more to keep."""
        self.replayable = False

    async def pump_to(self, call: StreamWriter) -> None:
        """Writes every message from the first (a replay) to `call`, then the caller's
        half-close. Ends quietly when `call` refuses a write: its reading side has the
        status."""
        position = self._base
        with contextlib.suppress(Exception):
            while (message := await self._next(position)) is not None:
                await call.write(message)
                position += 1
                if not self.replayable:
                    self._forget_before(position)
            await call.done_writing()

    def close(self) -> None:
        """Stops a read in progress (the stream is over)."""
        if self._reading is not None:
            self._reading.cancel()

    async def _next(self, position: int) -> bytes | None:
        while position - self._base >= len(self._messages):
            if self._ended:
                return None
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read_one())
            # Shielded: if this attempt is given up, the read goes on for the next one.
            await asyncio.shield(self._reading)
        return self._messages[position - self._base]

    async def _read_one(self) -> None:
        try:
            message = await anext(self._source)
        except (StopAsyncIteration, Exception):  # half-closed, or the caller went away
            self._ended = True
        else:
            self._messages.append(message)
            if self.replayable:
                self._kept_bytes += len(message)
                self.replayable = self._kept_bytes <= self._limit
        finally:
            self._reading = None

    def _forget_before(self, position: int) -> None:
        del self._messages[: position - self._base]
        self._base = position
