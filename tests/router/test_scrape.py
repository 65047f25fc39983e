"""Fetching /metrics over a kept-alive connection (router/datalayer/scrape.py), against a
small HTTP/1.1 server that answers the ways real servers do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from router.datalayer.scrape import MAX_BODY_BYTES, MetricsConnection, MetricsFetchError

pytestmark = pytest.mark.asyncio

PAGE = 'nv_inference_count{model="echo",version="1"} 7\n' * 50
Reply = Callable[[int], bytes]  # the n-th request on a connection -> raw response bytes


def sized(body: str = PAGE, status: str = "200 OK", extra: str = "") -> bytes:
    data = body.encode()
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode() + data


def chunked(body: str = PAGE) -> bytes:
    data = body.encode()
    chunks = b"".join(
        f"{len(data[i : i + 100]):x};ext=1\r\n".encode() + data[i : i + 100] + b"\r\n"
        for i in range(0, len(data), 100)
    )
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + chunks + b"0\r\nX-Trailer: 1\r\n\r\n"


class Server:
    def __init__(self, reply: Reply, *, close_after: int = 0, silent: bool = False) -> None:
        self.reply, self.close_after, self.silent = reply, close_after, silent
        self.connections = 0
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if self.silent:
                    await asyncio.sleep(60)
                served += 1
                writer.write(self.reply(served))
                await writer.drain()
                if b"Connection: close" in self.reply(served) or served == self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[MetricsConnection]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    connection = MetricsConnection(f"http://127.0.0.1:{port}/metrics")
    try:
        yield connection
    finally:
        connection.close()
        listener.close()


async def test_one_connection_serves_every_scrape() -> None:
    server = Server(lambda n: sized())
    async with serving(server) as connection:
        for _ in range(20):
            assert await connection.get(timeout_s=2) == PAGE
    assert server.connections == 1 and connection.connects == 1


async def test_a_chunked_body_is_read_whole() -> None:
    async with serving(Server(lambda n: chunked())) as connection:
        assert await connection.get(timeout_s=2) == PAGE
        assert await connection.get(timeout_s=2) == PAGE
        assert connection.connects == 1


async def test_a_server_that_says_close_gets_a_new_connection_each_time() -> None:
    server = Server(lambda n: sized(extra="Connection: close\r\n"))
    async with serving(server) as connection:
        for _ in range(3):
            assert await connection.get(timeout_s=2) == PAGE
    assert server.connections == 3


async def test_a_body_ended_by_closing_is_read_to_the_end() -> None:
    server = Server(lambda n: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + PAGE.encode())
    async with serving(server) as connection:
        assert await connection.get(timeout_s=2) == PAGE


async def test_a_connection_the_server_closed_while_idle_is_reopened_at_once() -> None:
    server = Server(lambda n: sized(), close_after=1)  # one answer per connection, silently
    async with serving(server) as connection:
        for _ in range(3):
            assert await connection.get(timeout_s=2) == PAGE
            await asyncio.sleep(0.01)
    assert server.connections == 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (sized("not found", status="404 Not Found"), "HTTP 404"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode(), "body of"),
    ],
    ids=["404", "not-http", "too-big"],
)
async def test_bad_answers_are_fetch_errors(reply: bytes, message: str) -> None:
    async with serving(Server(lambda n: reply)) as connection:
        with pytest.raises(MetricsFetchError, match=message):
            await connection.get(timeout_s=2)


async def test_a_server_that_never_answers_times_out() -> None:
    async with serving(Server(lambda n: sized(), silent=True)) as connection:
        started = asyncio.get_running_loop().time()
        with pytest.raises(MetricsFetchError, match="TimeoutError"):
            await connection.get(timeout_s=0.2)
        assert asyncio.get_running_loop().time() - started < 1.0


async def test_nothing_listening_is_a_fetch_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    connection = MetricsConnection(f"http://127.0.0.1:{port}/metrics")
    with pytest.raises(MetricsFetchError):
        await connection.get(timeout_s=1)


async def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="expected http"):
        MetricsConnection("ftp://x/metrics")
