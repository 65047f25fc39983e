"""A stream fails over while nothing has reached its caller, and never after.

`StreamFeed` (pure, with fake streams) keeps the caller's messages for a replay until the first
response, bounded in bytes, and loses none between attempts. On real Tritons: a sidecar whose
routes for the stream model name a dead address beside a live Triton serves every stream, the
ones first sent to the dead address replayed on the live one.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator

import pytest
import tritonclient.grpc as grpcclient

from app.fleet import Fleet
from app.processes import free_port
from bench.calls import codegen_inputs
from sidecar.config import SidecarConfig
from sidecar.server import start_sidecar
from sidecar.stream_feed import StreamFeed
from tests.support.loop_thread import LoopThread


class FakeCall:
    """The writing side of an upstream stream: what it got, and whether it was half-closed."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self._fail_after = fail_after

    async def write(self, message: bytes) -> None:
        if self._fail_after is not None and len(self.written) >= self._fail_after:
            raise ConnectionError("upstream gone")
        self.written.append(message)

    async def done_writing(self) -> None:
        self.closed = True


class Caller:
    """The caller's messages, released one at a time by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def messages(self) -> AsyncIterator[bytes]:
        while (message := await self.queue.get()) is not None:
            yield message


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_new_attempt_replays_every_message_and_none_is_lost_between() -> None:
    caller = Caller()
    feed = StreamFeed(b"m0", caller.messages(), replay_limit_bytes=1024)
    first = FakeCall()
    pump = asyncio.create_task(feed.pump_to(first))
    caller.queue.put_nowait(b"m1")
    await _settle()
    assert first.written == [b"m0", b"m1"]
    pump.cancel()  # the attempt is given up while a read of the caller is in progress
    await asyncio.gather(pump, return_exceptions=True)
    caller.queue.put_nowait(b"m2")  # arrives between the attempts
    caller.queue.put_nowait(None)  # then the caller half-closes
    second = FakeCall()
    await feed.pump_to(second)
    assert second.written == [b"m0", b"m1", b"m2"] and second.closed
    assert feed.replayable


@pytest.mark.asyncio
async def test_after_commit_nothing_written_is_kept() -> None:
    caller = Caller()
    feed = StreamFeed(b"m0", caller.messages(), replay_limit_bytes=1024)
    call = FakeCall()
    pump = asyncio.create_task(feed.pump_to(call))
    await _settle()
    feed.commit()  # a response reached the caller
    for i in range(1, 100):
        caller.queue.put_nowait(b"m%d" % i)
    caller.queue.put_nowait(None)
    await pump
    assert len(call.written) == 100 and call.closed
    assert not feed.replayable
    assert feed.kept == 0


@pytest.mark.asyncio
async def test_past_the_replay_limit_there_is_no_retry_and_no_buffer() -> None:
    caller = Caller()
    feed = StreamFeed(b"x" * 10, caller.messages(), replay_limit_bytes=25)
    call = FakeCall()
    pump = asyncio.create_task(feed.pump_to(call))
    caller.queue.put_nowait(b"y" * 10)
    await _settle()
    assert feed.replayable  # 20 bytes kept
    caller.queue.put_nowait(b"z" * 10)
    caller.queue.put_nowait(None)
    await pump
    assert not feed.replayable  # 30 > 25
    assert feed.kept == 0
    assert call.written == [b"x" * 10, b"y" * 10, b"z" * 10]


@pytest.mark.asyncio
async def test_a_refused_write_ends_the_pump_quietly() -> None:
    caller = Caller()
    caller.queue.put_nowait(b"m1")
    feed = StreamFeed(b"m0", caller.messages(), replay_limit_bytes=1024)
    call = FakeCall(fail_after=1)
    await feed.pump_to(call)  # the read side of the call carries the status
    assert call.written == [b"m0"] and not call.closed
    feed.close()


@pytest.mark.triton
def test_streams_first_sent_to_a_dead_instance_are_replayed_on_a_live_one(fleet: Fleet) -> None:
    live = next(s.grpc_address for s in fleet.tritons if "codegen_stream" in s.load_models)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused, nothing ran
    loop = LoopThread()
    config = SidecarConfig(
        listen="127.0.0.1:0",
        static_routes={"codegen_stream": (dead, live)},
        cold_start_wait_s=0,
        outlier_consecutive_failures=1000,  # keep picking the dead one: this is about replays
        retry_budget_min=100,
    )
    sidecar = loop.run(start_sidecar(config, rng=random.Random(5)))
    registry = sidecar.metrics.registry
    tokens = 3
    outcomes: list[object] = []
    try:
        with grpcclient.InferenceServerClient(sidecar.address) as client:
            for _ in range(12):
                done = threading.Event()
                got: list[object] = []

                def callback(result: object, error: object, got: list[object] = got,
                             done: threading.Event = done) -> None:  # fmt: skip
                    got.append(error or result)
                    if error is not None or len(got) == tokens:
                        done.set()

                client.start_stream(callback=callback)
                client.async_stream_infer("codegen_stream", codegen_inputs("def f():", tokens))
                assert done.wait(30), "stream did not finish"
                client.stop_stream()
                outcomes.extend(got)
        retries = registry.get_sample_value(
            "pointsman_sidecar_retries_total", {"model": "codegen_stream"}
        )
        refused = registry.get_sample_value(
            "pointsman_sidecar_upstream_attempts_total", {"instance": dead, "code": "UNAVAILABLE"}
        )
    finally:
        loop.run(sidecar.stop(0))
        loop.close()
    errors = [o for o in outcomes if isinstance(o, Exception)]
    print(f"12 streams, {refused} first sent to the dead address, {retries} replayed")
    assert errors == []
    assert len(outcomes) == 12 * tokens
    assert refused is not None and refused >= 1
    assert retries == refused
