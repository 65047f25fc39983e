"""Where the sidecar's CPU per request goes: a cProfile of its request path, in-process.

Not a test: it writes a text summary and JSON. A one-Triton fleet serves `add_one` as in the
proxyless scenario (`app.fleet.Fleet`: the Triton and the router; the fleet's own sidecar idles).
This process runs a sidecar of its own (`sidecar.server.start_sidecar` with the fleet sidecar's
config: the router's tables, metrics served, every feature at its default; uvloop, gc frozen),
and a client process (`bench.scenarios.paths.python_run`, the closed-loop Python driver) sends
add_one through it at each concurrency, twice: once bare, for this process's CPU per request
split by thread (the event loop's, and grpc's own C threads), then with cProfile on the event
loop thread (timed by that thread's CPU clock) for where the loop's time goes.

    .venv/bin/python -m bench.sidecar_profile [--duration 8] [--concurrency 1 64] \\
        [--label "quiet machine"] [--out bench/results/sidecar_profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import pstats
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from types import CodeType
from typing import Any

from app.fleet import Fleet, FleetConfig
from app.processes import free_port
from bench.procstats import cpu_by_thread_name
from bench.report import machine_info, provenance
from bench.scenarios.paths import MODEL, PathSettings, python_run
from sidecar.config import config_from_mapping
from sidecar.server import SidecarServer, start_sidecar

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("grpc", "asyncio", "uvloop", "prometheus_client")
OURS = ("sidecar", "pointsman")
TOP = 40


@contextmanager
def _marks() -> Iterator[None]:
    """Tells the parent, on stdout, when the client's load (warm-up included) starts and ends."""
    print("start", flush=True)
    yield
    print("stop", flush=True)


def _client(address: str, concurrency: int, duration_s: float) -> None:
    settings = PathSettings(duration_s=duration_s, warmup_s=min(1.0, duration_s / 4))
    run = python_run(address, concurrency, settings, around=_marks())
    print(json.dumps({"calls": run.calls, **run.summary.to_dict()}), flush=True)


def _category(code: CodeType | str) -> str:
    """Ours, a library's, or "other"; a builtin (a str) names its library when it has one."""
    if isinstance(code, str):
        return next((lib for lib in LIBRARIES if lib in code), "other")
    relative = code.co_filename.removeprefix(f"{ROOT}/")
    if relative.split("/")[0] in OURS:
        return "ours"
    return next((lib for lib in LIBRARIES if f"/{lib}/" in code.co_filename), "other")


def _shares(profile: cProfile.Profile, thread_cpu_s: float) -> dict[str, float]:
    """The loop thread's CPU by category. A builtin of no library counts for its callers;
    what no Python frame was running for (uvloop's and grpc's Cython and C) is "outside"."""
    seconds = dict.fromkeys(("outside Python frames", "ours", *LIBRARIES, "other"), 0.0)
    for entry in profile.getstats():
        caller = _category(entry.code)
        if not (isinstance(entry.code, str) and caller == "other"):
            seconds[caller] += entry.inlinetime
        for call in entry.calls or ():
            if isinstance(call.code, str) and _category(call.code) == "other":
                seconds[caller] += call.inlinetime
    seconds["outside Python frames"] = max(0.0, thread_cpu_s - sum(seconds.values()))
    return {name: used / thread_cpu_s for name, used in seconds.items()}


async def _routed(sidecar: SidecarServer) -> None:
    while not sidecar.cache.ready:  # the router's first tables
        await asyncio.sleep(0.1)


async def _measure(
    address: str, concurrency: int, duration_s: float, profile: cProfile.Profile | None
) -> dict[str, Any]:
    argv = ["-m", "bench.sidecar_profile", "--client", address, "--duration", str(duration_s),
            "--concurrency", str(concurrency)]  # fmt: skip
    # Popen (vfork, where uvloop's spawn forks: a fork beside grpc's threads can crash the child).
    child = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE)
    assert child.stdout is not None
    out, running = child.stdout, asyncio.get_running_loop()

    async def line() -> bytes:
        return await running.run_in_executor(None, out.readline)

    if await line() != b"start\n":
        raise RuntimeError(f"the client exited ({child.wait()}) before its load")
    threads, cpu, loop = cpu_by_thread_name(os.getpid()), time.process_time(), time.thread_time()
    if profile:
        profile.enable()
    await line()  # "stop"
    if profile:
        profile.disable()
    loop, cpu = time.thread_time() - loop, time.process_time() - cpu
    after = cpu_by_thread_name(os.getpid())
    summary = json.loads(await line())
    if child.wait() != 0:
        raise RuntimeError("the client failed")
    per_call = 1e6 / max(1, summary["calls"])
    by_thread = {name: (used - threads.get(name, 0.0)) * per_call for name, used in after.items()}
    return {
        "calls": summary["calls"],
        "errors": summary["requests"] - summary["ok"],
        "p50_ms": summary["p50_ms"],
        "cpu_us_per_request": cpu * per_call,
        "loop_thread_us_per_request": loop * per_call,
        "threads_us_per_request": {k: v for k, v in sorted(by_thread.items()) if v > 0},
        **({"profile_shares": _shares(profile, loop)} if profile else {}),
    }


async def _runs(router: str, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    config = {"listen": f"127.0.0.1:{free_port()}", "routers": [router], "pick_mode": "table",
              "metrics_listen": "127.0.0.1:0"}  # fmt: skip
    sidecar = await start_sidecar(config_from_mapping(config))
    gc.freeze()  # as `pointsman sidecar` does
    runs: dict[int, dict[str, Any]] = {}
    try:
        await asyncio.wait_for(_routed(sidecar), 60)
        for concurrency in args.concurrency:
            bare = await _measure(sidecar.address, concurrency, args.duration, None)
            profile = cProfile.Profile(time.thread_time)
            profiled = await _measure(sidecar.address, concurrency, args.duration, profile)
            runs[concurrency] = {"bare": bare, "profiled": profiled, "tables": _tables(profile)}
    finally:
        await sidecar.stop(1.0)
    return runs


def _tables(profile: cProfile.Profile) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    for key in ("cumulative", "tottime"):
        out.write(f"--- top {TOP} by {key} (the event loop thread, its CPU time) ---\n")
        stats.sort_stats(key).print_stats(TOP)
    out.write("--- who calls the top 10 by own time ---\n")
    stats.print_callers(10)
    text = out.getvalue()
    for prefix in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"], ROOT):
        text = text.replace(f"{prefix}/", "")
    return text


def _reading(runs: dict[int, dict[str, Any]]) -> str:
    parts = []
    for concurrency, run in runs.items():
        bare, share = run["bare"], run["profiled"]["profile_shares"]
        total, loop = bare["cpu_us_per_request"], bare["loop_thread_us_per_request"]
        ours = share["ours"] + share["prometheus_client"]
        parts.append(
            f"at concurrency {concurrency} the sidecar process spent {total:.0f} us of CPU per "
            f"request, {total - loop:.0f} on other threads (grpc's event engine and completion "
            f"queue poller) and {loop:.0f} on the event loop, whose profile is "
            f"{share['outside Python frames']:.0%} outside any Python frame (grpc.aio's Cython, "
            f"the C core work it does inline, uvloop), {share['grpc']:.0%} grpc's Python, "
            f"{share['asyncio'] + share['uvloop']:.0%} asyncio, {share['other']:.0%} other "
            f"(stdlib helpers: abc, inspect, ...) and {ours:.0%} ours (sidecar/, pointsman/, "
            f"prometheus_client): about {ours * loop:.0f} us per request"
        )
    return (
        "Reading (computed from the figures below): " + "; ".join(parts) + ". Our share is an "
        "upper bound (the profiler's own cost lands on Python calls); the in-process micro "
        "benchmark put our pipeline at 20 to 30 us per request (results/sidecar_pipeline_micro"
        ".json). The rest is grpc's and asyncio's, which the proxyless scenario's bare proxy "
        "(grpc.aio and nothing else, its own process) shows as a floor."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--label", default="", help="where it ran: 'shared, busy machine'")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/sidecar_profile")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return _client(args.client, args.concurrency[0], args.duration)
    import uvloop

    workdir = Path(tempfile.mkdtemp(prefix="pointsman-sidecar-profile-"))
    config = FleetConfig(instances=1, placement={"triton-0": (MODEL,)}, models=(MODEL,),
                         sidecar_port=0, router_port=0, run_dir=workdir)  # fmt: skip
    began = provenance()
    with Fleet(config) as fleet:
        runs = uvloop.run(_runs(fleet.router_address, args))
    command = "python -m bench.sidecar_profile " + " ".join(sys.argv[1:])
    head = {"command": command, "label": args.label, "machine": asdict(machine_info()),
            "provenance": asdict(replace(began, loadavg_end=os.getloadavg()))}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {c: {k: v for k, v in run.items() if k != "tables"} for c, run in runs.items()}
    (args.out / "profile.json").write_text(json.dumps({**head, "runs": figures}, indent=1) + "\n")
    text = [_reading(runs), "", json.dumps(head, indent=1), ""]
    for concurrency, run in runs.items():
        text += [f"=== concurrency {concurrency} ===", json.dumps(run["bare"], indent=1)]
        text += [json.dumps(run["profiled"], indent=1), run["tables"]]
    (args.out / "profile.txt").write_text("\n".join(text))
    print(text[0], f"\nwrote {args.out}/profile.txt, profile.json", sep="\n")


if __name__ == "__main__":
    main()
