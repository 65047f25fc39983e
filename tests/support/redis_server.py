"""A real redis-server for tests: 127.0.0.1, a free port, no persistence, stopped afterwards.

    @pytest.fixture
    def redis() -> Iterator[RedisServer]:
        with RedisServer() as server:
            yield server

`stop()` and `start()` again (same port, empty: nothing is saved) play a Redis outage.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType

from app.processes import ManagedProcess, ProcessSpec, free_port

__all__ = ["RedisServer"]

HOST = "127.0.0.1"


class RedisServer:
    """One redis-server child process (Debian's `redis-server` package)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.port = free_port(HOST)
        self._dir = Path(tempfile.mkdtemp(prefix="pointsman-redis-"))
        argv = [
            binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self._process = ManagedProcess(
            ProcessSpec("redis-server", argv, log_path=self._dir / "redis.log")
        )

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Starts it and waits until it answers PING."""
        self._process.start()
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            self._process.raise_if_exited()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer:\n{self._process.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (it saves nothing), SIGKILL after 5 s."""
        self._process.send_stop()
        if self._process.wait(5.0) is None:
            self._process.kill()
            self._process.wait(5.0)
        self._process.close()

    def answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
