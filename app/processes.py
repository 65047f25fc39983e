"""Child processes that never outlive their parent and stop cleanly.

Every part of a local fleet (each Triton, the router, the sidecar) runs as its own process,
as it would in its own pod. Children get PR_SET_PDEATHSIG so a parent killed with -9 leaves
no orphans, and each runs in its own process group so Ctrl-C reaches only the parent, which
then stops the children in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["ManagedProcess", "ProcessSpec", "free_port", "stop_all"]

_PR_SET_PDEATHSIG = 1
# util-linux's setpriv sets the parent-death signal and execs the child: no Python runs
# between fork and exec, which is what makes forking safe while grpc's threads run.
_SETPRIV = shutil.which("setpriv")
# Loaded here, in the parent: loading a library in a forked child of a threaded process can
# deadlock on the loader's lock.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec (no setpriv)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _argv_dying_with_parent(argv: Sequence[str]) -> tuple[list[str], bool]:
    """The command that dies with its parent, and whether it still needs `_die_with_parent`."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv], False
    return list(argv), _LIBC is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's choice for port 0)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    log_path: Path | None = None  # stdout and stderr go here; None inherits the parent's


class ManagedProcess:
    """One child process: started with `start`, stopped with `stop`, polled with `exited`."""

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.stopping = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        env = {**os.environ, **self.spec.env}
        argv, needs_hook = _argv_dying_with_parent(self.spec.argv)
        out: IO[bytes] | None = None
        if self.spec.log_path is not None:
            self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.spec.log_path, "ab")  # noqa: SIM115 - lives with the child
        self._popen = subprocess.Popen(
            argv,
            env=env,
            cwd=self.spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            # Each child leads its own process group (Ctrl-C reaches only the parent).
            process_group=0,
            preexec_fn=_die_with_parent if needs_hook else None,
        )

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def raise_if_exited(self) -> None:
        """RuntimeError with the end of the log if the process has ended."""
        code = self.exited()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}:\n{self.log_tail()}")

    def send_stop(self) -> None:
        self.stopping = True
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    def kill_leftovers(self) -> None:
        """SIGKILL what is left of the child's process group once the child has ended: a
        Triton killed with -9 leaves its Python backend stubs running, and they are in its
        group (each child leads its own, see `start`)."""
        if self._popen is None or self._popen.poll() is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left
            os.killpg(self._popen.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        if self.spec.log_path is None or not self.spec.log_path.exists():
            return ""
        text = self.spec.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def stop_all(processes: Sequence[ManagedProcess], grace_s: float = 10.0) -> None:
    """SIGTERM every process at once, wait up to `grace_s` in total, then SIGKILL the rest."""
    for proc in processes:
        proc.send_stop()
    deadline = time.monotonic() + grace_s
    for proc in processes:
        if proc.wait(max(0.0, deadline - time.monotonic())) is None:
            proc.kill()
            proc.wait(5.0)
        proc.kill_leftovers()
        proc.close()
