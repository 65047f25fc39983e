"""`pointsman demo`: a local fleet, a mixed workload through the sidecar, then a summary."""

from __future__ import annotations

import asyncio
import random
import urllib.request
from collections import Counter
from collections.abc import Callable

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.fleet import Fleet, FleetConfig
from bench.calls import PROMPTS, TritonCalls, codegen_request
from bench.loadgen import CallRecord, LoadRun, Request, run_closed_loop
from bench.stats import summarize_by_tag
from router.datalayer.triton_metrics import TritonMetrics, parse_triton_metrics

__all__ = ["run_demo"]


def _scrape(url: str) -> TritonMetrics:
    with urllib.request.urlopen(url, timeout=5) as response:
        return parse_triton_metrics(response.read().decode())


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {m: v - before.get(m, 0.0) for m, v in after.items() if v - before.get(m, 0.0) > 0}


def run_demo(config: FleetConfig, *, duration_s: float, concurrency: int) -> int:
    console = Console()
    fleet = Fleet(config)
    console.print(f"[bold]Starting a local fleet of {config.instances} Triton servers ...")
    try:
        fleet.start()
        console.print(f"sidecar {fleet.sidecar_address}, router {fleet.router_address}")
        for spec in fleet.tritons:
            console.print(f"  {spec.instance_id}: {', '.join(spec.load_models) or '-'}")
        before = {s.instance_id: _scrape(s.metrics_url) for s in fleet.tritons}
        run = _drive(console, fleet.sidecar_address, duration_s, concurrency)
        after = {s.instance_id: _scrape(s.metrics_url) for s in fleet.tritons}
        for death in fleet.check_children():
            console.print(f"[red]{death}")
    finally:
        console.print("stopping the fleet ...")
        fleet.stop()
    _summarise(console, run, before, after)
    errors = sum(1 for r in run.records if r.status != "OK")
    return 0 if run.records and errors <= len(run.records) * 0.01 else 1


UNARY_MODEL, STREAM_MODEL = "codegen", "codegen_stream"
STREAM_FRACTION = 0.25
MAX_TOKENS = 16
SEED = 7


def _mixed_requests(calls: TritonCalls, concurrency: int) -> Callable[[int, float], Request]:
    """Each client's next request: streaming `codegen_stream` (read to the last token) for a
    quarter of them, unary `codegen` otherwise, with a seeded random prompt."""
    bodies = {
        model: [codegen_request(p, MAX_TOKENS, model=model) for p in PROMPTS]
        for model in (UNARY_MODEL, STREAM_MODEL)
    }
    rngs = [random.Random(SEED * 1000 + worker) for worker in range(concurrency)]

    def make(worker: int, _at: float) -> Request:
        rng = rngs[worker]
        if rng.random() < STREAM_FRACTION:
            body = rng.choice(bodies[STREAM_MODEL])
            return Request(calls.stream(body, MAX_TOKENS), STREAM_MODEL)
        return Request(calls.unary(rng.choice(bodies[UNARY_MODEL])), UNARY_MODEL)

    return make


def _drive(console: Console, address: str, duration_s: float, concurrency: int) -> LoadRun:
    with Progress(
        TextColumn("[bold]traffic"),
        BarColumn(),
        TextColumn("{task.fields[done]} requests, {task.fields[errors]} errors"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("traffic", total=duration_s, done=0, errors=0)
        counts = Counter[str]()

        def on_record(record: CallRecord) -> None:
            counts["done"] += 1
            counts["errors"] += record.status != "OK"

        async def drive() -> LoadRun:
            async with grpc.aio.insecure_channel(address) as channel:
                work = asyncio.create_task(
                    run_closed_loop(
                        _mixed_requests(TritonCalls(channel), concurrency),
                        concurrency=concurrency,
                        duration_s=duration_s,
                        on_record=on_record,
                    )
                )
                loop = asyncio.get_running_loop()
                began = loop.time()
                while not work.done():
                    progress.update(
                        task,
                        completed=min(duration_s, loop.time() - began),
                        done=counts["done"],
                        errors=counts["errors"],
                    )
                    await asyncio.sleep(0.2)
                progress.update(
                    task, completed=duration_s, done=counts["done"], errors=counts["errors"]
                )
                return await work

        return asyncio.run(drive())


def _summarise(
    console: Console,
    run: LoadRun,
    before: dict[str, TritonMetrics],
    after: dict[str, TritonMetrics],
) -> None:
    latency = Table(
        title=f"Through the sidecar: {len(run.records)} requests in {run.elapsed_s:.0f}s"
    )
    columns = ("model", "requests", "req/s", "p50 ms", "p99 ms", "first token p50 ms", "errors")
    for column in columns:
        latency.add_column(column, justify="right" if column != "model" else "left")
    for model, summary in summarize_by_tag(run.records, run.elapsed_s).items():
        streamed = model == STREAM_MODEL
        latency.add_row(
            model + (" (stream, full)" if streamed else ""),
            str(summary.requests),
            f"{summary.requests / run.elapsed_s:.1f}",
            f"{summary.p50_ms:.1f}",
            f"{summary.p99_ms:.1f}",
            f"{summary.ttft_p50_ms:.1f}" if streamed else "-",
            ", ".join(f"{k} {v}" for k, v in summary.errors_by_status.items()) or "0",
        )
    console.print(latency)

    placement = Table(title="Per Triton instance (from Triton's own metrics)")
    for column in ("instance", "model", "requests", "avg batch size"):
        placement.add_column(column, justify="left" if column in ("instance", "model") else "right")
    for instance_id in sorted(after):
        success = _delta(after[instance_id].success_by_model, before[instance_id].success_by_model)
        counts = _delta(
            after[instance_id].inference_count_by_model,
            before[instance_id].inference_count_by_model,
        )
        execs = _delta(
            after[instance_id].exec_count_by_model, before[instance_id].exec_count_by_model
        )
        if not success:
            placement.add_row(instance_id, "-", "0", "-")
        for model in sorted(success):
            batch = counts.get(model, 0.0) / execs[model] if execs.get(model) else float("nan")
            placement.add_row(instance_id, model, f"{success[model]:.0f}", f"{batch:.2f}")
    console.print(placement)
    console.print(
        "Weights are random: the generated text is not meaningful code. "
        "Avg batch size > 1 shows Triton's dynamic batcher at work; codegen_stream batches "
        "inside the model (new streams join the running decode), which Triton counts as 1."
    )
