"""Scenario `seed-table`: the model-router article's table, measured here on real Tritons.

Three Triton instances, several models with skewed (Zipf) popularity, a per-instance memory
budget that holds only some of them. The same closed-loop workload (same clients, seed, model
mix, prompts and token counts) runs three ways:

 (a) round robin over the instances with load-on-miss, as a plain Kubernetes Service in front
     of Tritons that load what they are asked for: a model missing where a request lands is
     loaded there, evicting least recently used idle models to stay within the budget;
 (b) Pointsman (router + sidecar) with Triton's dynamic batcher off, as in (a);
 (c) Pointsman with the dynamic batcher on, with the settings the models ship with.

The models are copies of `codegen` (one version each, own weight seed) written into a model
repository made at run time; (a) and (b) use the same repository minus `dynamic_batching`, so
the shipped models are never edited. Each system starts empty, gets a warm-up, then is
measured: latency p50/p99 and throughput from the load generator, cold starts (requests that
waited for a load) after warm-up, peak memory (declared model bytes and the measured RSS of
the Triton processes with their model stubs), average batch size (Triton's inference count
over its execution count) and errors by status.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import tempfile
import threading
import time
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from prometheus_client.parser import text_string_to_metric_families

from app.fleet import Fleet, FleetConfig
from app.processes import stop_all
from app.triton import (
    DEFAULT_MODEL_REPOSITORY,
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)
from app.workload import PROMPTS, codegen_inputs
from bench.loadgen import (
    Call,
    LoadSummary,
    infer_request_bytes,
    run_closed_loop,
    unary_call,
)
from bench.report import BarGroup, ScenarioResult, Table, TargetCheck, ratio
from router.datalayer.triton_metrics import parse_triton_metrics

__all__ = [
    "RoundRobinLoadOnMiss",
    "SeedTableSettings",
    "bench_repository",
    "model_config",
    "run_seed_table",
    "zipf_popularity",
]

MiB = 1024**2
FOOTPRINT = 64 * MiB  # codegen's declared pointsman.memory_bytes
# The article's table, for the reader's comparison (not measured here).
ARTICLE = {
    "round robin": (880.0, 42.0, 12),
    "model router": (520.0, 68.0, 2),
    "router + batching": (310.0, 94.0, 0),
}
TARGET_P99_RATIO = 0.30
TARGET_THROUGHPUT_RATIO = 2.5


@dataclass(frozen=True, slots=True)
class SeedTableSettings:
    models: int = 6
    instances: int = 3
    models_per_instance: int = 3  # the budget holds this many footprints
    concurrency: int = 16
    max_tokens: int = 8
    zipf_exponent: float = 1.2
    warmup_s: float = 15.0
    duration_s: float = 30.0
    seed: int = 7
    progress: bool = False

    @property
    def budget_bytes(self) -> int:
        # A little over k footprints: room for k models, never k + 1.
        return self.models_per_instance * FOOTPRINT + FOOTPRINT // 2

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(f"codegen_{chr(ord('a') + i)}" for i in range(self.models))


def zipf_popularity(count: int, exponent: float) -> list[float]:
    """Share of requests for the model of each popularity rank (1/rank^s, normalised)."""
    weights = [1 / (rank + 1) ** exponent for rank in range(count)]
    total = sum(weights)
    return [w / total for w in weights]


_BATCHER = re.compile(r"\ndynamic_batching \{.*?\n\}\n", re.S)


def model_config(template: str, name: str, seed: int, batcher: bool) -> str:
    """codegen's config as model `name`: one version, its own weight seed, with or without
    the dynamic batcher (its block, queue policy included, removed)."""
    text = template.replace('name: "codegen"', f'name: "{name}"', 1)
    text = text.replace("version_policy: { all {} }\n", "", 1)
    text = re.sub(r'(key: "seed" value: \{ string_value: )"\d+"', rf'\1"{seed}"', text)
    if not batcher:
        text, removed = _BATCHER.subn("\n", text)
        if removed != 1:
            raise ValueError("codegen's config has no dynamic_batching block to remove")
    return text


def bench_repository(root: Path, names: Sequence[str], batcher: bool) -> Path:
    """A model repository of codegen copies; each links to codegen's own model.py."""
    template = (DEFAULT_MODEL_REPOSITORY / "codegen" / "config.pbtxt").read_text()
    source = (DEFAULT_MODEL_REPOSITORY / "codegen" / "1" / "model.py").resolve()
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(
            model_config(template, name, 20240607 + index, batcher)
        )
        link = root / name / "1" / "model.py"
        if not link.exists():
            link.symlink_to(source)
    return root


def _bodies(names: Sequence[str], max_tokens: int) -> dict[str, list[bytes]]:
    return {
        name: [
            infer_request_bytes(name, codegen_inputs(prompt, max_tokens), ["TEXT"])
            for prompt in PROMPTS
        ]
        for name in names
    }


class _Mix:
    """Which model and prompt each worker sends next: per-worker seeded random streams."""

    def __init__(self, settings: SeedTableSettings) -> None:
        self.names = settings.model_names
        self.weights = zipf_popularity(len(self.names), settings.zipf_exponent)
        self.bodies = _bodies(self.names, settings.max_tokens)
        self._rngs = [random.Random(settings.seed * 1000 + w) for w in range(settings.concurrency)]

    def next(self, worker: int) -> tuple[str, bytes]:
        rng = self._rngs[worker]
        model = rng.choices(self.names, weights=self.weights)[0]
        return model, rng.choice(self.bodies[model])


class RoundRobinLoadOnMiss:
    """Baseline (a): round robin over instances; a miss loads the model where the request
    landed, first unloading least recently used models with no request in flight until the
    new one fits the budget. Requests for a model being loaded wait for the load."""

    def __init__(self, addresses: Sequence[str], budget_bytes: int) -> None:
        self.addresses = list(addresses)
        self.budget_bytes = budget_bytes
        self.loaded: dict[str, OrderedDict[str, None]] = {a: OrderedDict() for a in addresses}
        self.in_flight: Counter[tuple[str, str]] = Counter()
        self.cold_starts = 0
        self.peak_declared_bytes = 0
        self._locks = {a: asyncio.Lock() for a in addresses}
        self._next = 0

    def used_bytes(self, address: str) -> int:
        return FOOTPRINT * len(self.loaded[address])

    async def send(self, model: str, send_to: Callable[[str], Call]) -> None:
        address = self.addresses[self._next % len(self.addresses)]
        self._next += 1
        loaded = self.loaded[address]
        if model in loaded:
            loaded.move_to_end(model)
        else:
            await self._load(address, model)
        # No await between the check above and this count, so no eviction can slip in.
        self.in_flight[(address, model)] += 1
        try:
            await send_to(address)()
        finally:
            self.in_flight[(address, model)] -= 1

    async def _load(self, address: str, model: str) -> None:
        async with self._locks[address]:
            loaded = self.loaded[address]
            if model in loaded:  # loaded while this request waited for the lock
                return
            client = grpcclient_aio.InferenceServerClient(address)
            try:
                while self.used_bytes(address) + FOOTPRINT > self.budget_bytes:
                    idle = [m for m in loaded if self.in_flight[(address, m)] == 0]
                    if not idle:
                        await asyncio.sleep(0.005)  # every copy busy: wait for one to finish
                        continue
                    del loaded[idle[0]]
                    await client.unload_model(idle[0])
                await client.load_model(model)
            finally:
                await client.close()
            loaded[model] = None
            self.cold_starts += 1
            fleet_bytes = sum(self.used_bytes(a) for a in self.addresses)
            self.peak_declared_bytes = max(self.peak_declared_bytes, fleet_bytes)


# --- measurements read from the running processes -------------------------------------------


def _children(pids: Sequence[int]) -> set[int]:
    """`pids` and all their descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree = set(pids)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def tree_rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of the processes and their descendants (Triton and its model stubs)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in _children(pids):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


@contextmanager
def _sample_peak(read: Callable[[], int], interval_s: float = 0.5) -> Iterator[list[int]]:
    """Samples `read()` on a thread while the block runs; yields [peak]."""
    peak = [0]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            # A sample lost to a process ending is just a missed sample.
            with contextlib.suppress(Exception):
                peak[0] = max(peak[0], read())
            stop.wait(interval_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(5)


def _batch_counters(metrics_urls: Sequence[str]) -> Counters:
    """(instance url, model) -> (inference count, execution count), cumulative."""
    counters: Counters = {}
    for url in metrics_urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            metrics = parse_triton_metrics(response.read().decode())
        for model, count in metrics.inference_count_by_model.items():
            counters[(url, model)] = (count, metrics.exec_count_by_model.get(model, 0.0))
    return counters


def average_batch(before: Counters, after: Counters) -> float:
    """Inferences per execution over the window. A series that appeared counts from zero; one
    that vanished (its model was unloaded) or restarted (reloaded) is left out."""
    inferences = executions = 0.0
    for key, (count, execs) in after.items():
        count0, execs0 = before.get(key, (0.0, 0.0))
        if count >= count0 and execs >= execs0:
            inferences += count - count0
            executions += execs - execs0
    return inferences / executions if executions else math.nan


def _cold_starts(sidecar_metrics_url: str) -> float:
    with urllib.request.urlopen(sidecar_metrics_url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return sum(
            sample.value
            for family in families
            if family.name == "pointsman_sidecar_cold_starts"
            for sample in family.samples
            if sample.name.endswith("_total")
        )


Counters = dict[tuple[str, str], tuple[float, float]]


@dataclass
class _Marks:
    """Figures read at the boundary between warm-up and the measured run."""

    cold_starts: float = 0.0
    counters: Counters = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SystemResult:
    name: str
    summary: LoadSummary
    warmup_cold_starts: int
    cold_starts: int  # after warm-up
    peak_declared_bytes: int
    peak_rss_bytes: int
    average_batch: float

    def to_dict(self) -> dict[str, object]:
        return {
            "system": self.name,
            **self.summary.to_dict(),
            "warmup_cold_starts": self.warmup_cold_starts,
            "cold_starts_after_warmup": self.cold_starts,
            "peak_declared_bytes": self.peak_declared_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "average_batch_size": self.average_batch,
        }


async def _drive(
    settings: SeedTableSettings,
    mix: _Mix,
    send: Callable[[str, bytes], Call],
    label: str,
    between: Callable[[], None],
) -> LoadSummary:
    """Warm-up (not recorded), `between()`, then the measured run; same clients for both."""

    def make_call(worker: int) -> Call:
        model, body = mix.next(worker)
        return send(model, body)

    await run_closed_loop(
        make_call,
        concurrency=settings.concurrency,
        duration_s=settings.warmup_s,
        label=f"{label}: warm-up",
        progress=settings.progress,
    )
    between()
    return await run_closed_loop(
        make_call,
        concurrency=settings.concurrency,
        duration_s=settings.duration_s,
        label=f"{label}: measured",
        progress=settings.progress,
    )


def server_version(address: str) -> str:
    """The Triton server's version, from its metadata."""
    with grpcclient.InferenceServerClient(address) as client:
        return str(client.get_server_metadata().version)


def _run_round_robin(
    settings: SeedTableSettings, repo: Path, workdir: Path
) -> tuple[str, SystemResult]:
    specs = [
        TritonSpec.on_free_ports(f"rr-{i}", model_repository=repo, log_path=workdir / f"rr-{i}.log")
        for i in range(settings.instances)
    ]
    installation = prepare_installation()
    processes = [triton_process(s, installation) for s in specs]
    mix = _Mix(settings)
    try:
        for process in processes:
            process.start()
        for spec, process in zip(specs, processes, strict=True):
            wait_until_ready(spec.grpc_address, [], 60, process)
        triton_version = server_version(specs[0].grpc_address)
        pids = [p.pid for p in processes if p.pid is not None]
        baseline = RoundRobinLoadOnMiss([s.grpc_address for s in specs], settings.budget_bytes)
        marks = _Marks()

        def at_measure_start() -> None:
            marks.cold_starts = baseline.cold_starts
            marks.counters = _batch_counters([s.metrics_url for s in specs])
            baseline.peak_declared_bytes = sum(baseline.used_bytes(a) for a in baseline.addresses)

        async def run() -> LoadSummary:
            channels = {s.grpc_address: grpc.aio.insecure_channel(s.grpc_address) for s in specs}
            try:

                def send(model: str, body: bytes) -> Call:
                    async def call() -> None:
                        await baseline.send(model, lambda a: unary_call(channels[a], body)())

                    return call

                return await _drive(settings, mix, send, "(a) round robin", at_measure_start)
            finally:
                for channel in channels.values():
                    await channel.close()

        with _sample_peak(lambda: tree_rss_bytes(pids)) as peak_rss:
            summary = asyncio.run(run())
        time.sleep(0.6)  # Triton refreshes its metrics every 250 ms here
        batch = average_batch(marks.counters, _batch_counters([s.metrics_url for s in specs]))
        warm = int(marks.cold_starts)
        return triton_version, SystemResult(
            "(a) round robin + load-on-miss",
            summary,
            warm,
            baseline.cold_starts - warm,
            baseline.peak_declared_bytes,
            peak_rss[0],
            batch,
        )
    finally:
        stop_all(processes)


def _policy(settings: SeedTableSettings) -> str:
    # The footprint is named because a model never seen loaded has no declared size yet.
    lines = ["models:"]
    lines += [
        f"  {name}: {{min_copies: 1, memory_bytes: {FOOTPRINT}}}" for name in settings.model_names
    ]
    return "\n".join(lines) + "\n"


def _run_pointsman(
    settings: SeedTableSettings, repo: Path, workdir: Path, name: str
) -> SystemResult:
    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "policy.yaml"
    policy.write_text(_policy(settings))
    fleet = Fleet(
        FleetConfig(
            instances=settings.instances,
            placement={f"triton-{i}": () for i in range(settings.instances)},
            models=settings.model_names,
            model_repository=repo,
            sidecar_port=0,
            router_port=0,
            memory_budget_bytes=settings.budget_bytes,
            policy_file=policy,
            run_dir=workdir,
        )
    )
    mix = _Mix(settings)
    fleet.start()
    try:
        pids = [p.pid for p in fleet.processes if p.name.startswith("triton-") and p.pid]
        metrics_urls = [s.metrics_url for s in fleet.tritons]
        marks = _Marks()

        def at_measure_start() -> None:
            marks.cold_starts = _cold_starts(fleet.sidecar_metrics_url)
            marks.counters = _batch_counters(metrics_urls)

        def declared_bytes() -> int:
            from pointsman.router.v1 import router_pb2 as pb
            from pointsman.router.v1 import router_pb2_grpc as pb_grpc

            with grpc.insecure_channel(fleet.router_address) as channel:
                stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
                listed = stub.ListInstances(pb.ListInstancesRequest(), timeout=2)
                return sum(int(i.memory_used_bytes) for i in listed.instances)

        async def run() -> LoadSummary:
            async with grpc.aio.insecure_channel(fleet.sidecar_address) as channel:

                def send(_model: str, body: bytes) -> Call:
                    return unary_call(channel, body)()

                return await _drive(settings, mix, send, name, at_measure_start)

        with (
            _sample_peak(lambda: tree_rss_bytes(pids)) as peak_rss,
            _sample_peak(declared_bytes, interval_s=1.0) as peak_declared,
        ):
            summary = asyncio.run(run())
        time.sleep(0.6)
        batch = average_batch(marks.counters, _batch_counters(metrics_urls))
        warm = int(marks.cold_starts)
        after = int(_cold_starts(fleet.sidecar_metrics_url))
        return SystemResult(name, summary, warm, after - warm, peak_declared[0], peak_rss[0], batch)
    finally:
        fleet.stop()


def run_seed_table(
    settings: SeedTableSettings, progress: Callable[[str], None] = lambda _line: None
) -> ScenarioResult:
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-seed-table-"))
    names = settings.model_names
    repo_off = bench_repository(workdir / "repo-batcher-off", names, batcher=False)
    repo_on = bench_repository(workdir / "repo-batcher-on", names, batcher=True)
    progress("seed-table: (a) round robin + load-on-miss ...")
    triton_version, baseline = _run_round_robin(settings, repo_off, workdir / "a")
    results = [baseline]
    progress("seed-table: (b) Pointsman, batcher off ...")
    results.append(_run_pointsman(settings, repo_off, workdir / "b", "(b) Pointsman, batcher off"))
    progress("seed-table: (c) Pointsman, batcher on ...")
    results.append(_run_pointsman(settings, repo_on, workdir / "c", "(c) Pointsman + batcher"))
    result = _result(settings, results, workdir)
    result.data["triton_version"] = triton_version
    return result


def _result(
    settings: SeedTableSettings, results: Sequence[SystemResult], workdir: Path
) -> ScenarioResult:
    base = results[0].summary
    rows = []
    for r in results:
        s = r.summary
        rows.append(
            (
                r.name,
                s.p50_ms,
                s.p99_ms,
                s.throughput_rps,
                r.cold_starts,
                r.warmup_cold_starts,
                r.peak_declared_bytes / MiB,
                r.peak_rss_bytes / MiB,
                r.average_batch,
                s.errors,
                ", ".join(f"{k} {v}" for k, v in s.errors_by_status.items()) or "-",
                ratio(s.p99_ms, base.p99_ms),
                ratio(s.throughput_rps, base.throughput_rps),
            )
        )
    shares = zipf_popularity(settings.models, settings.zipf_exponent)
    labels = tuple(r.name.split(")")[0] + ")" for r in results)
    best = results[-1]
    return ScenarioResult(
        name="seed-table",
        title="Seed table: round robin vs Pointsman vs Pointsman + batching",
        tables=(
            Table(
                f"{settings.instances} Tritons, {settings.models} codegen models "
                f"(room for {settings.models_per_instance} per instance), "
                f"{settings.concurrency} closed-loop clients, {settings.max_tokens} tokens, "
                f"{settings.warmup_s:g} s warm-up + {settings.duration_s:g} s measured",
                (
                    "system",
                    "p50 ms",
                    "p99 ms",
                    "req/s",
                    "cold starts",
                    "warm-up cold starts",
                    "peak declared MiB",
                    "peak Triton RSS MiB",
                    "avg batch",
                    "errors",
                    "errors by status",
                    "p99 vs (a)",
                    "req/s vs (a)",
                ),
                tuple(rows),
            ),
            Table(
                "The article's table (its hardware, for comparison; not measured here)",
                ("system", "p99 ms", "QPS", "cold starts"),
                tuple((k, *v) for k, v in ARTICLE.items()),
            ),
        ),
        bars=(
            BarGroup(
                "p99 latency",
                "ms (log scale)",
                labels,
                tuple(r.summary.p99_ms for r in results),
                log_scale=True,
            ),
            BarGroup(
                "throughput", "requests/s", labels, tuple(r.summary.throughput_rps for r in results)
            ),
            BarGroup(
                "cold starts after warm-up",
                "count",
                labels,
                tuple(float(r.cold_starts) for r in results),
            ),
        ),
        targets=(
            TargetCheck(
                "(c) p99 vs (a)",
                f"<= {TARGET_P99_RATIO:.2f}x",
                f"{ratio(best.summary.p99_ms, base.p99_ms):.2f}x",
                ratio(best.summary.p99_ms, base.p99_ms) <= TARGET_P99_RATIO,
            ),
            TargetCheck(
                "(c) throughput vs (a)",
                f">= {TARGET_THROUGHPUT_RATIO:.1f}x",
                f"{ratio(best.summary.throughput_rps, base.throughput_rps):.2f}x",
                ratio(best.summary.throughput_rps, base.throughput_rps) >= TARGET_THROUGHPUT_RATIO,
            ),
            TargetCheck(
                "(c) cold starts after warm-up",
                "0",
                str(best.cold_starts),
                best.cold_starts == 0,
            ),
        ),
        notes=(
            "Model popularity (Zipf, exponent "
            f"{settings.zipf_exponent:g}): "
            + ", ".join(f"{n} {s:.0%}" for n, s in zip(settings.model_names, shares, strict=True)),
            f"Memory budget per instance: {settings.budget_bytes / MiB:.0f} MiB; each model "
            f"declares {FOOTPRINT / MiB:.0f} MiB. (a) and (b) run the same repository without "
            "dynamic_batching; (c) with the batcher settings the models ship with.",
            "Cold starts: (a) loads it made; (b), (c) the sidecar's "
            "pointsman_sidecar_cold_starts_total (requests that waited for a load).",
            "Average batch: Triton's nv_inference_count / nv_inference_exec_count over the "
            "measured window (series of models unloaded meanwhile are left out).",
            f"logs: {workdir}",
        ),
        data={
            "settings": {
                "models": list(settings.model_names),
                "instances": settings.instances,
                "budget_bytes": settings.budget_bytes,
                "concurrency": settings.concurrency,
                "max_tokens": settings.max_tokens,
                "zipf_exponent": settings.zipf_exponent,
                "warmup_s": settings.warmup_s,
                "duration_s": settings.duration_s,
                "seed": settings.seed,
            },
            "systems": [r.to_dict() for r in results],
        },
    )
