"""What collecting one instance's metrics costs the router, against a real Triton.

    python -m bench.collector_cost --out bench/results/collector/results.json [--quick]

Starts one Triton (echo, add_one, codegen loaded; a few requests so its counters move) and
measures process CPU time (user + system, so the syscalls count) in the router's own event
loop (uvloop), each figure over many repetitions:

- parse: the targeted parser vs prometheus_client's general one, on that Triton's page;
- get: one GET over the kept-alive connection vs httpx (what the collector used before);
- refresh: `InstanceWatcher.refresh_metrics()`, the whole scrape as the collector runs it
  (GET, parse, request deltas, counter window);
- fleet: W watchers of distinct instance ids on that one Triton, each refreshing every 0.25 s
  at its own phase, for some seconds: CPU per scrape with the loop's own overhead, and the
  cores 1000 instances at 4 refreshes a second would need at that rate.

Target (issue 15): a scrape + parse <= 0.1 ms of router CPU, 1000 x 4/s < 0.5 core. The
machine is shared and noisy: figures vary run to run; the JSON says which machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import uvloop

from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from bench.report import machine_info, utc_now
from router.config import InstanceConfig
from router.datalayer.collector import InstanceWatcher, scrape_phase
from router.datalayer.scrape import MetricsConnection
from router.datalayer.triton_metrics import parse_triton_metrics, parse_triton_metrics_general

__all__ = ["main", "measure"]

MODELS = ("echo", "add_one", "codegen")
TARGET_US = 100.0
INTERVAL_S = 0.25


def _cpu_us_per_call(call: Callable[[], object], repeat: int) -> float:
    started = time.process_time()
    for _ in range(repeat):
        call()
    return (time.process_time() - started) / repeat * 1e6


async def _cpu_us_per_await(call: Callable[[], Awaitable[object]], repeat: int) -> float:
    await call()  # warm: connect, caches
    started = time.process_time()
    for _ in range(repeat):
        await call()
    return (time.process_time() - started) / repeat * 1e6


def _watcher(instance_id: str, metrics_url: str) -> InstanceWatcher:
    return InstanceWatcher(
        InstanceConfig(instance_id, "127.0.0.1:1", metrics_url),
        clock=time.monotonic,
        refresh_interval_s=0.1,
        metrics_interval_s=INTERVAL_S,
        on_change=lambda: None,
        on_requests=lambda deltas: None,
    )


async def _fleet(metrics_url: str, watchers: int, seconds: float) -> dict[str, float]:
    """`watchers` instances' metrics loops as the collector runs them (own phase each)."""
    fleet = [_watcher(f"triton-{i}", metrics_url) for i in range(watchers)]
    scrapes = [0]

    async def follow(watcher: InstanceWatcher) -> None:
        await asyncio.sleep(scrape_phase(watcher.config.instance_id) * INTERVAL_S)
        while True:
            started = time.monotonic()
            await watcher.refresh_metrics()
            scrapes[0] += 1
            await asyncio.sleep(max(0.0, INTERVAL_S - (time.monotonic() - started)))

    tasks = [asyncio.create_task(follow(w)) for w in fleet]
    await asyncio.sleep(INTERVAL_S * 2)  # every phase has started, connections are open
    before_scrapes, before_cpu = scrapes[0], time.process_time()
    await asyncio.sleep(seconds)
    cpu_s, count = time.process_time() - before_cpu, scrapes[0] - before_scrapes
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for watcher in fleet:
        await watcher.stop()
    per_scrape_us = cpu_s / count * 1e6 if count else float("nan")
    return {
        "watchers": watchers,
        "seconds": seconds,
        "scrapes": count,
        "scrapes_per_s": count / seconds,
        "cpu_s": cpu_s,
        "cpu_us_per_scrape": per_scrape_us,
        "projected_cores_1000_instances_4_per_s": per_scrape_us * 4000 / 1e6,
    }


async def measure(
    metrics_url: str, repeat: int, watchers: int, seconds: float
) -> dict[str, object]:
    connection = MetricsConnection(metrics_url)
    page = await connection.get(timeout_s=5)
    parse_targeted = _cpu_us_per_call(lambda: parse_triton_metrics(page), repeat)
    parse_general = _cpu_us_per_call(lambda: parse_triton_metrics_general(page), repeat // 5)
    get_kept_alive = await _cpu_us_per_await(lambda: connection.get(timeout_s=5), repeat)
    connection.close()
    async with httpx.AsyncClient() as client:
        get_httpx = await _cpu_us_per_await(lambda: client.get(metrics_url), repeat // 5)
    watcher = _watcher("triton-0", metrics_url)
    refresh = await _cpu_us_per_await(watcher.refresh_metrics, repeat)
    await watcher.stop()
    fleet = await _fleet(metrics_url, watchers, seconds)
    return {
        "page_bytes": len(page.encode()),
        "page_lines": page.count("\n"),
        "parse_us": {"targeted": parse_targeted, "general_prometheus_client": parse_general},
        "get_us": {"kept_alive": get_kept_alive, "httpx": get_httpx},
        "refresh_metrics_us": refresh,
        "before_us": parse_general + get_httpx,
        "fleet": fleet,
        "target_us_per_scrape": TARGET_US,
        "target_met": bool(refresh <= TARGET_US),
    }


def _triton(run_dir: Path) -> tuple[TritonSpec, object]:
    spec = TritonSpec.on_free_ports("triton-0", load_models=MODELS, log_path=run_dir / "t.log")
    process = triton_process(spec, prepare_installation())
    process.start()
    wait_until_ready(spec.grpc_address, MODELS, 120, process)
    with grpcclient.InferenceServerClient(spec.grpc_address) as client:
        for model in ("echo", "add_one"):
            tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
            tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
            for _ in range(10):
                client.infer(model, [tensor])
    return spec, process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--quick", action="store_true", help="a smoke run: seconds, not a minute")
    args = parser.parse_args(argv)
    repeat, watchers, seconds = (300, 20, 2.0) if args.quick else (3000, 250, 20.0)
    with tempfile.TemporaryDirectory(prefix="pointsman-collector-") as folder:
        spec, process = _triton(Path(folder))
        try:
            figures = uvloop.run(measure(spec.metrics_url, repeat, watchers, seconds))
        finally:
            process.send_stop()  # type: ignore[attr-defined]
            process.wait(30)  # type: ignore[attr-defined]
    result = {
        "benchmark": "collector_cost",
        "when": utc_now(),
        "command": " ".join(["python -m bench.collector_cost", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "machine": asdict(machine_info()),
        "note": "shared 2-core VM with other agents' work running: noisy, figures vary",
        **figures,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
