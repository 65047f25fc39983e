"""A real redis-server for tests: 127.0.0.1, a free port, no persistence, stopped afterwards.

    @pytest.fixture
    def redis() -> Iterator[RedisServer]:
        with RedisServer() as server:
            yield server

`stop()` and `start()` again (same port, empty: nothing is saved) play a Redis outage, also
from a test whose event loop runs grpc.aio: the child is spawned without a Python pre-exec hook
(a fork that runs Python in the child of a process with grpc's threads can crash there), and
`setpriv --pdeathsig KILL` still ends it if the test process dies.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from app.processes import free_port

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
        # util-linux (essential in Debian): the child gets SIGKILL when its parent dies.
        setpriv = shutil.which("setpriv")
        self._argv = [
            *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
            binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self._log_path = self._dir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Starts it (from the thread that will outlive it: the parent-death signal follows
        the starting thread) and waits until it answers PING."""
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed by stop()
        self._process = subprocess.Popen(
            self._argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            code = self._process.poll()
            if code is not None or time.monotonic() > deadline:
                log = self._log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not answer (exit code {code}):\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (it saves nothing), SIGKILL after 5 s."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5.0)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

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
