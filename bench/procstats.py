"""What the processes under test cost: resident memory and CPU time, read from /proc (Linux).

`ProcessSampler` samples a set of processes (with their descendants: Triton's Python-backend
model stubs) on a thread while a load runs, and keeps the start and peak RSS and the CPU
seconds spent in between, so a result can say "CPU ms per request" and "peak RSS" beside its
latencies. CPU is summed per process: one that starts during the window (a model loaded)
counts from zero, one that ends (a model unloaded) keeps what it used up to its last sample,
so a system that loads and unloads is not credited with the CPU of the copies it removed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcessCost",
    "ProcessSampler",
    "cpu_by_pid",
    "cpu_by_thread_name",
    "cpu_seconds",
    "rss_bytes",
    "with_descendants",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def with_descendants(pids: Sequence[int]) -> set[int]:
    """`pids` and all their descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry)] = int(_stat_fields(int(entry))[1])
    tree = set(pids)
    while more := {pid for pid, parent in parents.items() if parent in tree} - tree:
        tree |= more
    return tree


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of the processes (a process that ended counts 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


def cpu_by_pid(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU seconds each live process has used so far (ended ones are absent)."""
    used: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            used[pid] = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (14, 15)
    return used


def cpu_by_thread_name(pid: int) -> dict[str, float]:
    """User + system CPU seconds the live threads of `pid` have used so far, summed by thread
    name (grpc names its C threads; Python's are named after the program), the main thread
    apart as "main"."""
    used: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = "main" if tid == str(pid) else text.partition("(")[2].rpartition(")")[0]
            fields = text.rpartition(")")[2].split()
            used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS
    return used


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes have used so far."""
    return sum(cpu_by_pid(pids).values())


@dataclass(frozen=True, slots=True)
class ProcessCost:
    start_rss_bytes: int
    peak_rss_bytes: int
    cpu_s: float

    def to_dict(self, requests: int) -> dict[str, float]:
        return {
            "start_rss_mib": self.start_rss_bytes / 2**20,
            "peak_rss_mib": self.peak_rss_bytes / 2**20,
            "cpu_s": self.cpu_s,
            "cpu_ms_per_request": self.cpu_s * 1e3 / requests if requests else float("nan"),
        }


class ProcessSampler:
    """Peak RSS and CPU time of `pids` (and, with `descendants`, their children) while the
    `with` block runs; `cost` holds the result after it."""

    def __init__(
        self, pids: Sequence[int], *, descendants: bool = False, interval_s: float = 0.2
    ) -> None:
        self._roots = list(pids)
        self._descendants = descendants
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # Per process: CPU at the start (0 for one born later), and at its latest sample.
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self.start_rss = self.peak_rss = 0
        self.cost = ProcessCost(0, 0, 0.0)

    def _pids(self) -> list[int]:
        return sorted(with_descendants(self._roots)) if self._descendants else self._roots

    def _sample(self) -> None:
        pids = self._pids()
        self.peak_rss = max(self.peak_rss, rss_bytes(pids))
        for pid, used in cpu_by_pid(pids).items():
            self._cpu_first.setdefault(pid, 0.0)
            self._cpu_last[pid] = used

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def __enter__(self) -> ProcessSampler:
        pids = self._pids()
        self.start_rss = self.peak_rss = rss_bytes(pids)
        self._cpu_first = cpu_by_pid(pids)
        self._cpu_last = dict(self._cpu_first)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()
        cpu = sum(last - self._cpu_first[pid] for pid, last in self._cpu_last.items())
        self.cost = ProcessCost(self.start_rss, self.peak_rss, max(0.0, cpu))
