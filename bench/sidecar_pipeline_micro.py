"""The sidecar's own CPU per ModelInfer, in-process, against an upstream that answers at once.

Not a test: it prints figures and writes raw JSON. It drives N ModelInfer calls straight through
the sidecar's handlers (no grpc server, no sockets, one event loop), so what it measures is the
Python of the request path alone: head, decision, admission, idempotency, attempt loop, metrics.

    .venv/bin/python bench/sidecar_pipeline_micro.py [--requests 20000] [--repeats 3]
    .venv/bin/python bench/sidecar_pipeline_micro.py --baseline DIR --rounds 5 \\
        --out bench/results/sidecar_pipeline_micro.json

With `--baseline DIR` (an export of an earlier commit: `git archive C | tar -x -C DIR`) both
trees are measured in alternating child processes, `--rounds` times each, and the medians are
compared: on a shared, noisy machine only interleaved runs are worth comparing.

Scenarios (three static instances, route tables compiled once, tracing off):
  plain        a small request (echo, FP32[16]), no deadline, no id, no class
  rewrites     the same with a deadline, `x-priority` (a class with a Triton priority) and an
               `x-model-version` pin: the sidecar appends version, priority and queue timeout
  rewrites-1m  `rewrites` with a 1 MiB tensor (what a copy of the request bytes costs)
  idempotent   `plain` with a new `x-request-id` per call (one execution each)
  prefix-off   a codegen request with a 4 KiB prompt, routed by a router's table without
               prefix routing (the usual weighted pick)
  prefix       the same with the table's prefix routing on: the prompt peek, the key's hash
               and the bounded-load choice; `prefix` - `prefix-off` is what it adds
  prefix-off-1m, prefix-1m  the two with a 1 MiB prompt (the peek reads its first KiB only;
               both copy the request once, to append the class's Triton priority)
The prefix scenarios need a tree with prefix routing (not measured in a baseline without it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "plain", "rewrites", "rewrites-1m", "idempotent",
    "prefix-off", "prefix", "prefix-off-1m", "prefix-1m",
)  # fmt: skip
ADDRESSES = ("10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001")
USER_AGENT = ("user-agent", "grpc-python/1.85.4 grpc-c/46.0.0 (linux; chttp2)")


class InstantUpstream:
    """An upstream whose ModelInfer answers at once with fixed bytes (the same in both trees)."""

    def __init__(self, address: str, response: bytes) -> None:
        self.address = address
        self.in_flight = 0
        self._response = response

    async def infer(self, request: bytes, *, timeout: float | None, metadata: Any) -> bytes:
        return self._response

    def unary(self, method: str) -> Callable[..., Awaitable[bytes]]:
        raise NotImplementedError(method)

    def open_stream(self, *, timeout: float | None, metadata: Any) -> Any:
        raise NotImplementedError("streams")

    async def close(self) -> None:
        return None


class Context:
    """What a handler reads of grpc's ServicerContext on the ModelInfer path."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline_s: float | None) -> None:
        self._metadata = metadata
        self._deadline_s = deadline_s

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return self._deadline_s

    async def abort(self, code: Any, message: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"request failed: {code} {message}")


def _request(tensor_bytes: int) -> bytes:
    import numpy as np
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, tensor_bytes // 4])
    del tensor  # the shape is all it needs
    request.raw_input_contents.append(np.ones(tensor_bytes // 4, dtype=np.float32).tobytes())
    data: bytes = request.SerializeToString()
    return data


def _codegen_request(prompt_bytes: int) -> bytes:
    """codegen's PROMPT as tritonclient sends it: one BYTES element in raw contents."""
    from tritonclient.grpc import service_pb2 as pb

    line = b"def helper(x):\n    return x + 1\n"
    prompt = (line * (prompt_bytes // len(line) + 1))[:prompt_bytes]
    request = pb.ModelInferRequest(model_name="codegen")
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(len(prompt).to_bytes(4, "little") + prompt)
    data: bytes = request.SerializeToString()
    return data


def _prefix_table(cache: Any, prefix: bool) -> None:
    """A router's snapshot: codegen on the three instances, with prefix routing or without."""
    from pointsman.router.v1 import router_pb2 as pb

    table = pb.RouteTable(
        model_name="codegen",
        candidates=[
            pb.RouteCandidate(target=pb.Target(grpc_address=a, ready_versions=["1"]), weight=1.0)
            for a in ADDRESSES
        ],
    )
    if prefix:
        table.prefix_routing.CopyFrom(
            pb.PrefixRouting(prompt_input="PROMPT", block_bytes=64, max_blocks=16, min_blocks=1,
                             epsilon=0.25)
        )  # fmt: skip
    cache.apply(pb.WatchRoutesResponse(full_snapshot=True, tables=[table], generation=1))


def _response() -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    response = pb.ModelInferResponse(model_name="echo", model_version="1")
    response.raw_output_contents.append(b"\x00" * 64)
    data: bytes = response.SerializeToString()
    return data


def _build(scenario: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
    """The ModelInfer handler of a sidecar over three instant upstreams."""
    import random

    from prometheus_client import CollectorRegistry

    from pointsman.router.v1 import router_pb2
    from sidecar.admission import priority_classes_from_proto
    from sidecar.config import SidecarConfig
    from sidecar.metrics import SidecarMetrics
    from sidecar.routes import RouteCache
    from sidecar.service import InferenceProxy
    from sidecar.upstream import UpstreamPool

    config = SidecarConfig(
        listen="127.0.0.1:0", static_routes={"echo": ADDRESSES}, cold_start_wait_s=0
    )
    response = _response()
    try:  # the pipeline's swap point for the channels to Triton
        pool = UpstreamPool(
            max_message_bytes=config.max_message_bytes,
            idle_close_s=config.upstream_idle_close_s,
            connect=lambda address: InstantUpstream(address, response),
        )
        patch = False
    except TypeError:  # a tree from before it: replace each channel's ModelInfer instead
        pool = UpstreamPool(
            max_message_bytes=config.max_message_bytes, idle_close_s=config.upstream_idle_close_s
        )
        patch = True
    cache = RouteCache(pool, static_routes=config.static_routes, expects_router=False)
    if scenario.startswith("prefix"):
        _prefix_table(cache, prefix=not scenario.startswith("prefix-off"))
    if patch:
        old: Any
        for old in pool.upstreams():
            old.infer = InstantUpstream(old.address, response).infer
    cache.priorities = priority_classes_from_proto(
        router_pb2.PriorityPolicy(
            classes=[router_pb2.PriorityClass(name="high", triton_priority=1)],
            default_class="high",
        )
    )
    metrics = SidecarMetrics(CollectorRegistry(), cache=cache, pool=pool)
    proxy = InferenceProxy(config, cache, pool, rng=random.Random(7), metrics=metrics)
    handler: Callable[[bytes, Any], Awaitable[bytes]]
    handler = proxy.method_handlers()["ModelInfer"].unary_unary
    return handler


_ids = iter(range(1 << 62))


def _contexts(scenario: str, n: int) -> list[Context]:
    if scenario == "plain" or scenario.startswith("prefix"):
        return [Context((USER_AGENT,), None)] * n
    if scenario in ("rewrites", "rewrites-1m"):
        metadata = (USER_AGENT, ("x-priority", "high"), ("x-model-version", "1"))
        return [Context(metadata, 30.0)] * n
    if scenario == "idempotent":
        # Ids never repeat, in warm-up or across repeats: each call is executed, none replayed.
        ids = (f"req-{next(_ids)}" for _ in range(n))
        return [Context((USER_AGENT, ("x-request-id", i)), None) for i in ids]
    raise ValueError(scenario)


async def _measure(scenario: str, requests: int, repeats: int) -> dict[str, Any]:
    handler = _build(scenario)
    if scenario.startswith("prefix"):
        request = _codegen_request(1024 * 1024 if scenario.endswith("-1m") else 4096)
    else:
        request = _request(1024 * 1024 if scenario == "rewrites-1m" else 64)
    n = requests // 10 if scenario == "rewrites-1m" else requests
    warm = _contexts(scenario, min(n, 2000))
    for context in warm:
        await handler(request, context)
    cpu_us: list[float] = []
    wall_us: list[float] = []
    for _ in range(repeats):
        contexts = _contexts(scenario, n)
        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for context in contexts:
            await handler(request, context)
        cpu_us.append((time.process_time() - cpu0) / n * 1e6)
        wall_us.append((time.perf_counter() - wall0) / n * 1e6)
    return {"requests": n, "cpu_us": cpu_us, "wall_us": wall_us}


def _child(requests: int, repeats: int, scenarios: Sequence[str]) -> dict[str, Any]:
    import uvloop

    import sidecar

    async def main() -> dict[str, Any]:
        return {s: await _measure(s, requests, repeats) for s in scenarios}

    return {"tree": str(Path(sidecar.__file__).resolve().parent.parent), **uvloop.run(main())}


def _run_tree(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, __file__, "--child", "--requests", str(args.requests),
               "--repeats", str(args.repeats), "--scenario", *args.scenario]  # fmt: skip
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    if Path(result["tree"]) != tree.resolve():
        raise SystemExit(f"the child imported sidecar from {result['tree']}, not {tree}")
    return result


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else "(not a git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="calls per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats per run")
    parser.add_argument("--rounds", type=int, default=5, help="child runs per tree")
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--baseline", type=Path, help="an earlier tree to compare against")
    parser.add_argument("--out", type=Path, help="where to write the raw JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.requests, args.repeats, args.scenario)))
        return
    trees = {"current": REPO}
    if args.baseline is not None:
        trees = {"baseline": args.baseline, "current": REPO}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    for round_ in range(args.rounds):
        order = list(trees.items())
        if round_ % 2:
            order.reverse()  # neither tree always runs first
        for label, tree in order:
            runs[label].append(_run_tree(tree, args))
            print(f"round {round_ + 1}/{args.rounds}: {label} done", file=sys.stderr)
    summary = {
        label: {
            s: {
                "cpu_us_median": statistics.median(c for r in results for c in r[s]["cpu_us"]),
                "wall_us_median": statistics.median(w for r in results for w in r[s]["wall_us"]),
            }
            for s in args.scenario
        }
        for label, results in runs.items()
    }
    print(f"{'scenario':<12}" + "".join(f"{label + ' CPU us':>18}" for label in trees))
    for s in args.scenario:
        row = "".join(f"{summary[label][s]['cpu_us_median']:>18.2f}" for label in trees)
        print(f"{s:<12}{row}")
    if args.out is not None:
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                        "python": platform.python_version(), "note": "shared, busy machine"},
            "trees": {label: {"path": str(t), "commit": _commit(t)} for label, t in trees.items()},
            "summary": summary,
            "runs": runs,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
