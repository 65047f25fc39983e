"""The sidecar profile's pieces (bench/sidecar_profile.py, bench/procstats.py): who owns a
profiled function, the loop thread's time by owner, and CPU by thread name. The profile run
itself starts a fleet: the lead runs it for the committed figures."""

from __future__ import annotations

import cProfile
import ctypes
import os
import threading
import time

import pytest

from bench.procstats import cpu_by_thread_name
from bench.sidecar_profile import _category, _shares
from sidecar.head import read_head


@pytest.mark.parametrize(
    ("code", "owner"),
    [
        (read_head.__code__, "ours"),
        (threading.Thread.start.__code__, "other"),
        ("<method 'x' of 'grpc._cython.cygrpc._AioCall' objects>", "grpc"),
        ("<method 'done' of '_asyncio.Task' objects>", "asyncio"),
        ("<built-in method builtins.isinstance>", "other"),
    ],
)
def test_each_profiled_function_has_an_owner(code: object, owner: str) -> None:
    assert _category(code) == owner  # type: ignore[arg-type]


def _ours_in_a_test() -> int:
    return sum(len(str(i)) for i in range(50_000))  # builtins called from here count for it


def test_shares_split_the_thread_time_and_builtins_count_for_their_caller() -> None:
    profile = cProfile.Profile(time.thread_time)
    began = time.thread_time()
    profile.enable()
    _ours_in_a_test()
    profile.disable()
    shares = _shares(profile, time.thread_time() - began)
    assert sum(shares.values()) == pytest.approx(1.0)
    # This test file is not sidecar/ or pointsman/: "other", with the builtins it calls.
    assert shares["other"] > 0.5 and shares["ours"] == 0.0


def test_cpu_by_thread_name_names_the_main_thread_and_a_named_one() -> None:
    done = threading.Event()
    spun = threading.Event()

    def spin() -> None:
        ctypes.CDLL(None).prctl(15, b"spinner", 0, 0, 0)  # PR_SET_NAME
        deadline = time.thread_time() + 0.1
        while time.thread_time() < deadline:
            pass
        spun.set()
        done.wait(10)

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        assert spun.wait(10)
        used = cpu_by_thread_name(os.getpid())
    finally:
        done.set()
        thread.join()
    assert used["spinner"] >= 0.05 and "main" in used
