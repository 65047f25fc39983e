"""Scenario `batching`: how much Triton's dynamic batcher buys the codegen model.

Two parts. (1) In process: the model's own Decoder (triton_models/codegen/1/model.py) with one
BLAS thread, as the fleet runs it, timing one decode step per batch size. (2) End to end: one
Triton serves `codegen` with the batcher as shipped, then the same config minus
`dynamic_batching` (a config override on load), each driven by closed-loop clients at several
concurrencies, in alternating order over rounds; Triton's inference and execution counters give
the average batch.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import tritonclient.grpc as grpcclient

from app.triton import DEFAULT_MODEL_REPOSITORY, wait_until_ready
from bench.calls import PROMPTS, TritonCalls, codegen_request
from bench.cell import average_batch, batch_counters
from bench.loadgen import Request, run_closed_loop
from bench.report import BarGroup, ScenarioResult, Table
from bench.scenarios import Options, Say
from bench.scenarios.quick_fleet import SharedFleet, one_triton
from bench.stats import Interval, LoadSummary, bootstrap_median, summarize
from bench.testbed import server_version

__all__ = ["BatchingSettings", "decode_step_seconds", "run_batching", "scenario"]

MODEL_FILE = DEFAULT_MODEL_REPOSITORY / "codegen" / "1" / "model.py"
CONFIG = DEFAULT_MODEL_REPOSITORY / "codegen" / "config.pbtxt"


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    batches: tuple[int, ...] = (1, 2, 4, 8)
    steps: int = 50
    repeats: int = 5
    concurrencies: tuple[int, ...] = (1, 8, 16)
    duration_s: float = 5.0
    rounds: int = 3
    seed: int = 7
    triton: bool = True
    tokens: int | None = None  # tokens per request; None: the model's own default


def _parameter(key: str) -> str:
    match = re.search(
        rf'key:\s*"{re.escape(key)}"\s*value:\s*{{\s*string_value:\s*"([^"]*)"', CONFIG.read_text()
    )
    if not match:
        raise ValueError(f"{CONFIG} has no parameter {key!r}")
    return match.group(1)


def _model_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_codegen_model", MODEL_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def decode_step_seconds(batches: tuple[int, ...], steps: int, repeats: int) -> dict[int, float]:
    """The best time of one decode step per batch size, measured in a child process with one
    BLAS thread (numpy fixes its thread count when it loads, so it cannot be set here)."""
    one_thread = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    argv = [sys.executable, "-m", "bench.scenarios.batching", json.dumps([batches, steps, repeats])]
    done = subprocess.run(
        argv, env={**os.environ, **one_thread}, capture_output=True, text=True, check=True
    )
    return {int(b): float(t) for b, t in json.loads(done.stdout).items()}


def _decode_steps_here(batches: list[int], steps: int, repeats: int) -> dict[int, float]:
    decoder = _model_module().Decoder(
        int(_parameter("hidden_size")), 256, int(_parameter("seed")), 1
    )
    per_step: dict[int, float] = {}
    for b in batches:
        h = np.stack([decoder.start(f"prompt {i}".encode()) for i in range(b)])
        prev = np.full(b, decoder.bos)
        for _ in range(3):  # warm up
            h, prev = decoder.step(h, prev, np.zeros(b, dtype=np.intp))
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for s in range(steps):
                h, prev = decoder.step(h, prev, np.full(b, s))
            best = min(best, (time.perf_counter() - started) / steps)
        per_step[b] = best
    return per_step


def _tokens(settings: BatchingSettings) -> int:
    return settings.tokens or int(_parameter("tokens"))


def _drive(address: str, concurrency: int, duration_s: float, tokens: int) -> LoadSummary:
    bodies = [codegen_request(p, tokens) for p in PROMPTS]

    async def run() -> LoadSummary:
        async with grpc.aio.insecure_channel(address) as channel:
            calls = TritonCalls(channel)
            done = await run_closed_loop(
                lambda w, _at: Request(calls.unary(bodies[w % len(bodies)])),
                concurrency=concurrency,
                duration_s=duration_s,
                warmup_s=min(1.0, duration_s / 4),
            )
            return summarize(done.records, done.elapsed_s)

    return asyncio.run(run())


Row = tuple[str, int, LoadSummary, float]


def _triton(
    settings: BatchingSettings, say: Say, shared: SharedFleet | None
) -> tuple[list[Row], str]:
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-batching-"))
    rows: list[Row] = []
    with (
        one_triton(shared, ("codegen",), workdir, "bench-batching") as (spec, process),
        grpcclient.InferenceServerClient(spec.grpc_address) as client,
    ):
        version = server_version(spec.grpc_address)
        shipped = client.get_model_config("codegen", as_json=True)["config"]
        configs = {
            "on": shipped,
            "off": {k: v for k, v in shipped.items() if k != "dynamic_batching"},
        }
        loaded = "on"  # as shipped
        tokens = _tokens(settings)

        def load(mode: str) -> None:
            nonlocal loaded
            if mode != loaded:
                client.load_model("codegen", config=json.dumps(configs[mode]))
                wait_until_ready(spec.grpc_address, ["codegen"], 60, process)
                loaded = mode

        try:
            for round_index in range(settings.rounds):
                modes = ("on", "off") if round_index % 2 == 0 else ("off", "on")
                for mode in modes:
                    load(mode)
                    for concurrency in settings.concurrencies:
                        say(f"batching: round {round_index + 1}, batcher {mode}, c={concurrency}")
                        before = batch_counters([spec.metrics_url])
                        summary = _drive(
                            spec.grpc_address, concurrency, settings.duration_s, tokens
                        )
                        time.sleep(0.6)  # Triton refreshes its metrics every 250 ms here
                        batch = average_batch(before, batch_counters([spec.metrics_url]))
                        rows.append((mode, concurrency, summary, batch))
        finally:
            if shared is not None:
                load("on")  # leave the shared Triton as it was
    return rows, version


def run_batching(
    settings: BatchingSettings, say: Say = lambda _line: None, shared: SharedFleet | None = None
) -> ScenarioResult:
    """The decode steps in process, then the batcher on and off on `shared`'s Triton when
    given, else on a Triton of its own."""
    say("batching: decode steps in process ...")
    steps = decode_step_seconds(settings.batches, settings.steps, settings.repeats)
    base = steps[min(steps)]
    step_rows = tuple((b, t * 1e3, t / base, b / t, b * base / t) for b, t in steps.items())
    tables = [
        Table(
            f"Decode step in process, hidden size {_parameter('hidden_size')}, 1 BLAS thread "
            f"(best of {settings.repeats} x {settings.steps} steps)",
            ("batch", "ms/step", "x batch 1", "tokens/s", "speedup"),
            step_rows,
        )
    ]
    data: dict[str, object] = {
        "decode_step_ms": {str(b): t * 1e3 for b, t in steps.items()},
        "settings": {
            "rounds": settings.rounds,
            "duration_s": settings.duration_s,
            "concurrencies": list(settings.concurrencies),
            "tokens": _tokens(settings),
        },
    }
    bars = []
    if settings.triton:
        rows, version = _triton(settings, say, shared)
        data["triton_version"] = version
        rng = random.Random(settings.seed)
        cells = []
        for mode in ("on", "off"):
            for c in settings.concurrencies:
                runs = [(s, b) for m, k, s, b in rows if (m, k) == (mode, c)]
                rps = bootstrap_median([s.throughput_rps for s, _ in runs], rng)
                p50 = bootstrap_median([s.p50_ms for s, _ in runs], rng)
                p99 = bootstrap_median([s.p99_ms for s, _ in runs], rng)
                batch = bootstrap_median([b for _, b in runs], rng)
                errors = sum(s.errors for s, _ in runs)
                cells.append((mode, c, rps, p50, p99, batch, errors, [s for s, _ in runs]))
        tables.append(
            Table(
                f"codegen ({_tokens(settings)} tokens a request) through one Triton, closed loop, "
                f"{settings.duration_s:g} s per run, "
                f"{settings.rounds} rounds; median [95 % interval]",
                ("batcher", "clients", "req/s", "p50 ms", "p99 ms", "avg batch", "errors"),
                tuple(
                    (m, c, _ci(r), _ci(p5), _ci(p9), _ci(b), e)
                    for m, c, r, p5, p9, b, e, _ in cells
                ),
            )
        )
        data["triton"] = [
            {
                "batcher": m,
                "clients": c,
                "throughput_rps": r.to_dict(),
                "p50_ms": p5.to_dict(),
                "p99_ms": p9.to_dict(),
                "average_batch": b.to_dict(),
                "errors": e,
                "runs": [s.to_dict() for s in runs],
            }
            for m, c, r, p5, p9, b, e, runs in cells
        ]
        top = max(settings.concurrencies)
        bars.append(
            BarGroup(
                f"throughput at {top} clients",
                "requests/s",
                ("batcher on", "batcher off"),
                tuple(r.median for m, c, r, *_ in cells if c == top),
            )
        )
    return ScenarioResult(
        name="batching",
        title="Batching: decode cost by batch size, and the dynamic batcher on vs off",
        tables=tuple(tables),
        bars=tuple(bars),
        notes=(
            "The load generator shares the CPUs with Triton: absolute rates are low.",
            *(("quick mode: on the quick run's shared Triton",) if shared else ()),
        ),
        data=data,
    )


def _ci(interval: Interval) -> str:
    return interval.text()


def scenario(options: Options, say: Say) -> ScenarioResult:
    settings = BatchingSettings(seed=options.seed)
    if options.quick:
        settings = replace(
            settings,
            steps=5,
            repeats=1,
            concurrencies=(8,),
            duration_s=0.5,
            rounds=1,
            tokens=4,  # short requests: many of them in half a second, even on a busy machine
        )
    if options.duration_s:
        settings = replace(settings, duration_s=options.duration_s)
    if options.repetitions:
        settings = replace(settings, rounds=options.repetitions)
    return run_batching(settings, say, options.shared)


if __name__ == "__main__":  # the child of decode_step_seconds
    print(json.dumps(_decode_steps_here(*json.loads(sys.argv[1]))))
